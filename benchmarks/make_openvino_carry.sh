#!/usr/bin/env bash
# Build .carry/cpu for benchmarks/cpu_speed_device.sh: OpenVINO (pinned, Python 3.12 for the lent machine)
# without its GPU/NPU plugins, GPU kernel cache and non-ONNX frontends (59 MB wheel -> 21 MB tar.xz, so it
# fits the 64 MiB carry beside .whl), plus the W8A8 sensitivity report the latency-budget search reads.
#   bash benchmarks/make_openvino_carry.sh runs/study-speed/cache/sensitivity-*/gradient/layer-sensitivity-report.json
set -euo pipefail
report=${1:?a sensitivity report with W8A8 scores}
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$tmp" \
  openvino==2026.4.1 openvino-telemetry==2025.2.0
mkdir "$tmp/site"
for w in "$tmp"/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
libs="$tmp/site/openvino/libs"
rm -rf "$tmp/site/openvino/include" "$libs"/libopenvino_intel_{gpu,npu}_plugin.so "$libs/cache.json" \
  "$libs"/libopenvino_{tensorflow,pytorch,paddle,gguf,tensorflow_lite,jax}_frontend.so.*
rm -rf .carry/cpu && mkdir -p .carry/cpu
tar -C "$tmp/site" -cf - . | xz -6 -T2 > .carry/cpu/openvino.tar.xz
cp "$report" .carry/cpu/sensitivity-w8a8.json
rm -rf "$tmp"
du -sh .carry/cpu/*
