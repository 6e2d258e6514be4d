"""The one-command study: baseline -> sensitivity -> schemes -> materialize -> evaluate -> report.

Each stage's output lives under `<out>/cache/<stage>-<hash>/`, the hash covering the stage's inputs
and everything upstream of it, so a re-run after a crash, or with one setting changed, redoes only
the stages whose inputs changed.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from lowbit.api import DataConfig, SensitivityConfig, run_sensitivity
from lowbit.data.loader import make_batches
from lowbit.errors import LowbitError
from lowbit.evaluate.coco import EvalResult, evaluate, load_detections, save_detections
from lowbit.finetune.distill import FinetuneConfig, finetune
from lowbit.io import RunDir, read_json, write_json
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest, save_quantized
from lowbit.quantize.manifest import Manifest, WeightRange, WeightRefine
from lowbit.search import allocate
from lowbit.sensitivity.base import fingerprint
from lowbit.sensitivity.report import SensitivityReport


class SearchSpec(BaseModel):
    method: str = "gradient"  # which sensitivity report drives the allocation
    formats: list[str] = Field(default_factory=lambda: ["W4A16", "W8A16"])
    allow_fp16: bool = True
    cost: str = "weight_bits"  # or bitops, or latency (then budgets are profiled ms of the latency table)
    latency_table: str | None = None  # `lowbit latency-table` JSON, for cost: latency
    budgets: list[float] = Field(default_factory=lambda: [5.0, 5.6, 6.0])
    topk: list[int] = Field(default_factory=list)
    topk_low: str = "W4A16"
    topk_high: str = "W8A16"
    pareto_points: int = 0
    random_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    modelopt_budgets: list[float] = Field(default_factory=list)  # ModelOpt auto_quantize's own choice


class SensitivitySpec(BaseModel):
    """The study's sensitivity stage; model, size and device come from the study itself."""

    methods: list[str] = Field(default_factory=lambda: ["gradient"])
    formats: list[str] = Field(default_factory=lambda: ["W4A16", "W8A16"])
    batch: int = 8
    layers: list[str] | None = None
    # how many of the calibration images score the layers (the study's deterministic subset; default: all).
    # Apart because the two want different amounts: scoring costs a backward pass per image and format, while
    # GPTQ and fine-tuning gain from every calibration image there is (docs/results.md, section 7)
    images: int | None = Field(None, ge=1)

    def scoring_data(self, calib: DataConfig) -> DataConfig:
        if self.images is None or (calib.max_images and calib.max_images <= self.images):
            return calib
        return calib.model_copy(update={"max_images": self.images})


class FinetuneSpec(BaseModel):
    """Fine-tune evaluated schemes by distillation; each result joins the table as `<scheme>+ft`."""

    schemes: list[str] = Field(default_factory=lambda: ["W4A16"])  # scheme names; "recommended" = the pick
    config: FinetuneConfig = Field(default_factory=FinetuneConfig)


class StudyConfig(BaseModel):
    name: str = "study"
    model: str
    calib: DataConfig
    eval: DataConfig
    imgsz: int = 640
    device: str = "cpu"
    eval_batch: int = 8
    sensitivity: SensitivitySpec | None = None  # default: the search method on the search formats
    search: list[SearchSpec] = Field(default_factory=lambda: [SearchSpec()])  # one search per spec
    uniform: list[str] = Field(default_factory=lambda: ["W8A8", "W8A16", "W4A16"])
    schemes: list[str] = Field(default_factory=list)  # extra manifest files to evaluate
    max_drop_points: list[float] = Field(default_factory=lambda: [1.0, 2.0])
    weight_clip: WeightRefine = "gptq"  # for every scheme; "max" = ModelOpt max calibration alone
    weight_range: WeightRange = "full"  # integer weight scales for every scheme: "absmax" = ModelOpt's
    export_onnx: bool = True  # Q/DQ ONNX of the recommended scheme, checked with ONNX Runtime
    # batch-1 latency of every scheme's Q/DQ ONNX on every runtime present, beside its mAP (one export each)
    speed: bool = False
    speed_threads: int | None = None  # runtime threads for `speed` (default: the runtime's own)
    save_checkpoints: bool = False
    finetune: FinetuneSpec | None = None
    # random halves of the evaluation images behind each scheme's standard error of its Δ vs FP32 (0: none)
    error_halves: int = Field(200, ge=0)

    @field_validator("search", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, dict) else v

    @classmethod
    def load(cls, path: str | Path) -> "StudyConfig":
        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"{path}: study config not found")
        try:
            raw = yaml.safe_load(path.read_text())
            if not isinstance(raw, dict):
                raise LowbitError(f"{path}: a study config is a yaml mapping")
            # Paths in a config are relative to the config file, so a config travels with its data.
            resolve = lambda v: str((path.parent / v).resolve()) if (path.parent / v).exists() else v  # noqa: E731
            if isinstance(raw.get("model"), str):
                raw["model"] = resolve(raw["model"])
            for key in ("calib", "eval"):
                if isinstance(raw.get(key), dict) and isinstance(raw[key].get("path"), str):
                    raw[key]["path"] = resolve(raw[key]["path"])
            raw["schemes"] = [resolve(s) for s in raw.get("schemes", [])]
            for spec in [raw["search"]] if isinstance(raw.get("search"), dict) else raw.get("search") or []:
                if isinstance(spec, dict) and isinstance(spec.get("latency_table"), str):
                    spec["latency_table"] = resolve(spec["latency_table"])
            return cls.model_validate(raw)
        except yaml.YAMLError as e:
            raise LowbitError(f"{path}: malformed yaml ({e})") from None
        except ValidationError as e:
            err = e.errors()[0]
            raise LowbitError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class SchemeResult(BaseModel):
    manifest: Manifest
    result: EvalResult
    seconds: float


def _load_result(st: "Stage") -> SchemeResult:
    res = SchemeResult.model_validate(read_json(st.path / "result.json"))
    res.result.detections = load_detections(st.path) or []
    return res


def _save_result(st: "Stage", res: SchemeResult) -> None:
    save_detections(st.path, res.result.detections)
    write_json(st.path / "result.json", res)


def _delta_errors(results: list[SchemeResult], evalset, halves: int, cache: Path) -> dict[str, float]:
    """Standard error of each scheme's Δ vs FP32 over the choice of evaluation images (as `lowbit compare`);
    a scheme whose detections were not kept has none. Kept in `cache` by each scheme's detections (FP32's
    are fixed by the stage key), since re-scoring every scheme's halves costs seconds per scheme."""
    from lowbit.evaluate.resampling import image_evals, paired_halves, standard_errors

    if not halves or len(evalset) < 4 or not results[0].result.detections:
        return {}
    known = read_json(cache) if cache.is_file() else {}
    keys = {r.manifest.name: fingerprint(r.result.detections) for r in results[1:] if r.result.detections}
    todo = [r for r in results[1:] if r.manifest.name in keys and keys[r.manifest.name] not in known]
    if todo:
        evals = [image_evals(evalset.coco, r.result.detections) for r in [results[0], *todo]]
        _, delta_se = standard_errors(paired_halves(evals, halves))  # seed 0: FP32 always on the same halves
        known.update({keys[r.manifest.name]: float(delta_se[j]) for j, r in enumerate(todo, 1)})
        write_json(cache, known)
    return {name: known[k] for name, k in keys.items()}


class Stage:
    def __init__(self, root: Path, name: str, *inputs):
        self.key = fingerprint(name, *inputs)
        self.path = root / "cache" / f"{name}-{self.key}"
        self.done = (self.path / "DONE").is_file()

    def finish(self) -> None:
        (self.path / "DONE").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))


def run_study(cfg: StudyConfig, out: str | Path | None = None, progress: bool = True) -> dict:
    from lowbit.report.study_report import write_study_report

    run = RunDir(out, "study")
    run.write_json("config.json", cfg)
    log = run.log
    det = load_detector(cfg.model, cfg.imgsz)
    det.net.to(cfg.device)
    calib = cfg.calib.load()
    evalset = cfg.eval.load()
    data_key = (cfg.model, cfg.imgsz, [str(r.path) for r in calib.images], [str(r.path) for r in evalset.images])
    calib_batches = eval_batches = None
    work = {"evaluated": 0, "cached": 0}
    grams: dict = {}  # output-aware clipping statistics, shared by every scheme

    def batches():
        nonlocal calib_batches, eval_batches
        if calib_batches is None:
            calib_batches = make_batches(calib, cfg.imgsz, 8, progress=progress)
            eval_batches = make_batches(evalset, cfg.imgsz, cfg.eval_batch, progress=progress)
        return calib_batches, eval_batches

    def evaluate_scheme(m: Manifest | None) -> SchemeResult:
        st = Stage(run.path, "eval", data_key, m.model_dump(mode="json", exclude={"name", "origin"}) if m else "FP32")
        if st.done:
            work["cached"] += 1
            res = _load_result(st)
            if m is not None:
                res.manifest = m
            return res
        cb, eb = batches()
        t = time.perf_counter()
        net = det.net if m is None else apply_manifest(det, m, cb, grams)
        res = evaluate(net, evalset, det.names, cfg.imgsz, cfg.eval_batch, cfg.device, batches=eb,
                       progress=progress, model_name=m.name if m else "FP32")
        manifest = m or Manifest(name="FP32", model=cfg.model, imgsz=cfg.imgsz, layers={})
        out = SchemeResult(manifest=manifest, result=res, seconds=time.perf_counter() - t)
        if m is not None and cfg.save_checkpoints:
            save_quantized(net, m, st.path / "checkpoint")
        _save_result(st, out)
        st.finish()
        work["evaluated"] += 1
        log.info("%s: mAP50-95 %.4f (%.1f s)", manifest.name, res.map50_95, out.seconds)
        return out

    baseline = evaluate_scheme(None)
    baseline.manifest.stats = Manifest.uniform(cfg.model, det.layers(), "FP16").stats
    manifests: list[Manifest] = [Manifest.uniform(cfg.model, det.layers(), f, weight_clip=cfg.weight_clip,
                                                  imgsz=cfg.imgsz, weight_range=cfg.weight_range) for f in cfg.uniform]

    reports: dict[str, SensitivityReport] = {}
    sens_dir = None
    searches = cfg.search
    if cfg.sensitivity is not None or any(s.budgets or s.topk or s.pareto_points for s in searches):
        formats = list(dict.fromkeys(f for s in searches for f in s.formats))
        methods = list(dict.fromkeys(s.method for s in searches))
        spec = cfg.sensitivity or SensitivitySpec(methods=methods, formats=formats)
        scfg = SensitivityConfig(model=cfg.model, calib=spec.scoring_data(cfg.calib), imgsz=cfg.imgsz, device=cfg.device,
                                 weight_clip=cfg.weight_clip, weight_range=cfg.weight_range,
                                 **spec.model_dump(exclude={"images"}))
        st = Stage(run.path, "sensitivity", scfg.model_dump(mode="json"), data_key)
        sens_dir = st.path if "gradient" in scfg.methods else None
        if st.done:
            reports = {m: SensitivityReport.load(st.path / m) for m in scfg.methods}
        else:
            reports = run_sensitivity(scfg, st.path, progress=progress, detector=det)
            st.finish()
        # ModelOpt's own allocation scores on the sensitivity stage's images, as lowbit's did (loaded once)
        scoring = (lambda: batches()[0]) if scfg.calib == cfg.calib else functools.cache(
            lambda: make_batches(scfg.calib.load(), cfg.imgsz, 8, progress=False))
        for spec_i in searches:
            reuse = sens_dir if spec_i.formats == scfg.formats else None  # ModelOpt checks the formats match
            manifests += _search(cfg, spec_i, reports, det, scoring, run.path, data_key, reuse)
    manifests += [Manifest.load(s) for s in cfg.schemes]

    results = [baseline] + [evaluate_scheme(m) for m in manifests]
    errors = Stage(run.path, "errors", data_key, cfg.error_halves).path / "delta-se.json"
    summary = write_study_report(cfg, results, reports, run.path, _delta_errors(results, evalset, cfg.error_halves, errors))
    if cfg.finetune is not None:
        results += _finetune_stage(cfg, det, results, summary, calib, evalset, batches, data_key, grams, run, work, progress)
        summary = write_study_report(cfg, results, reports, run.path,
                                     _delta_errors(results, evalset, cfg.error_halves, errors))
    if cfg.export_onnx and summary["recommended"]:
        summary["onnx"] = _export_recommended(cfg, det, results, summary, batches, evalset, run, progress)
    if cfg.speed:
        summary["speed"] = _speed_stage(cfg, det, results, batches, run, progress)
    summary["work"] = work
    run.write_json("summary.json", summary)
    return summary


def _search(cfg: StudyConfig, s: SearchSpec, reports, det, scoring_batches, root: Path, data_key,
            sens_dir) -> list[Manifest]:
    if s.method not in reports:
        raise LowbitError(f"search.method {s.method!r} is not among the sensitivity methods {sorted(reports)}")
    table = {}
    if s.latency_table:
        if not Path(s.latency_table).is_file():
            raise LowbitError(f"search.latency_table {s.latency_table}: file not found (make it with `lowbit latency-table`)")
        table = read_json(s.latency_table)
    p = allocate.Problem(reports[s.method], s.formats, s.allow_fp16, s.cost, table.get("layers"), weight_clip=cfg.weight_clip,
                         weight_range=cfg.weight_range, switch_ms=table.get("switch_ms"), edges=table.get("edges"))
    searched = [allocate.budget(p, b) for b in s.budgets]
    searched += [allocate.top_k(p, k, s.topk_low, s.topk_high) for k in s.topk]
    searched += allocate.pareto(p, s.pareto_points) if s.pareto_points else []
    if table:  # what the table expects, for the report to set beside the measured latency
        from lowbit.evaluate.layer_latency import predict_ms

        for m in searched:
            m.origin.update(predicted_ms=predict_ms(table, {n: f.name for n, f in m.layers.items()}),
                            predicted_float_ms=predict_ms(table, {}), latency_runtime=table.get("runtime"),
                            latency_threads=table.get("threads"))
    out = list(searched)
    # random baselines match a budget scheme's INT4 share, which a latency budget does not set
    for m in [m for m in searched if m.origin["kind"] == "budget" and s.cost != "latency"]:
        out += [allocate.random_like(p, m, s.topk_low, s.topk_high, seed) for seed in s.random_seeds]
    if s.modelopt_budgets:
        out += _modelopt_manifests(cfg, s, det, p, scoring_batches(), root, data_key, sens_dir)
    return out


def _modelopt_manifests(cfg: StudyConfig, s: SearchSpec, det, problem, calib_batches, root: Path, data_key,
                        sens_dir: Path | None) -> list[Manifest]:
    """ModelOpt auto_quantize's own allocation at each budget, from one cached scoring pass (the
    sensitivity stage's, when it ran the gradient method on the same formats)."""
    import shutil

    from lowbit.formats import parse_format
    from lowbit.sensitivity.base import SensitivityContext
    from lowbit.sensitivity.gradient import modelopt_choice

    st = Stage(root, "modelopt-autoquant", data_key, s.formats)
    st.path.mkdir(parents=True, exist_ok=True)
    scored = sens_dir / "autoquant-gradient.pth" if sens_dir else None
    if scored and scored.is_file() and not (st.path / "autoquant.pth").is_file():
        shutil.copy(scored, st.path / "autoquant.pth")
    ctx = SensitivityContext(det, calib_batches, [parse_format(f) for f in s.formats],
                             det.quantizable_layers(), cfg.device, progress=False)
    out = []
    for b in s.modelopt_budgets:
        assign = modelopt_choice(ctx, b, str(st.path / "autoquant.pth"))
        full = {layer.name: assign.get(layer.name, allocate.FP16) for layer in problem.layers}
        out.append(problem.manifest(f"modelopt-autoquant-{b:g}", full, {"kind": "modelopt", "effective_bits": b}))
    st.finish()
    return out



def _finetune_stage(cfg: StudyConfig, det, results, summary, calib, evalset, batches, data_key, grams, run, work,
                    progress) -> list[SchemeResult]:
    """Distill each named scheme from the float model on the calibration images (never the evaluation set)."""
    from lowbit.data.datasets import assert_disjoint

    assert_disjoint(calib, evalset)
    by_name = {r.manifest.name: r for r in results}
    names = [summary["recommended"] if n == "recommended" else n for n in cfg.finetune.schemes]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise LowbitError(f"finetune.schemes: {unknown} not among the evaluated schemes ({', '.join(by_name)})")
    ft = cfg.finetune.config
    out = []
    for name in dict.fromkeys(names):
        src = by_name[name]
        st = Stage(run.path, "finetune", data_key, src.manifest.model_dump(mode="json", exclude={"name", "origin"}),
                   ft.model_dump())
        if st.done:
            work["cached"] += 1
            out.append(_load_result(st))
            continue
        cb, eb = batches()
        train = make_batches(calib, cfg.imgsz, ft.batch, progress=False)
        net = apply_manifest(det, src.manifest, cb, grams)
        res = finetune(net, det.net, train, ft, cfg.device, progress)
        m = src.manifest.model_copy(deep=True)
        m.name = f"{name}+ft"
        m.origin = {**m.origin, "kind": "finetune", "base": name, "base_map50_95": src.result.map50_95,
                    "finetune": {**ft.model_dump(), "seconds": res.seconds, "steps": res.steps, "device": res.device},
                    "checkpoint": str((st.path / "checkpoint").relative_to(run.path))}
        r = evaluate(net, evalset, det.names, cfg.imgsz, cfg.eval_batch, cfg.device, batches=eb, progress=progress,
                     model_name=m.name)
        save_quantized(net.cpu(), m, st.path / "checkpoint")  # the export needs the learned weights
        net.to(cfg.device)
        sr = SchemeResult(manifest=m, result=r, seconds=res.seconds)
        _save_result(st, sr)
        st.finish()
        work["evaluated"] += 1
        run.log.info("%s: mAP50-95 %.4f -> %.4f after %s (%.1f s)", name, src.result.map50_95, r.map50_95, ft.mode,
                     res.seconds)
        out.append(sr)
    return out


def _speed_vs_float(det, imgsz: int, qdq_path, float_path) -> list[dict]:
    """Batch-1 latency of the float and the Q/DQ ONNX on every runtime present (`lowbit bench`)."""
    import copy

    import onnx

    from lowbit.evaluate.bench import bench
    from lowbit.export.onnx_qdq import export_float_onnx

    onnx.save(export_float_onnx(copy.deepcopy(det.net), imgsz), str(float_path))
    base = {r.runtime: r for r in bench(float_path, reps=20) if r.present}
    rows = []
    for r in bench(qdq_path, reps=20):
        if not r.present:
            continue
        f = base.get(r.runtime)
        rows.append({"runtime": r.runtime, "float_ms": f.median_ms if f else None, "ms": r.median_ms,
                     "speedup": f.median_ms / r.median_ms if f and f.median_ms and r.median_ms else None, "note": r.note})
    return rows


def _speed_stage(cfg: StudyConfig, det, results, batches, run, progress) -> dict:
    """Every scheme exported as Q/DQ ONNX and timed on every runtime present, cached per layer assignment
    (a fine-tuned scheme runs exactly as fast as its base: same formats, same graph). ModelOpt max
    calibration stands in for the scheme's own rounding, which changes values, not speed."""
    import copy
    import platform

    import onnx

    from lowbit.evaluate.bench import bench, runtimes
    from lowbit.export.onnx_qdq import export_float_onnx, export_qdq_onnx
    from lowbit.progress import track
    from lowbit.report.study_report import append_speed_section

    present = sorted(name for name, (ok, _) in runtimes().items() if ok)
    machine = (platform.machine(), platform.processor() or platform.node(), cfg.speed_threads, present)
    rows, timed, cached = [], 0, 0
    for res in track(results, "speed of every scheme", enabled=progress):
        m = res.manifest
        layers = m.model_dump(mode="json", include={"model", "imgsz", "layers"}) if m.layers else "FP32"
        st = Stage(run.path, "speed", layers, cfg.imgsz, machine)
        if st.done:
            cached += 1
        else:
            st.path.mkdir(parents=True, exist_ok=True)
            path = st.path / "model.onnx"
            if not m.layers:
                onnx.save(export_float_onnx(copy.deepcopy(det.net).cpu(), cfg.imgsz), str(path))
            else:
                plain = m.model_copy(update={"weight_clip": "max"})
                export_qdq_onnx(det.net, apply_manifest(det, plain, batches()[0]).cpu(), plain, path)
            write_json(st.path / "bench.json", [r.model_dump() for r in bench(path, cfg.speed_threads, reps=20) if r.present])
            path.unlink()  # the timing is the product; the recommended scheme's ONNX is kept elsewhere
            st.finish()
            timed += 1
        rows.append({"scheme": m.name, "map50_95": res.result.map50_95, "bench": read_json(st.path / "bench.json"),
                     **{k: m.origin[k] for k in ("predicted_ms", "predicted_float_ms", "latency_runtime", "latency_threads")
                        if k in m.origin}})
    out = {"runtimes": present, "threads": cfg.speed_threads, "rows": rows, "timed": timed, "cached": cached}
    append_speed_section(run.path, out, cfg.max_drop_points)
    return out


def _export_recommended(cfg: StudyConfig, det, results, summary, batches, evalset, run, progress) -> dict:
    """The recommended scheme as a Q/DQ ONNX: parity with PyTorch and its mAP under ONNX Runtime."""
    import torch

    from lowbit.export.onnx_qdq import export_qdq_onnx
    from lowbit.report.study_report import append_onnx_section

    res = next(r for r in results if r.manifest.name == summary["recommended"])
    cb, eb = batches()
    if res.manifest.origin.get("kind") == "finetune":  # learned weights: from the fine-tune stage's checkpoint
        from lowbit.quantize.apply import load_quantized

        net, _ = load_quantized(run.path / res.manifest.origin["checkpoint"], det)
    else:
        net = apply_manifest(det, res.manifest, cb)
    info = export_qdq_onnx(det.net, net.cpu(), res.manifest, run.file("recommended.onnx"),
                           parity_images=torch.cat([b.images for b in cb])[:4])
    ort = evaluate(info.path, evalset, det.names, cfg.imgsz, 1, progress=progress, model_name=res.manifest.name,
                   batches=make_batches(evalset, cfg.imgsz, 1, progress=False))
    out = {"export": info.model_dump(), "ort_map50_95": ort.map50_95, "torch_map50_95": res.result.map50_95,
           "ort_latency_ms": ort.latency.median_ms, "runtime": ort.runtime,
           "speed": _speed_vs_float(det, cfg.imgsz, info.path, run.file("float.onnx"))}
    append_onnx_section(run.path, res.manifest.name, out)
    return out
