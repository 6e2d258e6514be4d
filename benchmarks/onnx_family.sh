#!/usr/bin/env bash
# A detector ONNX of another family, graph-only PTQ as a user would run it: W8A8 for OpenVINO (scored on OpenVINO),
# FP8 and symmetric INT8 for TensorRT (scored with ONNX Runtime), each calibrated on all coco-calib-train images
# with the defaults (GPTQ rounding, mse activation ranges), scored on SPLIT and paired against the float graph on the
# same runtime. The graph's model card (<model>.lowbit.yaml beside it) says how it is fed and decoded.
#   bash benchmarks/onnx_family.sh DATA_DIR WORK_DIR FLOAT.onnx [SPLIT]
# DATA_DIR holds writable copies of coco-val800 and coco-calib-train (Ultralytics writes label caches).
set -euo pipefail
data=$1; work=$2; float=$3; split=${4:-coco-val800}
lb=${LOWBIT:-.venv/bin/lowbit}; mkdir -p "$work"
calib="$data/coco-calib-train/coco-calib-train.yaml"; val="$data/$split/$split.yaml"
for spec in "W8A8 openvino-cpu" "W8A8-FP8:pc tensorrt" "W8A8 tensorrt"; do
  set -- $spec
  name="$(echo $1 | tr ':' '_')-$2"
  [ -f "$work/$name.onnx" ] || $lb quantize-onnx "$float" -f "$1" --target "$2" --calib "$calib" --calib-images 0 \
      --onnx "$work/$name.onnx" -o "$work/q-$name"
  cp -f "${float%.onnx}.lowbit.yaml" "$work/$name.lowbit.yaml" 2>/dev/null || true
done
for rt in openvino onnxruntime; do
  [ -f "$work/eval-$split-float-$rt/results.json" ] || $lb eval -m "$float" -d "$val" --runtime $rt -o "$work/eval-$split-float-$rt"
  runs=()
  for f in "$work"/*.onnx; do
    n=$(basename "$f" .onnx)
    case "$n" in *openvino-cpu) [ $rt = openvino ] || continue;; *tensorrt) [ $rt = onnxruntime ] || continue;; esac
    [ -f "$work/eval-$split-$n/results.json" ] || $lb eval -m "$f" -d "$val" --runtime $rt -o "$work/eval-$split-$n"
    runs+=("$work/eval-$split-$n")
  done
  $lb compare "$work/eval-$split-float-$rt" "${runs[@]}" -o "$work/compare-$split-$rt"
done
