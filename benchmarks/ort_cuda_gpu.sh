#!/usr/bin/env bash
# ONNX Runtime's CUDA provider on the H100: FP32 vs W8A8 Q/DQ ONNX, YOLOv10n and YOLOv10m, batch 1
# (docs/results.md, section 6). Needs the five parts of benchmarks/make_ort_gpu_chunks.sh already on the
# machine and .whl carried.
set -uo pipefail
mkdir -p /tmp/ortgpu
cat .carry/ortgpu/part.* | xz -dc | tar x -C /tmp/ortgpu || exit 1
source benchmarks/device_setup.sh
export PYTHONPATH=/tmp/ortgpu:$PYTHONPATH
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
python3 benchmarks/cpu_speed.py --threads 2 --reps 50 --work /tmp/w --out $OUT/ort-cuda-speed.json 2>&1 | grep --line-buffered -v -i warn
