#!/usr/bin/env bash
# GPU speed on the H100 (docs/results.md, section 6): PyTorch/cuDNN precisions, eager and CUDA graphs.
# Carry .whl (benchmarks/make_device_wheels.sh).
set -uo pipefail
source benchmarks/device_setup.sh
python3 benchmarks/gpu_speed.py 2>&1 | grep --line-buffered -v -i warn
