#!/usr/bin/env bash
# CPU speed on the lent GPU machine's own CPU, pinned to two physical cores (docs/results.md, section 6):
# a host with the INT8/BF16 instruction sets (AVX512-VNNI, AMX) that the development machine's AVX2-only
# CPU lacks. Carry .whl (benchmarks/make_device_wheels.sh) and .carry/cpu (benchmarks/make_openvino_carry.sh).
#   bash benchmarks/cpu_speed_device.sh uniform   # FP32 and W8A8 of both models on every runtime, then
#                                                 # the latency-budget schemes of both, timed interleaved
#   bash benchmarks/cpu_speed_device.sh schemes   # the latency-budget schemes only
#   bash benchmarks/cpu_speed_device.sh yolov10m  # YOLOv10m's latency-budget schemes only
set -uo pipefail
source benchmarks/device_setup.sh
mkdir -p /tmp/site && tar -xJf .carry/cpu/openvino.tar.xz -C /tmp/site || exit 1
lscpu | grep -E '^(Model name|Thread|Core|Socket|L2|L3)'
# two CPUs on different physical cores, so two threads do not share one core's units
cores=$(lscpu -p=CPU,CORE | grep -v '^#' | sort -t, -k2,2n -u | head -2 | cut -d, -f1 | paste -sd,)
echo "timing on CPUs $cores"
quiet() { grep --line-buffered -v -i -E "warn|it/s\]"; }
# YOLOv10m from yaml has no trained weights: its sensitivity (label-free distortion) only makes the search
# run end to end on that structure; its speed, not its accuracy, is what is measured
python3 -m lowbit.cli sensitivity -m yolov10m.yaml --calib lowbit/assets/demo-calib/images --method distortion \
  --formats W8A8 --images 16 --batch 16 --device cuda -o runs/sens-v10m 2>&1 | quiet
if [ "${1:-uniform}" = yolov10m ]; then
  python3 benchmarks/cpu_speed.py --export-only --models yolov10m 2>&1 | quiet
else
  python3 benchmarks/cpu_speed.py --export-only 2>&1 | quiet
fi
if [ "${1:-uniform}" = uniform ]; then
  taskset -c "$cores" python3 benchmarks/cpu_speed.py --out "$OUT/cpu-speed-xeon.json" 2>&1 | quiet
fi
if [ "${1:-uniform}" != yolov10m ]; then
  taskset -c "$cores" python3 benchmarks/latency_budget_cpu.py --sensitivity .carry/cpu/sensitivity-w8a8.json \
    --budgets 0.95 --int8-multiples 1.1 --out "$OUT/latency-budget-yolov10n-xeon.json" 2>&1 | quiet
fi
taskset -c "$cores" python3 benchmarks/latency_budget_cpu.py --model yolov10m.yaml --reps 60 \
  --sensitivity runs/sens-v10m/distortion/layer-sensitivity-report.json --budgets "" --int8-multiples 1.05,1.1,1.25 \
  --out "$OUT/latency-budget-yolov10m-xeon-switches.json" 2>&1 | quiet
