"""The one-command study: baseline -> sensitivity -> schemes -> materialize -> evaluate -> report.

Each stage's output lives under `<out>/cache/<stage>-<hash>/`, the hash covering the stage's inputs
and everything upstream of it, so a re-run after a crash, or with one setting changed, redoes only
the stages whose inputs changed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

from pydantic import BaseModel

from lowbit import targets
from lowbit.api import demo_assets, run_sensitivity, search_problem, search_schemes
from lowbit.config import SearchSpec, SensitivityConfig, SensitivitySpec, StudyConfig
from lowbit.data.datasets import assert_disjoint
from lowbit.data.loader import make_batches
from lowbit.errors import LowbitError
from lowbit.evaluate.bench import bench_models, host_cpu
from lowbit.evaluate.coco import EvalResult, evaluate, load_detections, save_detections
from lowbit.finetune.blockwise import finetune
from lowbit.export.onnx_qdq import export_float_onnx, export_qdq_onnx
from lowbit.formats import parse_format
from lowbit.io import RunDir, read_json, write_json
from lowbit.models.ultralytics import load_detector
from lowbit.progress import step
from lowbit.quantize.apply import apply_manifest, load_quantized, save_quantized
from lowbit.quantize.manifest import Manifest
from lowbit.search import allocate
from lowbit.sensitivity.base import SensitivityContext, fingerprint
from lowbit.sensitivity.gradient import modelopt_choice
from lowbit.sensitivity.report import SensitivityReport


class SchemeResult(BaseModel):
    manifest: Manifest
    result: EvalResult
    seconds: float
    deployable: bool = True  # the target runs every quantized layer in low precision (lowbit.targets)
    deploy_note: str = ""
    artifact: str | None = None  # the Q/DQ ONNX scored on the target's runtime, relative to the run folder


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


@dataclasses.dataclass
class StudyContext:
    """What every stage of one study shares: its config, model, data, run folder and caches."""

    cfg: StudyConfig
    det: object  # lowbit.models.ultralytics.Detector
    run: RunDir
    calib: object  # Dataset
    evalset: object  # Dataset
    progress: bool = True
    grams: dict = dataclasses.field(default_factory=dict)  # output-aware clipping statistics, shared by every scheme
    work: dict = dataclasses.field(default_factory=lambda: {"evaluated": 0, "cached": 0})
    _batches: tuple | None = None

    @functools.cached_property
    def groups(self) -> dict[str, int]:
        """Layer -> convolution groups (a depthwise conv has one per channel)."""
        return {layer.name: getattr(self.det.net.get_submodule(layer.name), "groups", 1) for layer in self.det.layers()}

    @functools.cached_property
    def data_key(self) -> tuple:
        return (self.cfg.model, self.cfg.imgsz, [str(r.path) for r in self.calib.images],
                [str(r.path) for r in self.evalset.images])

    def batches(self) -> tuple:
        """(calibration batches, evaluation batches), loaded on first use."""
        if self._batches is None:
            self._batches = (make_batches(self.calib, self.cfg.imgsz, 8, progress=self.progress),
                             make_batches(self.evalset, self.cfg.imgsz, self.cfg.eval_batch, progress=self.progress))
        return self._batches

    def stage(self, name: str, *inputs) -> Stage:
        return Stage(self.run.path, name, *inputs)


def run_study(cfg: StudyConfig, out: str | Path | None = None, progress: bool = True) -> dict:
    """The study, in this process or, started by `torchrun`, spread over its workers (lowbit.distributed): each
    worker scores its share of the schemes and fine-tunes, rank 0 writes the report and times the artifacts and
    returns the summary (the other workers return {"rank": r})."""
    from lowbit import distributed

    workers = distributed.start(cfg.device)
    summary = _run_study(cfg, out, progress, workers)
    distributed.stop(workers)  # on an error the process ends instead, and torchrun stops the other workers
    return summary


def _run_study(cfg: StudyConfig, out: str | Path | None, progress: bool, workers) -> dict:
    import shutil

    import onnx
    import torch

    from lowbit.report.study_report import write_study_report

    if workers.world > 1:
        cfg = cfg.model_copy(update={"device": workers.device})
        out = workers.broadcast(str(out or RunDir.default_root("study")))
        progress = progress and workers.leader
    run = RunDir(out, "study", log_name="run.log" if workers.leader else f"run.rank{workers.rank}.log")
    if workers.leader:
        run.write_json("config.json", cfg)
    log = run.log
    tgt = targets.get_target(cfg.target)
    det = load_detector(cfg.model, cfg.imgsz)
    det.net.to(cfg.device)
    ctx = StudyContext(cfg, det, run, cfg.calib.load(), cfg.eval.load(), progress)
    evalset, data_key, work, grams, batches = ctx.evalset, ctx.data_key, ctx.work, ctx.grams, ctx.batches
    groups = ctx.groups

    def eval_stage(m: Manifest | None):
        """(the scheme's stage, the target's verdict on it, whether it is scored as a graph)."""
        verdict = targets.check(cfg.target, m, groups) if m is not None else None
        graph = tgt.name != "size" and (verdict is None or verdict.deployable)
        how = (cfg.target, cfg.activation.model_dump()) if graph else "torch"
        st = ctx.stage("eval", data_key, m.model_dump(mode="json", exclude={"name", "origin"}) if m else "FP32", how)
        return st, verdict, graph

    def evaluate_scheme(m: Manifest | None) -> SchemeResult:
        """A scheme the target runs in low precision is scored as its Q/DQ ONNX on the target's runtime (the float
        model as lowbit's float export); any other, and every scheme of a `size` study, as PyTorch fake quant."""
        st, verdict, graph = eval_stage(m)
        if st.done:
            work["cached"] += 1
            res = _load_result(st)
            if m is not None:
                res.manifest = m
            return res
        cb, eb = batches()
        t = time.perf_counter()
        name = m.name if m else "FP32"
        with step(f"{name}: quantizing" + (f" and exporting for {cfg.target}" if graph else ""), progress):
            net = det.net if m is None else apply_manifest(det, m, cb, grams)
            artifact = None
            if graph:
                st.path.mkdir(parents=True, exist_ok=True)
                artifact = st.path / "model.onnx"
                if m is None:
                    onnx.save(export_float_onnx(det.net, cfg.imgsz), str(artifact))
                else:
                    export_qdq_onnx(det.net, net, m, artifact, target=cfg.target,
                                    calib_images=torch.cat([b.images for b in cb]).numpy(), calibration=cfg.activation)
        if graph:
            res = evaluate(str(artifact), evalset, det.names, cfg.imgsz, cfg.eval_batch, batches=eb, progress=progress,
                           model_name=name, runtime=tgt.runtime, threads=cfg.speed_threads)
        else:
            res = evaluate(net, evalset, det.names, cfg.imgsz, cfg.eval_batch, cfg.device, batches=eb,
                           progress=progress, model_name=name)
        manifest = m or Manifest(name="FP32", model=cfg.model, imgsz=cfg.imgsz, layers={})
        out = SchemeResult(manifest=manifest, result=res, seconds=time.perf_counter() - t,
                           deployable=verdict is None or verdict.deployable,
                           deploy_note="float" if verdict is None else verdict.summary(),
                           artifact=str(artifact.relative_to(run.path)) if artifact else None)
        if m is not None and cfg.save_checkpoints:
            save_quantized(net, m, st.path / "checkpoint")
        _save_result(st, out)
        st.finish()
        work["evaluated"] += 1
        log.info("%s: mAP50-95 %.4f on %s (%.1f s)", manifest.name, res.map50_95, res.runtime, out.seconds)
        return out

    reports, sens_path, manifests = _schemes(ctx) if workers.leader else ({}, None, None)
    manifests = workers.broadcast(manifests)
    todo: list[Manifest | None] = [None, *manifests]
    # schemes with the same layers share one stage: dealt out once, so no two workers write one stage
    for m in workers.share(list({eval_stage(m)[0].key: m for m in todo}.values())):
        evaluate_scheme(m)
    workers.barrier()
    done = workers.sum(dict(work))
    results = [evaluate_scheme(m) for m in todo]  # every worker's results, from the stage cache
    work.update(done)
    results[0].manifest.stats = Manifest.uniform(cfg.model, det.layers(), "FP16").stats
    if cfg.finetune is not None:
        results += _finetune_stage(ctx, results, workers)
    if not workers.leader:
        return {"rank": workers.rank}
    speed = _speed_stage(ctx, results) if tgt.speed else None
    errors = ctx.stage("errors", data_key, cfg.error_halves).path / "delta-se.json"
    summary = write_study_report(cfg, results, reports, run.path, _delta_errors(results, evalset, cfg.error_halves, errors),
                                 speed)
    best = next((r for r in results if r.manifest.name == summary["recommended"]), None)
    if best is not None and best.artifact:
        shutil.copy(run.path / best.artifact, run.file("recommended.onnx"))
        if tgt.runtime == "openvino":  # also as the IR Ultralytics and OpenVINO load directly
            from lowbit.export.openvino_ir import save_openvino_ir

            summary["openvino_ir"] = str(save_openvino_ir(run.file("recommended.onnx"),
                                                          run.file("recommended_openvino_model")))
    elif best is not None and tgt.name == "size":
        summary["onnx"] = _export_recommended(ctx, best)
    summary["work"] = work
    summary["workers"] = workers.world
    summary["folder"] = str(run.path)
    summary["sensitivity"] = {m: str((sens_path / m).relative_to(run.path)) for m in reports} if reports else {}
    run.write_json("summary.json", summary)
    return summary


def _schemes(ctx: StudyContext) -> tuple[dict[str, SensitivityReport], Path | None, list[Manifest]]:
    """(sensitivity reports, their stage folder, the study's schemes): the uniform formats, each search's
    allocations from the sensitivity stage, and the config's own manifests."""
    cfg, det, batches, data_key, progress = ctx.cfg, ctx.det, ctx.batches, ctx.data_key, ctx.progress
    manifests: list[Manifest] = [Manifest.uniform(cfg.model, det.layers(), f, weights=cfg, imgsz=cfg.imgsz)
                                 for f in cfg.uniform]

    reports: dict[str, SensitivityReport] = {}
    sens_dir = sens_path = None
    searches = cfg.search
    if cfg.sensitivity is not None or any(s.budgets or s.topk or s.pareto_points for s in searches):
        formats = list(dict.fromkeys(f for s in searches for f in s.formats))
        methods = list(dict.fromkeys(s.method for s in searches))
        spec = cfg.sensitivity or SensitivitySpec(methods=methods, formats=formats)
        scfg = SensitivityConfig(model=cfg.model, calib=spec.scoring_data(cfg.calib), imgsz=cfg.imgsz, device=cfg.device,
                                 **cfg.weight_options(), target=cfg.target,
                                 **spec.model_dump(exclude={"images"}))
        st = ctx.stage("sensitivity", scfg.model_dump(mode="json"), data_key)
        sens_path = st.path
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
            manifests += search(ctx, spec_i, reports, scoring, reuse)
    manifests += [Manifest.load(s) for s in cfg.schemes]
    return reports, sens_path, manifests


def search(ctx: StudyContext, s: SearchSpec, reports: dict[str, SensitivityReport], scoring_batches=None,
           sens_dir: Path | None = None) -> list[Manifest]:
    """The study's schemes from one search spec: lowbit's allocations and, if asked, ModelOpt's own (scored on
    `scoring_batches()`, reusing the gradient scores in `sens_dir` when it has them)."""
    cfg = ctx.cfg
    if s.method not in reports:
        raise LowbitError(f"search.method {s.method!r} is not among the sensitivity methods {sorted(reports)}")
    if s.target is None and cfg.target != "size":
        s = s.model_copy(update={"target": cfg.target})
    out = search_schemes(reports[s.method], s, cfg, ctx.groups) if (
        s.budgets or s.topk or s.pareto_points) else []
    if s.modelopt_budgets:
        problem, _ = search_problem(reports[s.method], s, cfg, ctx.groups)
        out += _modelopt_manifests(ctx, s, problem, scoring_batches(), sens_dir)
    return out


def _modelopt_manifests(ctx: StudyContext, s: SearchSpec, problem, calib_batches, sens_dir: Path | None) -> list[Manifest]:
    """ModelOpt auto_quantize's own allocation at each budget, from one cached scoring pass (the
    sensitivity stage's, when it ran the gradient method on the same formats)."""
    import shutil

    st = ctx.stage("modelopt-autoquant", ctx.data_key, s.formats)
    st.path.mkdir(parents=True, exist_ok=True)
    scored = sens_dir / "autoquant-gradient.pth" if sens_dir else None
    if scored and scored.is_file() and not (st.path / "autoquant.pth").is_file():
        shutil.copy(scored, st.path / "autoquant.pth")
    sctx = SensitivityContext(ctx.det, calib_batches, [parse_format(f) for f in s.formats],
                              ctx.det.quantizable_layers(), ctx.cfg.device, progress=False)
    out = []
    for b in s.modelopt_budgets:
        assign = modelopt_choice(sctx, b, str(st.path / "autoquant.pth"))
        full = {layer.name: assign.get(layer.name, allocate.FP16) for layer in problem.layers}
        out.append(problem.manifest(f"modelopt-autoquant-{b:g}", full, {"kind": "modelopt", "effective_bits": b}))
    st.finish()
    return out


def _finetune_stage(ctx: StudyContext, results: list[SchemeResult], workers=None) -> list[SchemeResult]:
    """Fine-tune each named scheme from the float model on the calibration images (never the evaluation set);
    with several workers, each tunes its share and every worker then reads all from the stage cache."""
    from lowbit.distributed import Workers

    workers = workers or Workers(device=ctx.cfg.device)
    spec = ctx.cfg.finetune
    pieces = [(name, seed) for name in dict.fromkeys(spec.schemes) for seed in (spec.seeds or [None])]
    before = dict(ctx.work)
    for piece in workers.share(pieces):
        _finetune_stage_one(ctx, results, [piece])
    workers.barrier()
    done = workers.sum({k: ctx.work[k] - before[k] for k in before})
    out = _finetune_stage_one(ctx, results, pieces)
    ctx.work.update({k: before[k] + done[k] for k in before})
    return out


def _finetune_stage_one(ctx: StudyContext, results: list[SchemeResult],
                        pieces: list[tuple[str, int | None]]) -> list[SchemeResult]:
    cfg, det, run, calib, evalset, progress = ctx.cfg, ctx.det, ctx.run, ctx.calib, ctx.evalset, ctx.progress

    assert_disjoint(calib, evalset)
    by_name = {r.manifest.name: r for r in results}
    unknown = [n for n, _ in pieces if n not in by_name]
    if unknown:
        raise LowbitError(f"finetune.schemes: {unknown} not among the evaluated schemes ({', '.join(by_name)})")
    out = []
    for name, seed in pieces:
        ft = cfg.finetune.algorithm()
        ft = ft if seed is None else ft.model_copy(update={"seed": seed})
        src = by_name[name]
        st = ctx.stage("finetune", ctx.data_key, src.manifest.model_dump(mode="json", exclude={"name", "origin"}),
                   ft.model_dump())
        if st.done:
            ctx.work["cached"] += 1
            out.append(_load_result(st))
            continue
        cb, eb = ctx.batches()
        train = make_batches(calib, cfg.imgsz, ft.batch, progress=False)
        net = apply_manifest(det, src.manifest, cb, ctx.grams)
        res = finetune(net, det.net, train, ft, cfg.device, progress)
        m = src.manifest.model_copy(deep=True)
        m.name = f"{name}+ft" if seed is None else f"{name}+ft-s{seed}"
        m.origin = {**m.origin, "kind": "finetune", "base": name, "base_map50_95": src.result.map50_95,
                    "finetune": {**ft.model_dump(), "seconds": res.seconds, "steps": res.steps, "device": res.device},
                    "checkpoint": str((st.path / "checkpoint").relative_to(run.path))}
        r = evaluate(net, evalset, det.names, cfg.imgsz, cfg.eval_batch, cfg.device, batches=eb, progress=progress,
                     model_name=m.name)
        save_quantized(net.cpu(), m, st.path / "checkpoint")  # the export needs the learned weights
        net.to(cfg.device)
        sr = SchemeResult(manifest=m, result=r, seconds=res.seconds, deployable=src.deployable,
                          deploy_note=src.deploy_note + " (fine-tuned weights scored in PyTorch)")
        _save_result(st, sr)
        st.finish()
        ctx.work["evaluated"] += 1
        run.log.info("%s: mAP50-95 %.4f -> %.4f after AdaRound (%.1f s)", name, src.result.map50_95, r.map50_95,
                     res.seconds)
        out.append(sr)
    return out


def _speed_stage(ctx: StudyContext, results: list[SchemeResult]) -> dict:
    """Every scored artifact (the float export first) timed together on the target's runtime, interleaved, each
    runtime's detections checked against ONNX Runtime's first; cached by the artifacts and the machine."""
    import hashlib
    import platform

    cfg, run = ctx.cfg, ctx.run
    timed = [r for r in results if r.artifact]
    host = host_cpu(cfg.speed_threads)
    if len(timed) < 2:
        return {"rows": {}, "host": host, "timed": 0}
    digests = [hashlib.sha256((run.path / r.artifact).read_bytes()).hexdigest()[:16] for r in timed]
    st = ctx.stage("speed", digests, host, platform.node(), cfg.speed_threads, cfg.speed_reps, cfg.throughput_rounds)
    if not st.done:
        verify = make_batches(ctx.calib.subset(8, 0), cfg.imgsz, 1)
        rows = bench_models([run.path / r.artifact for r in timed], cfg.speed_threads, reps=cfg.speed_reps,
                            verify=verify, progress=ctx.progress, throughput_rounds=cfg.throughput_rounds)
        by_model = {}
        for r, path in zip(timed, [str(run.path / r.artifact) for r in timed]):
            by_model[r.manifest.name] = [b.model_dump(mode="json") for b in rows if b.model == path and b.present]
        write_json(st.path / "bench.json", {"host": host, "rows": by_model})
        st.finish()
    out = read_json(st.path / "bench.json")
    out["timed"] = len(timed)
    return out


def _export_recommended(ctx: StudyContext, best: SchemeResult) -> dict:
    """A `size` study's pick as a Q/DQ ONNX (INT4 weights as INT4 initializers): parity with PyTorch and its mAP
    under ONNX Runtime."""
    import torch

    from lowbit.report.study_report import append_onnx_section

    cfg, det, run = ctx.cfg, ctx.det, ctx.run
    cb, eb = ctx.batches()
    if best.manifest.origin.get("kind") == "finetune":  # learned weights: from the fine-tune stage's checkpoint
        net, _ = load_quantized(run.path / best.manifest.origin["checkpoint"], det)
    else:
        net = apply_manifest(det, best.manifest, cb)
    info = export_qdq_onnx(det.net, net.cpu(), best.manifest, run.file("recommended.onnx"), target="size",
                           parity_images=torch.cat([b.images for b in cb])[:4])
    ort = evaluate(info.path, ctx.evalset, det.names, cfg.imgsz, 1, progress=ctx.progress, model_name=best.manifest.name,
                   batches=eb)
    out = {"export": info.model_dump(), "ort_map50_95": ort.map50_95, "torch_map50_95": best.result.map50_95,
           "runtime": ort.runtime, "tensorrt": targets.check("tensorrt", best.manifest).summary()}
    append_onnx_section(run.path, best.manifest.name, out)
    return out


def demo_target() -> str:
    """The demo builds and times its artifacts on the CPU it runs on, so it writes them for that CPU: symmetric INT8
    activations where AMX runs them (openvino-amx), asymmetric UINT8 elsewhere (openvino-cpu)."""
    return "openvino-amx" if "amx_int8" in host_cpu()["isa"] else "openvino-cpu"


def run_demo(out: str | Path | None = None, progress: bool = True, quick: bool = False) -> tuple[dict, dict]:
    """The demo study on the carried YOLOv10n and images (lowbit/assets/study-demo.yaml): (study summary,
    {method: sensitivity report}). A re-run with the same `out` resumes from the study's cache. `quick`: the same
    stages at a toy size (160 px, 8 images each), for tests."""
    out = Path(out or "runs/demo")
    cfg = StudyConfig.load(demo_assets()["study"])
    cfg = cfg.model_copy(update={"target": demo_target()})
    if quick:
        cfg = cfg.model_copy(update={"imgsz": 160, "speed_reps": 3, "throughput_rounds": 2, "error_halves": 20,
                                     "calib": cfg.calib.model_copy(update={"max_images": 8}),
                                     "eval": cfg.eval.model_copy(update={"max_images": 8})})
    summary = run_study(cfg, out, progress)
    return summary, {m: SensitivityReport.load(out / p) for m, p in summary["sensitivity"].items()}
