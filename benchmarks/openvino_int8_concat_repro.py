"""Minimal repro: OpenVINO's CPU plugin mis-computes a signed-INT8 QuantizeLinear/DequantizeLinear pair that reads a
Concat, when the Conv after it runs as an INT8 kernel (docs/openvino-int8-concat.md).

    .venv/bin/python benchmarks/openvino_int8_concat_repro.py

Graph: x -> Conv -> [SiLU] -> Split -> Concat(a, b, a) -> QuantizeLinear(int8, zero point 0) -> DequantizeLinear
-> Conv (INT8 per-channel weights behind a DequantizeLinear). Each variant prints the largest difference between
OpenVINO (f32 inference precision) and ONNX Runtime, which computes what the ONNX operators define. The same
quantization grid written as UINT8 with zero point 128 is computed correctly, as is every variant without the Concat
or with float weights.
"""

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def model(zp_type: int, concat: bool = True, silu: bool = True, int8_weights: bool = True, size: int = 32):
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (32, 32, 1, 1)).astype(np.float32)
    w2 = rng.normal(0, 0.1, (32, 48 if concat else 32, 1, 1)).astype(np.float32)
    w2s = (np.abs(w2).reshape(32, -1).max(1) / 127).astype(np.float32)
    w2q = np.round(w2 / w2s[:, None, None, None]).astype(np.int8)
    s = np.float32(4.0 / 127)
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"])]
    t = "c1"
    if silu:
        nodes += [h.make_node("Sigmoid", ["c1"], ["sg"]), h.make_node("Mul", ["c1", "sg"], ["act"])]
        t = "act"
    if concat:
        nodes += [h.make_node("Split", [t, "split"], ["a", "b"], axis=1),
                  h.make_node("Concat", ["a", "b", "a"], ["cat"], axis=1)]
        t = "cat"
    nodes += [h.make_node("QuantizeLinear", [t, "s", "zp"], ["q"]), h.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"])]
    inits = [nh.from_array(w1, "w1"), h.make_tensor("s", T.FLOAT, [], [float(s)]),
             h.make_tensor("zp", zp_type, [], [0 if zp_type == T.INT8 else 128])]
    if concat:
        inits.append(nh.from_array(np.array([16, 16], np.int64), "split"))
    if int8_weights:
        nodes += [h.make_node("DequantizeLinear", ["w2q", "w2s"], ["w2"], axis=0)]
        inits += [nh.from_array(w2q, "w2q"), nh.from_array(w2s, "w2s")]
    else:
        inits.append(nh.from_array(w2, "w2"))
    nodes.append(h.make_node("Conv", ["dq", "w2"], ["y"]))
    g = h.make_graph(nodes, "repro", [h.make_tensor_value_info("x", T.FLOAT, [1, 32, size, size])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 32, size, size])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)])


def main():
    x = np.random.default_rng(1).normal(0, 1, (1, 32, 32, 32)).astype(np.float32)
    core = ov.Core()
    print(f"openvino {ov.__version__}, onnxruntime {ort.__version__}")
    for zp_name, zp_type in (("int8, zero point 0  ", T.INT8), ("uint8, zero point 128", T.UINT8)):
        for concat, silu, int8_w in ((True, True, True), (True, False, True), (False, True, True), (True, True, False)):
            m = model(zp_type, concat, silu, int8_w)
            onnx.checker.check_model(m, full_check=True)
            data = m.SerializeToString()
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            ref = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            got = core.compile_model(core.read_model(data, b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: x})[0]
            print(f"{zp_name} concat={concat!s:5} silu={silu!s:5} int8 weights={int8_w!s:5}: "
                  f"max |OpenVINO - ONNX Runtime| = {np.abs(got - ref).max():.4f} (max |y| {np.abs(ref).max():.2f})")


if __name__ == "__main__":
    main()
