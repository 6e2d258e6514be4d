#!/usr/bin/env bash
# The calibration-draw spread of graph-only PTQ with GPTQ rounding (benchmarks/onnx_gptq.sh used all 288
# coco-calib-train images once): FP8 and symmetric INT8 for TensorRT from Ultralytics' own ONNX export of YOLOv10n,
# each calibrated on random draws of 192 coco-calib-train images (--calib-seed), scored with ONNX Runtime on
# coco-val800 and paired against the float graph.
#   bash benchmarks/onnx_gptq_draws.sh DATA_DIR WORK_DIR ULTRALYTICS_EXPORT.onnx [SEEDS]
# DATA_DIR and the export as in benchmarks/onnx_gptq.sh.
set -euo pipefail
data=$1; work=$2; float=$3; seeds=${4:-1 2 3}
lb=${LOWBIT:-.venv/bin/lowbit}; mkdir -p "$work"
calib="$data/coco-calib-train/coco-calib-train.yaml"; val="$data/coco-val800/coco-val800.yaml"
[ -f "$work/eval-float/results.json" ] || $lb eval -m "$float" -d "$val" --runtime onnxruntime -o "$work/eval-float"
runs=()
for seed in $seeds; do
  for fmt in W8A8-FP8:pc W8A8; do
    name="$(echo $fmt | tr ':' '_')-tensorrt-draw$seed"
    [ -f "$work/$name.onnx" ] || $lb quantize-onnx "$float" -f "$fmt" --target tensorrt --calib "$calib" \
        --calib-images 192 --calib-seed "$seed" --onnx "$work/$name.onnx" -o "$work/q-$name"
    [ -f "$work/eval-$name/results.json" ] || $lb eval -m "$work/$name.onnx" -d "$val" --runtime onnxruntime -o "$work/eval-$name"
    runs+=("$work/eval-$name")
  done
done
$lb compare "$work/eval-float" "${runs[@]}" -o "$work/compare"
