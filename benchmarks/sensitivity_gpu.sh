#!/usr/bin/env bash
# Sensitivity timing and the mAP-ablation ground truth on the H100 (docs/results.md, "Sensitivity").
# Needs .whl (device wheels) and .carry/calib64 (64 labelled coco-calib-train images) carried.
set -uo pipefail
source benchmarks/device_setup.sh
CAL=.carry/calib64/annotations/instances_calib64.json
R=/tmp/runs
t0=$(date +%s)
# ModelOpt builds two CUDA extensions (integer and FP8 fake quant), each on first use: time them apart
# from the methods, or the first FP8 format pays its build inside a method's time.
python3 - <<'PY'
import time, torch, lowbit, modelopt.torch.quantization as mtq
x = torch.rand(1, 3, 8, 8, device="cuda")
for cfg in ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"):
    t = time.time()
    m = mtq.quantize(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)).cuda(), getattr(mtq, cfg), forward_loop=lambda m: m(x))
    m(x); torch.cuda.synchronize(); print(f"modelopt {cfg} extension build {time.time() - t:.1f} s")
PY
python3 -m lowbit.cli sensitivity -m yolov10m.yaml --calib $CAL --method gradient,distortion \
  --formats W4A16,W8A16,W8A8,W4A8-FP8 --images 16 --batch 16 --device cuda -o $R/v10m 2>&1 | grep -v "it/s\]"
python3 -m lowbit.cli sensitivity -m lowbit/assets/yolov10n.pt --calib $CAL \
  --method distortion,gradient,gradient-selfsup,ablation --formats W4A16,W8A16 --images 64 --batch 16 --device cuda \
  -o $R/v10n 2>&1 | grep -v "it/s\]"
echo "total $(( $(date +%s) - t0 )) s"
grep -h "method" $R/*/run.log
tar czf $OUT/sensitivity-runs.tgz -C $R .
