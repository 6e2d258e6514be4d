#!/usr/bin/env bash
# Intel Neural Compressor's ONNX flow beside lowbit's pinned stack, for benchmarks/inc_crosscheck.py only.
# onnx-neural-compressor 1.0 declares numpy<2.0; installed without its dependencies so that the stack's
# numpy 2.4.6 stays (its quantization path runs on it), with the few packages it imports at load.
set -euo pipefail
W=/tmp/onc-wheels
.venv/bin/pip download -q --no-deps -d $W onnx-neural-compressor==1.0 onnxruntime-extensions==0.15.2 py-cpuinfo==9.0.0 \
  prettytable==3.18.0 wcwidth==0.9.4 transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0 regex==2026.11.15
.venv/bin/pip install -q --no-deps --target /tmp/onc $W/*.whl
echo "PYTHONPATH=/tmp/onc .venv/bin/python benchmarks/inc_crosscheck.py"
