#!/usr/bin/env bash
# CPU speed on the lent GPU machine's own CPU, pinned to two physical cores (docs/results.md, section 6):
# a host with the INT8/BF16 instruction sets (AVX512-VNNI, AMX) that the development machine's AVX2-only
# CPU lacks. Carry .whl (benchmarks/make_device_wheels.sh) and .carry/cpu (benchmarks/make_openvino_carry.sh).
#   bash benchmarks/cpu_speed_device.sh uniform   # FP32 and W8A8 of both models on every runtime, then
#                                                 # the latency-budget schemes of both, timed interleaved
#   bash benchmarks/cpu_speed_device.sh schemes   # the latency-budget schemes only
#   bash benchmarks/cpu_speed_device.sh yolov10m  # YOLOv10m's latency-budget schemes only
#   bash benchmarks/cpu_speed_device.sh yolov10n  # YOLOv10n's latency-budget schemes only
#   bash benchmarks/cpu_speed_device.sh interleave  # YOLOv10n timed interleaved with 1 and with 5 other graphs
set -uo pipefail
mode=${1:-uniform}
source benchmarks/device_setup.sh
mkdir -p /tmp/site && tar -xJf .carry/cpu/openvino.tar.xz -C /tmp/site || exit 1
lscpu | grep -E '^(Model name|Thread|Core|Socket|L2|L3)'
# two CPUs on different physical cores, so two threads do not share one core's units
cores=$(lscpu -p=CPU,CORE | grep -v '^#' | sort -t, -k2,2n -u | head -2 | cut -d, -f1 | paste -sd,)
echo "timing on CPUs $cores"
quiet() { grep --line-buffered -v -i -E "warn|it/s\]"; }
if [ "$mode" = interleave ]; then
  python3 benchmarks/cpu_speed.py --export-only --models yolov10n 2>&1 | quiet
  taskset -c "$cores" python3 benchmarks/interleave_check.py --out "$OUT/interleave-check-xeon.json" 2>&1 | quiet
  exit
fi
if [ "$mode" != yolov10n ]; then
  # YOLOv10m from yaml has no trained weights: its sensitivity (label-free distortion) only makes the search
  # run end to end on that structure; its speed, not its accuracy, is what is measured
  python3 -m lowbit.cli sensitivity -m yolov10m.yaml --calib lowbit/assets/demo-calib/images --method distortion \
    --formats W8A8 --images 16 --batch 16 --device cuda -o runs/sens-v10m 2>&1 | quiet
fi
case "$mode" in
  yolov10m|yolov10n) python3 benchmarks/cpu_speed.py --export-only --models "$mode" 2>&1 | quiet ;;
  *) python3 benchmarks/cpu_speed.py --export-only 2>&1 | quiet ;;
esac
if [ "$mode" = uniform ]; then
  taskset -c "$cores" python3 benchmarks/cpu_speed.py --out "$OUT/cpu-speed-xeon.json" 2>&1 | quiet
fi
# the table's own timing needs as long a warm-up as the final one: with 20 inferences the Xeon's float graph
# timed 40% slower at table time than minutes later (docs/results.md)
if [ "$mode" != yolov10m ]; then
  taskset -c "$cores" python3 benchmarks/latency_budget_cpu.py --sensitivity .carry/cpu/sensitivity-w8a8.json \
    --table-reps 60 --budgets 0.95 --int8-multiples 1.1 --out "$OUT/latency-budget-yolov10n-xeon.json" 2>&1 | quiet
fi
if [ "$mode" != yolov10n ]; then
  taskset -c "$cores" python3 benchmarks/latency_budget_cpu.py --model yolov10m.yaml --reps 60 --table-reps 60 \
    --sensitivity runs/sens-v10m/distortion/layer-sensitivity-report.json --budgets "" --int8-multiples 1.05,1.1,1.25 \
    --out "$OUT/latency-budget-yolov10m-xeon.json" 2>&1 | quiet
fi
