"""lowbit's INT8 artifacts beside the tools users pick today, same images, same evaluator, interleaved latency.

    bash benchmarks/modelopt_onnx_env.sh && .venv/bin/pip install -r benchmarks/requirements-peers.txt
    PYTHONPATH=/tmp/moonnx .venv/bin/python benchmarks/peers.py --out docs/data/peers-yolov10n.json
    .venv/bin/python benchmarks/peers.py --model yolov10m.yaml --speed-only --out docs/data/peers-yolov10m.json

Peers (each calibrated on coco-calib-train, never on evaluation images):
- Ultralytics' one-line OpenVINO INT8 export (NNCF post-training quantization, mixed preset, head post-processing
  ignored), the tool a user who wants a faster YOLO reaches for;
- NNCF's accuracy-controlled quantization (max drop 0.5 point, validated on coco-calib-train), from the same
  OpenVINO float model and ignored scope;
- ModelOpt's ONNX INT8 PTQ (`modelopt.onnx.quantization`, its defaults, float ops kept FP32 for the CPU);
- lowbit: W8A8 for openvino-cpu (asymmetric UINT8 activations where produced), over calibration draws; W8A8 and
  FP8 (per-channel weight scales) for tensorrt, scored with ONNX Runtime; and any manifests given (a study's best
  deployable mixed scheme).
Each artifact's mAP is measured on the runtime that runs it (`lowbit eval --runtime`), with paired standard errors
against FP32 (`lowbit compare`), on coco-val800 and coco-val200; latency comes from one interleaved `lowbit bench`
of every OpenVINO-run artifact, outputs checked first. The time each tool takes to make its artifact is recorded.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from lowbit.api import (BenchConfig, CompareConfig, DataConfig, EvalConfig, QuantizeOnnxConfig, run_bench, run_compare,
                        run_eval, run_quantize_onnx)
from lowbit.data.datasets import load_dataset
from lowbit.data.loader import make_batches
from lowbit.export.onnx_qdq import export_float_onnx
from lowbit.io import read_json, write_json
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.manifest import Manifest
from lowbit.quantize.onnx_ptq import ActivationCalibration


def writable_copy(src: Path, dst: Path) -> Path:
    """Ultralytics writes label caches beside a dataset: a copy with linked images and copied labels."""
    if not dst.exists():
        (dst / "images").mkdir(parents=True)
        for sub in ("labels", "annotations"):
            shutil.copytree(src / sub, dst / sub)
        for f in (src / "images").iterdir():
            (dst / "images" / f.name).symlink_to(f.resolve())
        shutil.copy(src / f"{src.name}.yaml", dst)
    return dst / f"{src.name}.yaml"


def ultralytics_int8(model: str, data_yaml: Path, work: Path) -> tuple[Path, float]:
    from ultralytics import YOLO

    t = time.perf_counter()
    src = work / Path(model).name
    if Path(model).is_file():
        shutil.copy(model, src)
    f = YOLO(str(src) if src.exists() else model).export(format="openvino", int8=True, data=str(data_yaml), imgsz=640,
                                                         batch=1)
    out = work / "ultralytics-nncf-int8"
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(f, out)
    return out, time.perf_counter() - t


def nncf_accuracy_control(model: str, calib: list, validate: list, coco: dict, names: dict, work: Path,
                          max_drop: float = 0.005) -> tuple[Path, float]:
    """nncf.quantize_with_accuracy_control on the OpenVINO float model, ignored scope as Ultralytics sets it."""
    import nncf
    import openvino as ov
    from ultralytics import YOLO

    from lowbit.evaluate.coco import coco_map, detections_to_coco
    from lowbit.models.decode import decode

    t = time.perf_counter()
    src = work / Path(model).name
    f = YOLO(str(src) if src.exists() else model).export(format="openvino", imgsz=640, batch=1)
    ov_model = ov.Core().read_model(str(next(Path(f).glob("*.xml"))))
    ops = ov_model.get_ordered_ops()
    head = [op.get_friendly_name() for op in ops if op.get_type_name() == "Sigmoid"][-1].split("/", 1)[0]
    ignored = nncf.IgnoredScope(names=[op.get_friendly_name() for op in ops if op.get_type_name() == "Sigmoid"
                                       or op.get_friendly_name().startswith((f"{head}/", f"{head}.dfl"))])
    cat_ids = {i: next(c["id"] for c in coco["categories"] if c["name"] == n) for i, n in names.items()}

    def validation_fn(compiled, data) -> float:
        dets = []
        for b in data:
            out = torch.from_numpy(compiled(b.images.numpy())[0])
            dets += detections_to_coco(b, decode(out, len(names), 640), 640, cat_ids)
        return coco_map(coco, dets)["map50_95"]

    q = nncf.quantize_with_accuracy_control(
        ov_model, nncf.Dataset(calib, lambda b: b.images.numpy()), nncf.Dataset(validate, lambda b: b),
        validation_fn=validation_fn, max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
        preset=nncf.QuantizationPreset.MIXED, ignored_scope=ignored, subset_size=len(calib))
    out = work / "nncf-accuracy-control"
    out.mkdir(exist_ok=True)
    ov.save_model(q, str(out / "model.xml"))
    return out, time.perf_counter() - t


def modelopt_onnx_int8(float_onnx: Path, images: np.ndarray, work: Path) -> tuple[Path, float]:
    from modelopt.onnx.quantization import quantize  # needs benchmarks/modelopt_onnx_env.sh

    t = time.perf_counter()
    out = work / "modelopt-onnx-int8.onnx"
    quantize(onnx_path=str(float_onnx), quantize_mode="int8", calibration_data={"images": images},
             calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(out))
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="../shared/assets/models/yolov10n/yolov10n.pt")
    ap.add_argument("--shared", default="../shared/assets")
    ap.add_argument("--work", default="runs/peers")
    ap.add_argument("--out", required=True)
    ap.add_argument("--draws", type=int, default=3, help="calibration draws of lowbit's OpenVINO artifact")
    ap.add_argument("--draw-images", type=int, default=192)
    ap.add_argument("--scheme", action="append", default=[], help="a manifest to add (e.g. a study's mixed scheme)")
    ap.add_argument("--speed-only", action="store_true", help="no accuracy (a model built from a yaml)")
    ap.add_argument("--skip", default="", help="comma list of peers to leave out: ac, modelopt")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--throughput-rounds", type=int, default=8, help="interleaved rounds of OpenVINO throughput")
    a = ap.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shared = Path(a.shared)
    calib_yaml = writable_copy(shared / "coco-calib-train", work / "data" / "coco-calib-train")
    out = read_json(a.out) if Path(a.out).is_file() else {}
    out.setdefault("artifacts", {})
    art = out["artifacts"]

    det = load_detector(a.model, 640)
    float_onnx = work / "float.onnx"
    onnx.save(export_float_onnx(copy.deepcopy(det.net), 640), str(float_onnx))
    art["FP32"] = {"path": str(float_onnx), "runtime": "openvino", "seconds": 0}
    calib = load_dataset(calib_yaml)
    calib_batches = make_batches(calib, 640, 1)
    images = torch.cat([b.images for b in calib_batches]).numpy()
    skip = set(a.skip.split(","))

    if "Ultralytics+NNCF INT8" not in art:
        path, s = ultralytics_int8(a.model, calib_yaml, work)
        art["Ultralytics+NNCF INT8"] = {"path": str(path), "runtime": "openvino", "seconds": s}
    if "ac" not in skip and not a.speed_only and "NNCF accuracy control" not in art:
        path, s = nncf_accuracy_control(a.model, calib_batches, calib_batches, calib.coco, det.names, work)
        art["NNCF accuracy control"] = {"path": str(path), "runtime": "openvino", "seconds": s}
    if "modelopt" not in skip and "ModelOpt ONNX INT8" not in art:
        path, s = modelopt_onnx_int8(float_onnx, images, work)
        art["ModelOpt ONNX INT8"] = {"path": str(path), "runtime": "onnxruntime", "seconds": s}
    write_json(a.out, out)

    def lowbit(name, fmt, target, calib_cfg, manifest=None):
        if name in art:
            return
        t = time.perf_counter()
        info = run_quantize_onnx(QuantizeOnnxConfig(model=str(float_onnx), onnx=str(work / f"{name}.onnx"), formats=fmt,
                                                    manifest=manifest, target=target, calib=calib_cfg,
                                                    calibration=ActivationCalibration()), work / "runs" / name, False)
        art[name] = {"path": info.path, "runtime": "openvino" if target == "openvino-cpu" else "onnxruntime",
                     "seconds": time.perf_counter() - t, "target": target}
        write_json(a.out, out)

    full = DataConfig(path=str(calib_yaml))
    lowbit("lowbit W8A8 openvino-cpu", "W8A8", "openvino-cpu", full)
    for d in range(a.draws if not a.speed_only else 0):
        lowbit(f"lowbit W8A8 openvino-cpu, draw {d}", "W8A8", "openvino-cpu",
               DataConfig(path=str(calib_yaml), max_images=a.draw_images, seed=d))
    if not a.speed_only:
        lowbit("lowbit W8A8 tensorrt", "W8A8", "tensorrt", full)
        lowbit("lowbit W8A8-FP8:pc tensorrt", "W8A8-FP8:pc", "tensorrt", full)
    for m in a.scheme:
        man = Manifest.load(m)
        lowbit(f"lowbit {man.name} openvino-cpu", None, "openvino-cpu", full, m)

    if not a.speed_only:
        for split in ("coco-val800", "coco-val200"):
            data = DataConfig(path=str(shared / split / f"{split}.yaml"))
            for name, x in art.items():
                key = f"eval {split}"
                if key in x:
                    continue
                folder = work / "evals" / split / name.replace(" ", "_").replace(":", "_").replace(",", "")
                res = run_eval(EvalConfig(model=x["path"], data=data, runtime=x["runtime"], batch=8), folder, False)
                x[key] = {"map50_95": res.map50_95, "run": str(folder), "runtime": res.runtime}
                write_json(a.out, out)
            runs = [art["FP32"][f"eval {split}"]["run"]] + [x[f"eval {split}"]["run"] for n, x in art.items() if n != "FP32"]
            cmp = run_compare(CompareConfig(runs=runs), work / "compare" / split, False)
            for row, name in zip(cmp.rows[1:], [n for n in art if n != "FP32"]):
                art[name][f"eval {split}"].update(delta=row.delta, delta_se=row.delta_se)
            ref = art["Ultralytics+NNCF INT8"][f"eval {split}"]["run"]
            cmp = run_compare(CompareConfig(runs=[ref] + [x[f"eval {split}"]["run"] for n, x in art.items()
                                                          if n.startswith("lowbit")]), work / "compare-nncf" / split, False)
            for row, name in zip(cmp.rows[1:], [n for n in art if n.startswith("lowbit")]):
                art[name][f"eval {split}"].update(vs_nncf=row.delta, vs_nncf_se=row.delta_se)
            write_json(a.out, out)

    timed = [n for n, x in art.items() if x["runtime"] == "openvino" or n.startswith("ModelOpt")]
    res = run_bench(BenchConfig(models=[art[n]["path"] for n in timed], threads=a.threads, reps=a.reps,
                                verify=DataConfig(path=str(calib_yaml)), throughput_rounds=a.throughput_rounds),
                    work / "bench", False)
    results = [r.model_dump(mode="json") for r in res.results]
    out["bench"] = {"host": res.host, "models": timed, "results": results}
    write_json(a.out, out)
    for n in timed:
        rows = {r["runtime"]: r for r in results if r["model"] == art[n]["path"]}
        ov = rows.get("openvino-cpu", {})
        print(f"{n:40s} {ov.get('median_ms') or 0:6.1f} ms x{ov.get('speedup') or 0:.2f} (f32 x{ov.get('speedup_vs_f32') or 0:.2f})"
              f" {art[n].get('eval coco-val800', {}).get('map50_95', '')}")


if __name__ == "__main__":
    main()
