#!/usr/bin/env bash
# ModelOpt's ONNX PTQ (`modelopt.onnx.quantization`) needs its [onnx] extra, which would swap the pinned
# onnxruntime for onnxruntime-gpu and pull CuPy for CUDA 12. Its pure-Python needs go beside the stack
# instead, into /tmp/moonnx, without their own dependencies; use with PYTHONPATH=/tmp/moonnx.
set -euo pipefail
.venv/bin/pip install -q --no-deps --target /tmp/moonnx onnx-graphsurgeon==0.6.1 onnxconverter-common==1.16.0 \
  polygraphy==0.53.6 onnxslim==0.1.98 onnxscript==0.7.2 onnx-ir==1.1.0 lief==1.0.0 cppimport==26.4.17
PYTHONPATH=/tmp/moonnx .venv/bin/python -c "import modelopt.onnx.quantization; print('modelopt.onnx.quantization OK')"
