#!/usr/bin/env bash
# Several fine-tuning runs side by side on the one lent GPU (docs/results.md, section 7): YOLOv10n's
# block-wise AdaRound leaves an H100 room for more than one run. Measured on the H100 (2026-11-27), each
# run's own time: MSE + Fisher AdaRound alone 157 s; two at once 164-168 s each (with learned steps), three
# 173-178 s, five 208-223 s. So a five-seed study takes the time of about one and a half runs. Seven at once
# ran too (500-step W4A16 runs, 98-129 s each), once ModelOpt's precompile() was out of the call. Times
# measured this way are not solo times: benchmarks/finetune_gpu.sh gives those.
#
#   bash benchmarks/finetune_parallel_gpu.sh <deadline s> "<finetune_gpu.py args>" ["<args>" ...]
#
# Carry .whl and .carry/ft as for finetune_gpu.sh. Checkpoints come back as $OUT/run<i>.tar.xz (folders <scheme>-<recipe>),
# logs in $OUT/finetune-log.jsonl; a run still going <deadline> seconds after this script started (setup
# included) is stopped, so the ones that finished come back even when the device's time limit is near.
set -uo pipefail
start=$SECONDS
source benchmarks/device_setup.sh
deadline=$1; shift
# built once here, not by every run at once; only the integer kernels (ModelOpt's precompile() also builds the
# FP8 and MX ones: 190 s on the H100)
python3 -c "from modelopt.torch.quantization.extensions import get_cuda_ext; get_cuda_ext()" 2>&1 | grep -v -i warn
nvidia-smi dmon -s u -d 10 > $OUT/gpu-util.txt 2>&1 &
dmon=$!
pids=()
for i in $(seq 1 $#); do
  mkdir -p $OUT/run$i
  # shellcheck disable=SC2086  # each argument is one run's word list
  OMP_NUM_THREADS=2 python3 benchmarks/finetune_gpu.py --out $OUT/run$i ${!i} > $OUT/run$i/stdout.txt 2>&1 &
  pids+=($!)
done
alive() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while [ $((SECONDS - start)) -lt "$deadline" ] && alive; do sleep 5; done
for p in "${pids[@]}"; do kill $p 2>/dev/null; done
kill $dmon 2>/dev/null
echo "wall $((SECONDS - start)) s for $# runs"
cat $OUT/gpu-util.txt
# the device returns 8 files at most: one log, and each checkpoint as one .tar.xz (9 MB -> ~1.2 MB)
cat $OUT/run*/finetune-log.jsonl > $OUT/finetune-log.jsonl 2>/dev/null
for i in $(seq 1 $#); do
  echo "== run$i: ${!i}"; grep -v -i warn $OUT/run$i/stdout.txt | tail -5
  # one file per run, whatever it saved (--save-ptq adds its start): runs of one recipe that differ only in
  # other arguments (the calibration) would collide by name, and the device returns 8 files at most
  dirs=$(cd $OUT/run$i && ls -d */ 2>/dev/null)
  [ -n "$dirs" ] && (cd $OUT/run$i && XZ_OPT=-T0 tar -cJf "$OUT/run$i.tar.xz" $dirs)
  rm -rf $OUT/run$i
done
rm -f $OUT/gpu-util.txt
