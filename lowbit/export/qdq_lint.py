"""Q/DQ placement rules for graphs that runtimes fuse into low-precision kernels (`lowbit check-qdq`).

Why ours: neither ONNX Runtime nor ModelOpt says whether a Q/DQ graph is laid out so that a runtime can
fuse it; they fuse what they can and silently run the rest in float (ONNX Runtime's CPU INT8 slower than
FP32 is the visible symptom). The rules, as TensorRT's and OpenVINO's fusion guides state them:
- integer weights symmetric (zero point 0) and, for INT8, one scale per output channel;
- an activation Q/DQ pair only in front of an op that has a low-precision kernel (conv, matmul, and the
  data-movement or element-wise ops runtimes keep in INT8 between convs: add, pooling, concat, resize...);
  a pair that only feeds float ops is pure overhead;
- no DQ -> Q "ping-pong": a dequantized tensor re-quantized straight away costs a round trip for nothing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from lowbit.errors import LowbitError

# ops that TensorRT and OpenVINO run in INT8 when Q/DQ surrounds them (the rest compute in float)
LOW_PRECISION_CONSUMERS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "MaxPool", "AveragePool",
                           "GlobalAveragePool", "Concat", "Resize", "Split", "Slice", "Reshape", "Transpose"}
WEIGHT_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}


class QdqReport(BaseModel):
    model: str
    convs: int  # Conv/MatMul/Gemm nodes
    weight_quantized: int
    weight_dtypes: dict[str, int]
    weight_asymmetric: list[str]  # nodes whose integer weights have a non-zero zero point
    weight_per_tensor_int8: list[str]  # INT8 weights with one scale for the whole tensor
    input_quantized: int  # convs whose input comes through a DequantizeLinear
    activation_qdq: int  # activation QuantizeLinear nodes
    activation_consumers: dict[str, int]  # op types reading dequantized activations
    float_only_qdq: list[str]  # activation Q nodes whose dequantized value feeds no low-precision op
    ping_pong: list[str]  # DequantizeLinear nodes whose output is re-quantized at once

    def violations(self) -> list[str]:
        out = []
        if self.weight_asymmetric:
            out.append(f"{len(self.weight_asymmetric)} conv(s) with asymmetric integer weights, e.g. {self.weight_asymmetric[0]}")
        if self.weight_per_tensor_int8:
            out.append(f"{len(self.weight_per_tensor_int8)} conv(s) with per-tensor INT8 weights, e.g. {self.weight_per_tensor_int8[0]}")
        if self.float_only_qdq:
            out.append(f"{len(self.float_only_qdq)} activation Q/DQ pair(s) feeding only float ops, e.g. {self.float_only_qdq[0]}")
        if self.ping_pong:
            out.append(f"{len(self.ping_pong)} DQ -> Q ping-pong(s), e.g. {self.ping_pong[0]}")
        return out


def check_qdq(path: str | Path) -> QdqReport:
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: ONNX file not found")
    try:
        g = onnx.load(str(path)).graph
    except Exception as e:  # protobuf's errors name no file
        raise LowbitError(f"{path}: not a readable ONNX file ({e})") from None
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def array(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    def is_static(name) -> bool:  # an initializer, or a constant, possibly through a Q node
        p = producer.get(name)
        if name in inits or (p is not None and p.op_type == "Constant"):
            return True
        return p is not None and p.op_type == "QuantizeLinear" and is_static(p.input[0])

    convs = [n for n in g.node if n.op_type in WEIGHT_OPS]
    wq, dtypes, asym, per_tensor, inq = 0, Counter(), [], [], 0
    for n in convs:
        src = producer.get(n.input[0])
        inq += src is not None and src.op_type == "DequantizeLinear"
        dq = producer.get(n.input[1]) if len(n.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or not is_static(dq.input[0]):
            continue
        wq += 1
        w = array(dq.input[0])
        if w is None:  # weight quantized by a Q node in the graph, a float initializer behind it
            qn = producer.get(dq.input[0])
            zp = array(qn.input[2]) if qn is not None and len(qn.input) > 2 and qn.input[2] else None
            name = str(zp.dtype) if zp is not None else "uint8"  # ONNX's default without a zero point
        else:
            name = str(w.dtype)
        dtypes[name] += 1
        zp = array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if zp is not None and zp.dtype.kind in "iu" and np.any(zp.astype(np.int64) != 0):
            asym.append(n.name)
        scale = array(dq.input[1])
        # one scale for a conv of one output channel is per-channel too
        if name == "int8" and scale is not None and scale.size == 1 and (w is None or w.ndim < 1 or w.shape[0] > 1):
            per_tensor.append(n.name)

    act_q = [n for n in g.node if n.op_type == "QuantizeLinear" and not is_static(n.input[0])]
    act_consumers, float_only, ping = Counter(), [], []
    for q in act_q:
        ops = [c.op_type for dq in consumers.get(q.output[0], []) if dq.op_type == "DequantizeLinear"
               for c in consumers.get(dq.output[0], [])]
        act_consumers.update(ops)
        if ops and not any(op in LOW_PRECISION_CONSUMERS or op == "QuantizeLinear" for op in ops):  # Q: ping-pong
            float_only.append(q.name or q.input[0])
    for dq in (n for n in g.node if n.op_type == "DequantizeLinear"):
        if any(c.op_type == "QuantizeLinear" for c in consumers.get(dq.output[0], [])):
            ping.append(dq.name or dq.output[0])
    return QdqReport(model=str(path), convs=len(convs), weight_quantized=wq, weight_dtypes=dict(dtypes),
                     weight_asymmetric=asym, weight_per_tensor_int8=per_tensor, input_quantized=inq,
                     activation_qdq=len(act_q), activation_consumers=dict(act_consumers.most_common()),
                     float_only_qdq=float_only, ping_pong=ping)
