#!/usr/bin/env bash
# YOLOv10m (from yaml) on the H100: forward speed (YOLOv10n too) and sensitivity timing (docs/results.md).
# Needs .whl and .carry/calib64 carried.
set -uo pipefail
source benchmarks/device_setup.sh
CAL=.carry/calib64/annotations/instances_calib64.json
python3 benchmarks/gpu_speed.py 2>&1 | grep --line-buffered -v -i warn
for rounding in nearest gptq; do
  python3 -m lowbit.cli sensitivity -m yolov10m.yaml --calib $CAL --method distortion --rounding $rounding \
    --formats W4A16,W8A16,W8A8,W4A8-FP8 --calib-images 16 --batch 16 --device cuda -o /tmp/runs/v10m-$rounding 2>&1 | grep "most sensitive"
done
python3 -m lowbit.cli sensitivity -m yolov10m.yaml --calib $CAL --method gradient --formats W4A16,W8A16 \
  --calib-images 16 --batch 16 --device cuda -o /tmp/runs/v10m-grad2 2>&1 | grep "most sensitive"
tar czf $OUT/v10m-runs.tgz -C /tmp/runs .
