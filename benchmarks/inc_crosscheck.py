"""Cross-check lowbit's ONNX-native per-layer ranking against an independent implementation (docs/results.md, 3).

Intel Neural Compressor's ONNX flow (onnx-neural-compressor 1.0; INC 3.x moved ONNX Runtime support out of
`neural-compressor`) quantizes the float YOLOv10n graph to INT8 Q/DQ with its own calibration; ONNX Runtime's
`qdq_loss_debug` then measures, per conv, INC's weight error and the error of the conv's output in INC's
model (both SQNR, in dB). Their rankings are compared with lowbit's `onnx` method at W8A8 on the same images.

INC is not in lowbit's pinned stack: onnx-neural-compressor 1.0 declares numpy<2.0 (the stack has numpy 2.4.6,
which torch 2.14 and onnx 1.21 are built against) and imports transformers at load. It is installed beside
the stack, without its declared numpy, only for this script:

    bash benchmarks/inc_env.sh            # wheels into /tmp/onc
    PYTHONPATH=/tmp/onc .venv/bin/python benchmarks/inc_crosscheck.py --images 16
"""

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from scipy.stats import kendalltau, spearmanr

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.export.onnx_qdq import export_float_onnx
from lowbit.formats import parse_format
from lowbit.models.ultralytics import load_detector
from lowbit.sensitivity.onnx_node import OnnxProbe

SHARED = "../shared/assets"


class Reader:
    def __init__(self, images, name):
        self.images, self.name, self.i = images, name, 0

    def get_next(self):
        if self.i >= len(self.images):
            return None
        self.i += 1
        return {self.name: self.images[self.i - 1][None]}

    def rewind(self):
        self.i = 0

    def __iter__(self):  # ONNX Runtime's qdq_loss_debug iterates; INC calls get_next
        return iter([{self.name: x[None]} for x in self.images])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--out", default="runs/inc-crosscheck")
    a = ap.parse_args()
    from onnx_neural_compressor.quantization import config, quantize
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_weight_error,
                                                         create_weight_matching,
                                                         modify_model_output_intermediate_tensors)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    det = load_detector(f"{SHARED}/models/yolov10n/yolov10n.pt")
    ds = load_dataset(f"{SHARED}/coco-calib-train/coco-calib-train.yaml").subset(a.images)
    images = np.concatenate([b.images.numpy() for b in make_batches(ds, 640, 8)]).astype(np.float32)
    model = export_float_onnx(copy.deepcopy(det.net), 640)
    fp = out / "float.onnx"
    onnx.save(model, str(fp))

    t = time.perf_counter()
    probe = OnnxProbe(model, images, weight_range="absmax")  # INC's symmetric INT8 weights map max |w| to 127 too
    ours = {layer: probe.score(layer, parse_format("W8A8")) for layer in probe.weights}
    t_ours = time.perf_counter() - t

    t = time.perf_counter()
    qp = out / "inc-int8.onnx"
    cfg = config.StaticQuantConfig(Reader(images, "images"), quant_format=QuantFormat.QDQ, per_channel=True,
                                   activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                   op_types_to_quantize=["Conv"])
    quantize(str(fp), str(qp), cfg)
    t_inc = time.perf_counter() - t

    werr = compute_weight_error(create_weight_matching(str(fp), str(qp)))
    with tempfile.TemporaryDirectory() as tmp:
        fa, qa = f"{tmp}/f.onnx", f"{tmp}/q.onnx"
        modify_model_output_intermediate_tensors(str(fp), fa)
        modify_model_output_intermediate_tensors(str(qp), qa)
        f_acts = collect_activations(fa, Reader(images, "images"))
        q_acts = collect_activations(qa, Reader(images, "images"))
    conv_out = {n.input[1].removesuffix(".weight"): n.output[0] for n in model.graph.node if n.op_type == "Conv"}

    def xmodel_sqnr(tensor):
        # ORT's create_activation_matching pairs tensors by name, and INC renames each quantized conv's
        # output to "<name>_QuantizeInput": pair them here and take ORT's SQNR definition (dB).
        q = q_acts.get(f"{tensor}_QuantizeInput", q_acts.get(tensor))
        if q is None or tensor not in f_acts:
            return None
        f, q = np.concatenate(f_acts[tensor]), np.concatenate(q)
        return float(10 * np.log10((f ** 2).sum() / max(((f - q) ** 2).sum(), 1e-30)))

    rows = []
    for layer, score in ours.items():
        rows.append({"layer": layer, "lowbit_onnx_w8a8_nmse": score, "inc_weight_sqnr_db": werr.get(f"{layer}.weight"),
                     "inc_output_xmodel_sqnr_db": xmodel_sqnr(conv_out[layer])})
    summary = {"layers": len(rows), "images": len(images), "lowbit_onnx_s": t_ours, "inc_quantize_s": t_inc,
               "inc_activation_tensors_matched": sum(r["inc_output_xmodel_sqnr_db"] is not None for r in rows)}
    # a lower SQNR is a worse error: rank by -SQNR so that a high rank means sensitive on both sides
    for key in ("inc_weight_sqnr_db", "inc_output_xmodel_sqnr_db"):
        ok = [r for r in rows if r[key] is not None]
        if len(ok) < 3:
            continue
        base, other = [r["lowbit_onnx_w8a8_nmse"] for r in ok], [-r[key] for r in ok]
        summary[f"{key}: layers"] = len(ok)
        summary[f"{key}: spearman"] = float(spearmanr(base, other).statistic)
        summary[f"{key}: kendall"] = float(kendalltau(base, other).statistic)
        ours_top = {r["layer"] for r in sorted(ok, key=lambda r: -r["lowbit_onnx_w8a8_nmse"])[:10]}
        summary[f"{key}: top10 overlap"] = len(ours_top & {r["layer"] for r in sorted(ok, key=lambda r: r[key])[:10]})
    (out / "inc-crosscheck.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
