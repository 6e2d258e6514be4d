"""Where FP8 loses on YOLOv10n: FP8 weights alone, FP8 activations alone (INT8 weights), both; each with plain
and GPTQ rounding where weights are FP8; and both with the image-reading conv in INT8. PyTorch fake quantization
(ModelOpt) of every quantizable conv, calibrated on every calibration image, scored with lowbit's evaluator; every Δ
from FP32 with its standard error over paired random halves of the images (as `lowbit compare`). Manifests are
written here layer by layer, so lowbit's image-input rule applies only where a variant says. Behind
docs/results.md, section 5.

    .venv/bin/python benchmarks/fp8_attribution.py --model ../shared/assets/models/yolov10n/yolov10n.pt \
        --calib <copy of coco-calib-train>/coco-calib-train.yaml --data <copy of coco-val800>/coco-val800.yaml \
        --out runs/fp8-attribution

Each variant's detections are kept in OUT/<variant>/, so a re-run scores only what is missing. Copy the data
folders first: Ultralytics writes label caches beside them.
"""

import argparse
import time
from pathlib import Path

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.evaluate.coco import evaluate, load_detections, save_detections
from lowbit.evaluate.resampling import image_evals, paired_halves, standard_errors
from lowbit.formats import PRESETS, Format, TensorFormat
from lowbit.io import write_json
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest
from lowbit.quantize.manifest import Manifest

FP8_PC = TensorFormat(dtype="fp8", granularity="per_channel")
FP8_BOTH = Format(name="W8A8-FP8:pc", weight=FP8_PC, act=TensorFormat(dtype="fp8"))
# The first conv reads the image, whose values spread evenly over [0, 1]: E4M3 keeps 3 mantissa bits there, so
# between 0.57 and 1.0 an FP8 input has seven levels where INT8 has 55. TensorRT mixes INT8 and FP8 layers.
FIRST_CONV_INT8 = {"model.0.conv": PRESETS["W8A8"]}
VARIANTS = {  # name: (format, weight rounding, per-layer overrides)
    "FP8 weights": (Format(name="W8A16-FP8w", weight=FP8_PC, act=None), "max", {}),
    "FP8 weights, GPTQ": (Format(name="W8A16-FP8w", weight=FP8_PC, act=None), "gptq", {}),
    "INT8 weights, FP8 activations": (Format(name="W8A8-FP8a", weight=TensorFormat(dtype="int8", granularity="per_channel"),
                                             act=TensorFormat(dtype="fp8")), "max", {}),
    "FP8 weights and activations": (FP8_BOTH, "max", {}),
    "FP8 weights and activations, GPTQ": (FP8_BOTH, "gptq", {}),
    "FP8 weights and activations, first conv INT8": (FP8_BOTH, "max", FIRST_CONV_INT8),
    "FP8 weights and activations, GPTQ, first conv INT8": (FP8_BOTH, "gptq", FIRST_CONV_INT8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    det = load_detector(args.model, 640)
    val = load_dataset(args.data)
    batches = {}

    def scored(name: str, fmt: Format | None, clip: str, overrides: dict[str, Format]) -> list[dict]:
        folder = args.out / name
        dets = load_detections(folder)
        if dets is not None:
            return dets
        if not batches:
            batches["calib"] = make_batches(load_dataset(args.calib), 640, 8, progress=False)
            batches["eval"] = make_batches(val, 640, 8, progress=False)
        t = time.time()
        net = det.net
        if fmt is not None:
            m = Manifest(name=name, model=det.source, imgsz=640, weight_clip=clip,
                         layers={x.name: overrides.get(x.name, fmt) for x in det.quantizable_layers()})
            net = apply_manifest(det, m, batches["calib"], batches.setdefault("grams", {}))
        r = evaluate(net, val, det.names, 640, 8, batches=batches["eval"], progress=False, model_name=name)
        save_detections(folder, r.detections)
        print(f"{name}: {r.map50_95:.4f} ({time.time() - t:.0f} s)", flush=True)
        return r.detections

    names = ["FP32", *VARIANTS]
    evals = [image_evals(val.coco, scored(n, *(VARIANTS.get(n) or (None, "max", {})))) for n in names]
    _, delta_se = standard_errors(paired_halves(evals, 500, 0))
    maps = [e.map()[0] for e in evals]
    rows = {n: {"map50_95": m, "delta_points": (m - maps[0]) * 100, "delta_se_points": float(se) * 100}
            for n, m, se in zip(names, maps, delta_se)}
    write_json(args.out / "results.json", {"model": args.model, "data": args.data, "calib": args.calib, "rows": rows})
    for n, r in rows.items():
        print(f"{n:36s} {r['map50_95']:.4f}  {r['delta_points']:+.2f} ± {r['delta_se_points']:.2f}")


if __name__ == "__main__":
    main()
