#!/usr/bin/env bash
# YOLOv10n W8A8 for OpenVINO in both activation encodings (openvino-cpu: asymmetric UINT8; openvino-amx: symmetric
# INT8), each quantized on the graph from lowbit's float export with all coco-calib-train images, scored on OpenVINO
# on coco-val800 and coco-val200 (paired against the float export), then timed interleaved (latency + throughput).
#   bash benchmarks/openvino_targets.sh DATA_DIR WORK_DIR [MODEL.pt]
# DATA_DIR holds writable copies of coco-val800, coco-val200, coco-calib-train (Ultralytics writes label caches).
set -euo pipefail
data=$1; work=$2; model=${3:-../shared/assets/models/yolov10n/yolov10n.pt}
lb=.venv/bin/lowbit; mkdir -p "$work"
.venv/bin/python -c "import onnx, sys; from lowbit.models.ultralytics import load_detector; from lowbit.export.onnx_qdq import export_float_onnx; onnx.save(export_float_onnx(load_detector(sys.argv[1], 640).net, 640), sys.argv[2])" "$model" "$work/float.onnx"
for t in openvino-cpu openvino-amx; do
  $lb quantize-onnx "$work/float.onnx" -f W8A8 --target $t --calib "$data/coco-calib-train/coco-calib-train.yaml" \
      --calib-images 0 --onnx "$work/w8a8-$t.onnx" -o "$work/q-$t"
done
for split in coco-val800 coco-val200; do
  for m in float w8a8-openvino-cpu w8a8-openvino-amx; do
    $lb eval -m "$work/$m.onnx" -d "$data/$split/$split.yaml" --runtime openvino -o "$work/eval-$split-$m"
  done
  $lb compare "$work/eval-$split-float" "$work/eval-$split-w8a8-openvino-cpu" "$work/eval-$split-w8a8-openvino-amx" -o "$work/compare-$split"
done
$lb bench "$work/float.onnx" "$work/w8a8-openvino-cpu.onnx" "$work/w8a8-openvino-amx.onnx" --threads 2 --reps 100 \
    --verify "$data/coco-calib-train/coco-calib-train.yaml" -o "$work/bench"
