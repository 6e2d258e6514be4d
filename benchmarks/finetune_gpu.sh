#!/usr/bin/env bash
# Fine-tuning recipes on the lent GPU (docs/results.md, "Accuracy recovery"). Carry .whl (device wheels) and
# .carry/ft (160 training + 32 held-out labelled coco-calib-train images, and the scheme manifests), made by
# `python3 benchmarks/make_ft_carry.py`.
set -uo pipefail
source benchmarks/device_setup.sh
python3 benchmarks/finetune_gpu.py --out $OUT "$@" 2>&1 | grep --line-buffered -v -i "warn"
