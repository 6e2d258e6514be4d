#!/usr/bin/env bash
# The whole YOLOv10n study on the H100 (docs/results.md, section 4). Carry .whl (device wheels) and
# .carry/coco-val200: cp -r ../shared/assets/coco-val200 .carry/ && rm -rf .carry/coco-val200/labels
set -uo pipefail
source benchmarks/device_setup.sh
t0=$(date +%s)
python3 -m lowbit.cli study -c configs/study-yolov10n-h100.yaml -o /tmp/study 2>&1 | grep -v -i "warn\|it/s\]"
echo "study: $(( $(date +%s) - t0 )) s"
cp /tmp/study/study-report.md /tmp/study/schemes.csv /tmp/study/summary.json /tmp/study/pareto.png $OUT/
cp /tmp/study/recommended-bitmap.png /tmp/study/run.log $OUT/ 2>/dev/null
