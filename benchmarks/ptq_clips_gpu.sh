#!/usr/bin/env bash
# GPTQ variants by calibration draw on the lent GPU (docs/results.md, section 7): one process per
# scheme x rounding method, side by side, each quantizing from draws 0-4 of 64 carried training images.
#
#   bash benchmarks/ptq_clips_gpu.sh <deadline s> <scheme> ... -- <clip> ...     (carry .whl and .carry/ft)
#
# The checkpoints (runs/gq/<scheme>/<clip>-<draw>) come back as one .tar.xz per scheme and method (the
# device returns 8 files at most), to be scored with benchmarks/eval_checkpoints.py: the training carry and
# coco-val200 do not fit one 64 MiB carry together. A call right after this one (the machine goes back after
# 30 s idle) still finds them in runs/gq and can score them there, carrying coco-val200 instead.
set -uo pipefail
start=$SECONDS
source benchmarks/device_setup.sh
deadline=$1; shift
schemes=(); while [ "$1" != "--" ]; do schemes+=("$1"); shift; done; shift
python3 -c "from modelopt.torch.quantization.extensions import get_cuda_ext; get_cuda_ext()" 2>&1 | grep -v -i warn
pids=()
for s in "${schemes[@]}"; do
  name=$(basename "$s" .json)
  mkdir -p runs/gq/$name
  for c in "$@"; do
    OMP_NUM_THREADS=2 python3 benchmarks/ptq_calibration_draws.py "$s" --calib .carry/ft/train/images \
      --seeds ${DRAWS:-0 1 2 3 4} --clips $c --save runs/gq/$name --out runs/gq/ptq-$name-$c.json > runs/gq/$name-$c.log 2>&1 &
    pids+=($!)
  done
done
alive() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while [ $((SECONDS - start)) -lt "$deadline" ] && alive; do sleep 5; done
for p in "${pids[@]}"; do kill $p 2>/dev/null; done
echo "wall $((SECONDS - start)) s"
grep -h -v -i warn runs/gq/*.log | grep -v "^ *warn\|^  warnings" | tail -40
python3 -c "import json,glob; json.dump({f: json.load(open(f)) for f in sorted(glob.glob('runs/gq/ptq-*.json'))}, open('$OUT/ptq-clips.json','w'), indent=1)"
for s in "${schemes[@]}"; do
  name=$(basename "$s" .json)
  for c in "$@"; do (cd runs/gq/$name && XZ_OPT=-T0 tar -cJf $OUT/ckpt-$name-$c.tar.xz $c-[0-9]*); done
done
ls -la $OUT
