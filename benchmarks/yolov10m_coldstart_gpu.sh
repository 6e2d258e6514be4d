#!/usr/bin/env bash
# YOLOv10m sensitivity, gradient + distortion x 4 formats, in a fresh process after ModelOpt's one-time
# builds (docs/results.md, section 3). ModelOpt JIT-builds two CUDA extensions, one for integer and one for
# FP8 fake quant, each on first use (~60 s); a format list with FP8 pays the second build in the first
# sensitivity run unless both are built first. Needs .whl and .carry/calib64 carried.
set -uo pipefail
source benchmarks/device_setup.sh
CAL=.carry/calib64/annotations/instances_calib64.json
python3 - <<'PY' 2>&1 | grep --line-buffered -v -i warn
import time, torch, modelopt.torch.quantization as mtq
x = torch.rand(1, 3, 8, 8, device="cuda")
for cfg in ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"):
    t = time.time()
    m = mtq.quantize(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)).cuda(), getattr(mtq, cfg), forward_loop=lambda m: m(x))
    m(x); torch.cuda.synchronize(); print(f"ModelOpt extension build for {cfg}: {time.time() - t:.1f} s")
PY
SECONDS=0
python3 -m lowbit.cli sensitivity -m yolov10m.yaml --calib $CAL --method gradient,distortion \
  --formats W4A16,W8A16,W8A8,W4A8-FP8 --images 16 --batch 16 --device cuda -o /tmp/runs/v10m 2>&1 | grep "most sensitive"
echo "fresh process, end to end (model build, images, both methods, reports): ${SECONDS} s"
grep -h "method" /tmp/runs/v10m/run.log
