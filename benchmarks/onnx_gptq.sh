#!/usr/bin/env bash
# Graph-only PTQ with and without GPTQ rounding, from Ultralytics' own ONNX export of YOLOv10n (no PyTorch source):
# FP8 and symmetric INT8 for TensorRT (scored with ONNX Runtime) and INT8 for OpenVINO (scored on OpenVINO), each
# calibrated on all coco-calib-train images, scored on coco-val800 and paired against the float graph.
#   bash benchmarks/onnx_gptq.sh DATA_DIR WORK_DIR ULTRALYTICS_EXPORT.onnx [SPLITS]
# DATA_DIR holds writable copies of coco-val800, coco-val200 and coco-calib-train (Ultralytics writes label caches);
# the export: YOLO("yolov10n.pt").export(format="onnx", imgsz=640, opset=17, simplify=False).
set -euo pipefail
data=$1; work=$2; float=$3; splits=${4:-coco-val800}
lb=.venv/bin/lowbit; mkdir -p "$work"
calib="$data/coco-calib-train/coco-calib-train.yaml"
runs=()
for spec in "W8A8-FP8:pc tensorrt onnxruntime" "W8A8 tensorrt onnxruntime" "W8A8 openvino-cpu openvino"; do
  set -- $spec
  for rounding in nearest gptq; do
    name="$(echo $1 | tr ':' '_')-$2-$rounding"
    [ -f "$work/$name.onnx" ] || $lb quantize-onnx "$float" -f "$1" --target "$2" --rounding $rounding --calib "$calib" \
        --calib-images 0 --onnx "$work/$name.onnx" -o "$work/q-$name"
  done
done
for split in $splits; do
  for rt in onnxruntime openvino; do
    [ -f "$work/eval-$split-float-$rt/results.json" ] || $lb eval -m "$float" -d "$data/$split/$split.yaml" --runtime $rt -o "$work/eval-$split-float-$rt"
    names=()
    for f in "$work"/*.onnx; do
      n=$(basename "$f" .onnx)
      case "$n" in *openvino-cpu*) [ $rt = openvino ] || continue;; *tensorrt*) [ $rt = onnxruntime ] || continue;; *) continue;; esac
      [ -f "$work/eval-$split-$n/results.json" ] || $lb eval -m "$f" -d "$data/$split/$split.yaml" --runtime $rt -o "$work/eval-$split-$n"
      names+=("$work/eval-$split-$n")
    done
    $lb compare "$work/eval-$split-float-$rt" "${names[@]}" -o "$work/compare-$split-$rt"
  done
done
