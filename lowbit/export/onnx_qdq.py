"""Q/DQ ONNX from a ModelOpt-quantized detector, for the runtime of a deployment target.

The float graph is exported once (opset 21); then the same graph rewrite as `lowbit quantize-onnx`
(lowbit.quantize.onnx_ptq) writes every manifest layer's Conv as standard operators, with the weights the
checkpoint holds (GPTQ-rounded or fine-tuned, on ModelOpt's grid) and activation ranges either calibrated on the
graph with images (encoded and placed as the target needs) or taken from ModelOpt's calibration.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import torch

from lowbit import targets
from lowbit.errors import LowbitError
from lowbit.models.onnx_detector import quiet_session_options
from lowbit.quantize.manifest import Manifest
from lowbit.quantize.onnx_ptq import QdqOnnxInfo, quantize_graph, write_graph
from lowbit.quantize.qdq import OPSET, conv_layers
from lowbit.targets import DEFAULT_TARGET


def _amax(q) -> np.ndarray:
    a = q.amax
    if a is None:
        raise LowbitError(f"quantizer {q} has no calibrated amax")
    return a.detach().float().cpu().numpy()


def export_float_onnx(net: torch.nn.Module, imgsz: int) -> "onnx.ModelProto":  # noqa: F821
    import onnx
    from onnx import version_converter

    buf = io.BytesIO()
    net = copy.deepcopy(net).float().eval().cpu()
    with torch.no_grad():
        torch.onnx.export(net, torch.zeros(1, 3, imgsz, imgsz), buf, opset_version=19, dynamo=False,
                          input_names=["images"], output_names=["output0"], do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    # An Ultralytics head in eval mode also returns its raw maps; a deployed graph returns the detections alone
    # (as Ultralytics' own export does): copying the maps out costs every inference
    del model.graph.output[1:]
    model = version_converter.convert_version(model, OPSET)
    onnx.helper.set_model_props(model, {k: str(v) for k, v in ultralytics_metadata(net, imgsz).items()})
    return model


def ultralytics_metadata(net: torch.nn.Module, imgsz: int) -> dict:
    """What Ultralytics reads from an exported model (AutoBackend), so `YOLO("model.onnx")` (and an OpenVINO IR
    folder) predicts and validates with lowbit's exports as with its own."""
    names = getattr(net, "names", None)
    stride = getattr(net, "stride", None)
    head = net.model[-1] if hasattr(net, "model") else None
    meta = {"description": "exported by lowbit", "task": "detect", "batch": 1, "imgsz": [imgsz, imgsz],
            "end2end": bool(getattr(head, "end2end", False)), "channels": 3}
    if names is not None:
        meta["names"] = {int(k): v for k, v in dict(names).items()}
    if stride is not None:
        meta["stride"] = int(max(stride)) if hasattr(stride, "__iter__") else int(stride)
    return meta


def export_qdq_onnx(net_float: torch.nn.Module, qnet: torch.nn.Module, manifest: Manifest, path: str | Path,
                    parity_images: torch.Tensor | None = None, target: str = DEFAULT_TARGET,
                    calib_images: np.ndarray | None = None, calibration=None) -> QdqOnnxInfo:
    """Write a Q/DQ ONNX of `manifest` for `target` (lowbit.targets); with `calib_images`, activation ranges are
    calibrated on the graph, otherwise ModelOpt's are used. With `parity_images`, ONNX Runtime's raw outputs are
    compared with the fake-quant model's."""
    tgt = targets.get_target(target)
    model = export_float_onnx(net_float, manifest.imgsz)
    layers = conv_layers(model)

    def weights(layer: str):
        mod = qnet.get_submodule(layer)
        wq = mod.weight_quantizer
        return mod.weight.detach().float().cpu().numpy(), (_amax(wq) if wq.is_enabled else None)

    act_amax = {n: float(_amax(qnet.get_submodule(n).input_quantizer).reshape(-1)[0])
                for n, f in manifest.layers.items() if f.act is not None} if calib_images is None else None
    done = quantize_graph(model, manifest, calib_images, tgt.act_dtype, calibration, weights, act_amax, layers,
                          placement=tgt.placement)
    info, data = write_graph(model, path, done, layers, target, manifest, "checkpoint",
                             calibration=calibration if calib_images is not None else None,
                             calibration_images=0 if calib_images is None else len(calib_images))
    if parity_images is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(data, quiet_session_options(), providers=["CPUExecutionProvider"])
        diffs = []
        dev = next(qnet.parameters()).device
        with torch.no_grad():
            for x in parity_images.split(1):
                ref = qnet(x.to(dev))
                ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).float().cpu().numpy()
                out = sess.run(None, {"images": x.numpy()})[0]
                diffs.append(np.abs(out - ref))
        d = np.concatenate([x.reshape(-1) for x in diffs])
        info.parity_max_abs, info.parity_mean_abs = float(d.max()), float(d.mean())
    return info
