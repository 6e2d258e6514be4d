#!/usr/bin/env bash
# onnxruntime-gpu 1.31.1 (CUDA 13, the lent H100's CUDA) for benchmarks/ort_cuda_gpu.sh. Its wheel is 256 MB,
# four times the device's 64 MiB carry, so it travels unpacked, xz-compressed and split into five parts
# (.carry/ortgpu/part.a-e), one part per call: ignored files stay on a warm machine between calls.
#   for p in a b c d; do run(carry=[".carry/ortgpu/part.$p"], command="ls .carry/ortgpu"); done
#   run(carry=[".carry/ortgpu/part.e", ".whl"], command="bash benchmarks/ort_cuda_gpu.sh")
# Calls must follow each other within the machine's idle window (30 s), or the parts are lost.
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$W" onnxruntime-gpu==1.31.1
(cd "$W" && unzip -q ./*.whl && tar cf - onnxruntime onnxruntime_gpu-1.31.1.dist-info | xz -9e -T2 > ort.tar.xz)
rm -rf .carry/ortgpu && mkdir -p .carry/ortgpu
split -b 41M -a 1 "$W/ort.tar.xz" .carry/ortgpu/part.
rm -rf "$W"
ls -la .carry/ortgpu
