"""The Python API behind the CLI: each function takes a typed config (lowbit.config, re-exported here), writes a
run folder and returns its results, so a notebook gets exactly what `lowbit <verb>` does."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from lowbit.config import (BenchConfig, CompareConfig, DataConfig, EvalConfig, ExportConfig,  # noqa: F401
                           FinetuneRunConfig, QuantizeConfig, QuantizeOnnxConfig, SearchConfig, SensitivityConfig)
from lowbit.data.datasets import Dataset, assert_disjoint
from lowbit.data.loader import image_array, make_batches
from lowbit.errors import LowbitError
from lowbit.evaluate.bench import BenchResult, bench_models, host_cpu
from lowbit.evaluate.coco import DETECTIONS, EvalResult, evaluate, load_detections, save_detections
from lowbit.evaluate.layer_latency import latency_table, predict_ms
from lowbit.evaluate.resampling import image_evals, paired_halves, standard_errors
from lowbit.export.onnx_qdq import export_qdq_onnx
from lowbit.finetune.blockwise import finetune
from lowbit.formats import parse_format
from lowbit.io import RunDir, read_json, write_json
from lowbit.models.layers import LayerInfo
from lowbit.models.onnx_detector import (class_names, graph_card, graph_input_size, graph_names, is_graph, load_card,
                                         openvino_model_file, save_card)
from lowbit.models.ultralytics import Detector, load_detector
from lowbit.quantize.apply import apply_manifest, checkpoint_manifest, load_quantized, save_quantized
from lowbit.quantize.manifest import Manifest, WeightOptions, scheme_stats
from lowbit.quantize.onnx_ptq import quantize_onnx, uniform_manifest
from lowbit.quantize.qdq import load_graph
from lowbit.search import allocate
from lowbit.sensitivity.base import NEEDS_LABELS, ScoreStore, SensitivityContext, fingerprint, get_method
from lowbit.sensitivity.onnx_node import onnx_layers
from lowbit.sensitivity.report import (SensitivityReport, agreement, agreement_markdown, build_report,
                                       write_report)
from lowbit.targets import get_target


class SchemeRow(BaseModel):
    scheme: str
    effective_weight_bits: float
    int4_share: float
    quantize_s: float
    checkpoint: str | None = None
    result: EvalResult | None = None


def demo_assets() -> dict[str, str]:
    root = resources.files("lowbit") / "assets"
    return {"model": str(root / "yolov10n.pt"),
            "val": str(root / "demo-val" / "annotations" / "instances_demo-val.json"),
            "calib": str(root / "demo-calib" / "images"),
            "study": str(root / "study-demo.yaml")}


def layers(model: str, imgsz: int | None = None) -> list[LayerInfo]:
    """Every conv/linear layer of a PyTorch model, or every Conv of an ONNX graph (named as lowbit.quantize.qdq
    names them: manifests for `quantize-onnx` use these names)."""
    if Path(model).suffix == ".onnx":
        graph = load_graph(model)
        return onnx_layers(graph, graph_card(model, imgsz, graph=graph)[1])
    return load_detector(model, imgsz or 640).layers()


def open_for_eval(model: str, dataset: Dataset, imgsz: int | None, preprocess: str | None = None,
                  decoder: str | None = None):
    """(runnable, class names, image size, model card or None) for a .pt/.yaml, a quantized checkpoint folder, an
    .onnx file or an OpenVINO IR. A graph's card (lowbit.models.onnx_detector) says how it is fed and decoded."""
    path = Path(model)
    if is_graph(path):
        if not path.exists():
            raise LowbitError(f"{path}: {'ONNX' if path.suffix == '.onnx' else 'model'} file not found")
        file = openvino_model_file(path)
        card = load_card(file, preprocess, decoder)
        size = graph_input_size(file)
        if imgsz is not None and size is not None and imgsz != size:
            raise LowbitError(f"{model}: its input takes {size}x{size} images; evaluate it with --imgsz {size}")
        return str(path), class_names(card, graph_names(file), dataset), imgsz or size or 640, card
    if preprocess or decoder:
        raise LowbitError("--preprocess and --decoder describe a graph lowbit did not export; a PyTorch model is "
                          "Ultralytics'")
    imgsz = imgsz or 640
    if path.is_dir():
        det, net, _ = open_checkpoint(path)
        return net, det.names, imgsz, None
    det = load_detector(model, imgsz)
    return det.net, det.names, imgsz, None


def open_checkpoint(path: str | Path) -> tuple[Detector, torch.nn.Module, Manifest]:
    """(the float detector, the quantized network, its manifest) of a checkpoint folder, each loaded once."""
    manifest = checkpoint_manifest(path)
    det = load_detector(manifest.model, manifest.imgsz)
    net, manifest = load_quantized(path, det)
    return det, net, manifest


def run_eval(cfg: EvalConfig, out: str | Path | None = None, progress: bool = True) -> EvalResult:
    run = RunDir(out, "eval")
    run.write_json("config.json", cfg)
    dataset = cfg.data.load()
    runnable, names, imgsz, card = open_for_eval(cfg.model, dataset, cfg.imgsz, cfg.preprocess, cfg.decoder)
    run.log.info("evaluating %s on %s (%d images)", cfg.model, dataset.source, len(dataset))
    res = evaluate(runnable, dataset, names, imgsz, cfg.batch, cfg.device, progress=progress,
                   model_name=cfg.model, threads=cfg.threads, runtime=cfg.runtime, card=card)
    run.write_json("results.json", res)
    save_detections(run.path, res.detections)
    run.log.info("mAP50-95 %.4f mAP50 %.4f latency %.1f ms", res.map50_95, res.map50, res.latency.median_ms)
    return res


class CompareRow(BaseModel):
    run: str
    model: str
    map50_95: float
    se: float  # standard error of this mAP50-95 over choices of images like these
    ci95: tuple[float, float]  # mAP50-95 +- 1.96 se
    delta: float  # mAP50-95 minus the reference's
    delta_se: float  # of the difference, both models scored on the same halves (paired)
    delta_ci95: tuple[float, float]


class Comparison(BaseModel):
    dataset: str
    images: int
    replicates: int
    seed: int
    rows: list[CompareRow]


def run_compare(cfg: CompareConfig, out: str | Path | None = None, progress: bool = True) -> Comparison:
    """Every run's mAP50-95 against the first run's, with standard errors and 95% intervals from paired
    resampling of the images (lowbit.evaluate.resampling): how much of a difference the images can resolve."""
    runs = [Path(r) for r in cfg.runs]
    configs, scored, found = [], [], []
    for r in runs:
        found.append(load_detections(r))
        if found[-1] is None:
            raise LowbitError(f"{r}: no {DETECTIONS}; compare takes run folders written by `lowbit eval` "
                              f"(rerun it on this model: older runs did not keep their detections)")
        configs.append(EvalConfig.model_validate(read_json(r / "config.json")))
        scored.append(read_json(r / "results.json"))
        if configs[-1].data != configs[0].data:
            raise LowbitError(f"{r}: evaluated on {configs[-1].data.model_dump()}, but {runs[0]} on "
                              f"{configs[0].data.model_dump()}; a paired comparison needs the same images")
    dataset = configs[0].data.load()
    evals = []
    for r, res, dets in zip(runs, scored, found):
        ev = image_evals(dataset.coco, dets)
        if abs(ev.map()[0] - res["map50_95"]) > 1e-9:  # the same images, labels and detections, or none of it holds
            raise LowbitError(f"{r}: its detections score {ev.map()[0]:.4f} on {dataset.source}, but its results.json "
                              f"says {res['map50_95']:.4f}; the labels or the run folder changed since it ran")
        evals.append(ev)
    run = RunDir(out, "compare")
    run.write_json("config.json", cfg)
    ses, delta_ses = standard_errors(paired_halves(evals, cfg.replicates, cfg.seed, progress))
    rows = []
    for r, res, se, dse in zip(runs, scored, ses.tolist(), delta_ses.tolist()):
        # intervals sit on the observed values, not on the halves' mean, which carries the smaller sample's
        # own bias
        m, d = res["map50_95"], res["map50_95"] - scored[0]["map50_95"]
        rows.append(CompareRow(run=str(r), model=res["model"], map50_95=m, se=se, ci95=(m - 1.96 * se, m + 1.96 * se),
                               delta=d, delta_se=dse, delta_ci95=(d - 1.96 * dse, d + 1.96 * dse)))
    result = Comparison(dataset=dataset.source, images=len(dataset), replicates=cfg.replicates, seed=cfg.seed,
                        rows=rows)
    run.write_json("results.json", result)
    run.log.info("compared %d runs on %s (%d images)", len(runs), dataset.source, len(dataset))
    return result


def run_quantize(cfg: QuantizeConfig, out: str | Path | None = None, progress: bool = True,
                 detector: Detector | None = None) -> list[SchemeRow]:
    """Quantize the model to each format (uniform) or manifest, save ModelOpt checkpoints, evaluate each beside FP32."""
    # fail on a bad name or file before any slow work
    formats = [Manifest.load(f) if f.endswith(".json") else parse_format(f) for f in cfg.formats]
    run = RunDir(out, "quantize")
    run.write_json("config.json", cfg)
    det = detector or load_detector(cfg.model, cfg.imgsz)
    det.net.to(cfg.device)
    calib = cfg.calib.load()
    calib_batches = make_batches(calib, cfg.imgsz, cfg.calib_batch, progress=progress)
    evalset = cfg.eval.load() if cfg.eval else None
    eval_batches = make_batches(evalset, cfg.imgsz, cfg.eval_batch, progress=progress) if evalset else None
    layer_info = det.layers()
    rows: list[SchemeRow] = []
    grams: dict = {}  # output-aware clipping statistics, shared by every format

    def score(net, name):
        if evalset is None:
            return None
        return evaluate(net, evalset, det.names, cfg.imgsz, cfg.eval_batch, cfg.device, batches=eval_batches,
                        progress=progress, model_name=name)

    if evalset is not None:
        rows.append(SchemeRow(scheme="FP32", effective_weight_bits=32, int4_share=0, quantize_s=0,
                              result=score(det.net, "FP32")))
    for fmt in formats:
        if isinstance(fmt, Manifest):
            # the manifest's own rounding and scales; its model must be the one given
            manifest = fmt.model_copy(update={"model": cfg.model, "imgsz": cfg.imgsz})
            manifest.stats = scheme_stats(manifest.layers, layer_info)
        elif fmt.is_float:
            continue
        else:
            manifest = Manifest.uniform(cfg.model, layer_info, fmt, cfg.algorithm, cfg, cfg.imgsz)
        run.log.info("quantizing to %s", manifest.name)
        t = time.perf_counter()
        net = apply_manifest(det, manifest, calib_batches, grams)
        dt = time.perf_counter() - t
        ckpt = None
        if cfg.save:
            ckpt = str(save_quantized(net, manifest, run.file(manifest.name.replace(":", "_"))))
        rows.append(SchemeRow(scheme=manifest.name, effective_weight_bits=manifest.stats.effective_weight_bits,
                              int4_share=manifest.stats.int4_share, quantize_s=dt, checkpoint=ckpt,
                              result=score(net, manifest.name)))
        run.write_json("results.json", rows)
        del net
    run.write_json("results.json", rows)
    return rows


def run_sensitivity(cfg: SensitivityConfig, out: str | Path | None = None, progress: bool = True,
                    detector: Detector | None = None) -> dict:
    """Score every (layer, format) with each method; resumable: re-run with the same `out` to continue."""
    import fnmatch

    methods = {m: get_method(m) for m in cfg.methods}
    formats = [parse_format(f) for f in cfg.formats]
    run = RunDir(out, "sensitivity")
    run.write_json("config.json", cfg)
    options = {"act_dtype": get_target(cfg.target).act_dtype}
    if cfg.model.endswith(".onnx"):  # no PyTorch source: only the ONNX-native method applies
        if set(methods) != {"onnx"}:
            raise LowbitError(f"{cfg.model}: an ONNX model is scored by the 'onnx' method only; "
                              f"{sorted(set(methods) - {'onnx'})} need the PyTorch model")
        graph = load_graph(cfg.model)
        card, imgsz = graph_card(cfg.model, cfg.imgsz, cfg.preprocess, graph=graph)
        pre = card.preprocess
        det, layers, options["onnx"], options["card"] = None, onnx_layers(graph, imgsz), graph, card
    else:
        imgsz, pre = cfg.imgsz or 640, None
        det = detector or load_detector(cfg.model, imgsz)
        layers = det.quantizable_layers()
    data = cfg.calib.load()
    if not data.has_labels and NEEDS_LABELS & set(methods):
        raise LowbitError(f"{data.source}: methods {sorted(NEEDS_LABELS & set(methods))} need labels; "
                          "use a data yaml or COCO json, or the label-free methods (distortion, gradient-selfsup, onnx)")
    if cfg.layers:
        layers = [x for x in layers if any(fnmatch.fnmatch(x.name, p) for p in cfg.layers)]
        if not layers:
            raise LowbitError(f"no quantizable layer matches {cfg.layers}")
    batches = make_batches(data, imgsz, cfg.batch, progress=progress, preprocess=pre)
    ctx = SensitivityContext(det, batches, formats, layers, cfg.device, progress, options={**options, "dataset": data},
                             weights=WeightOptions(**cfg.weight_options()))
    images = [str(r.path) for r in data.images]
    reports = {}
    for name, method in methods.items():
        store = ScoreStore(run.file(f"scores-{name}.jsonl"),
                           fingerprint(cfg.model, name, cfg.formats, images, imgsz, cfg.batch, [x.name for x in layers]))
        resumed = len(store.scores)
        run.log.info("method %s: %d scores already done", name, resumed)
        t = time.perf_counter()
        # ModelOpt's auto_quantize state (calibration + scores), reusable for budgets; one per method
        ctx.options["autoquant_checkpoint"] = str(run.file(f"autoquant-{name}.pth"))
        method(ctx, store)
        dt = time.perf_counter() - t
        rep = build_report(cfg.model, name, [f.name for f in formats], layers, store.table(), len(data), imgsz,
                           cfg.device, dt, resumed)
        write_report(rep, run.file(name), index_csv=run.path.parent / "sensitivity-index.csv")
        run.log.info("method %s: %.1f s", name, dt)
        reports[name] = rep
    if len(reports) > 1:
        rows = agreement(list(reports.values()), cfg.top_k)
        run.write_json("agreement.json", rows)
        run.write_text("agreement.md", agreement_markdown(rows))
    return reports


def run_export(cfg: ExportConfig, out: str | Path | None = None):
    """Q/DQ ONNX for a target from a quantized checkpoint, with its deployability and (optionally) output parity."""
    get_target(cfg.target)
    det, net, manifest = open_checkpoint(cfg.checkpoint)
    run = RunDir(out, "export")
    run.write_json("config.json", cfg)
    images = None
    if cfg.parity is not None:
        images = make_batches(cfg.parity.load(), manifest.imgsz, 1)
        images = torch.cat([b.images for b in images])
    calib = image_array(cfg.calib.load(), manifest.imgsz) if cfg.calib else None
    info = export_qdq_onnx(det.net, net, manifest, cfg.onnx or run.file("model.onnx"), parity_images=images,
                           target=cfg.target, calib_images=calib, calibration=cfg.calibration)
    run.write_json("results.json", info)
    return info


def run_quantize_onnx(cfg: QuantizeOnnxConfig, out: str | Path | None = None, progress: bool = True):
    """ONNX-native PTQ: a format or a manifest applied straight to a float .onnx, for a target."""
    if (cfg.formats is None) == (cfg.manifest is None):
        raise LowbitError("give exactly one of a format or a manifest")
    get_target(cfg.target)
    t = time.perf_counter()
    graph = load_graph(cfg.model)  # read once: the manifest, the card and the quantizer all use it
    card, imgsz = graph_card(cfg.model, cfg.imgsz, cfg.preprocess, graph=graph)
    manifest = (Manifest.load(cfg.manifest) if cfg.manifest
                else uniform_manifest(graph, cfg.model, cfg.formats, cfg.rounding or ("gptq" if cfg.calib else "nearest")))
    run = RunDir(out, "quantize-onnx")
    run.write_json("config.json", cfg)
    images = image_array(cfg.calib.load(), imgsz, card.preprocess) if cfg.calib else None
    out_path = Path(cfg.onnx or run.file("model.onnx"))
    info = quantize_onnx(graph, manifest, out_path, images, cfg.target, cfg.calibration, progress, card)
    if not card.is_default:  # the quantized graph is fed and decoded as its source: its card goes beside it
        save_card(card, out_path)
    info.seconds = time.perf_counter() - t
    run.write_json("results.json", info)
    run.log.info("wrote %s in %.1f s", info.path, info.seconds)
    return info


def run_finetune(cfg: FinetuneRunConfig, out: str | Path | None = None, progress: bool = True) -> dict:
    """Block-wise AdaRound of a quantized checkpoint from its float model; write the fine-tuned checkpoint and
    before/after mAP."""
    algo = cfg.algorithm()
    run = RunDir(out, "finetune")
    run.write_json("config.json", cfg)
    det, net, manifest = open_checkpoint(cfg.checkpoint)
    train = cfg.train.load()
    evalset = cfg.eval.load() if cfg.eval else None
    if evalset is not None:
        assert_disjoint(train, evalset)
    batches = make_batches(train, manifest.imgsz, algo.batch, progress=progress)
    eval_batches = make_batches(evalset, manifest.imgsz, cfg.eval_batch, progress=progress) if evalset else None

    def score(label):
        if evalset is None:
            return None
        return evaluate(net, evalset, det.names, manifest.imgsz, cfg.eval_batch, cfg.device, batches=eval_batches,
                        progress=progress, model_name=f"{manifest.name} {label}")

    before = score("before")
    res = finetune(net, det.net, batches, algo, cfg.device, progress)
    res.recipe = cfg.recipe  # the recipe the config starts from (the CLI overrides steps and seed)
    run.log.info("%s: %d steps in %.1f s, loss %.4g -> %.4g", res.recipe, res.steps, res.seconds,
                 res.first_loss, res.last_loss)
    manifest.origin = {**manifest.origin, "finetune": {**algo.model_dump(), "recipe": res.recipe,
                                                       "train": train.source, "images": len(train),
                                                       "seconds": res.seconds}}
    ckpt = save_quantized(net.cpu(), manifest, run.file("checkpoint"))
    net.to(cfg.device)
    after = score("after")
    result = {"checkpoint": str(ckpt), "finetune": res.model_dump(), "before": before.model_dump() if before else None,
              "after": after.model_dump() if after else None}
    run.write_json("results.json", result)
    return result


class BenchRun(BaseModel):
    host: dict
    results: list[BenchResult] = Field(default_factory=list)


def run_bench(cfg: BenchConfig, out: str | Path | None = None, progress: bool = True) -> BenchRun:
    """Latency of every graph on every runtime present, interleaved, after each runtime's outputs are checked."""
    run = RunDir(out, "bench")
    run.write_json("config.json", cfg)
    batches = None
    if cfg.verify_images:
        data = cfg.verify or DataConfig(path=demo_assets()["val"])
        batches = make_batches(data.model_copy(update={"max_images": cfg.verify_images}).load(), 640, 1)
    rows = bench_models(cfg.models, cfg.threads, cfg.warmup, cfg.reps, batches, progress=progress,
                        preprocess=cfg.preprocess, decoder=cfg.decoder, throughput_rounds=cfg.throughput_rounds)
    res = BenchRun(host=host_cpu(cfg.threads), results=rows)
    run.write_json("results.json", res)
    run.log.info("benchmarked %d graphs on %s", len(cfg.models), res.host["cpu"])
    return res


def search_problem(report, cfg: SearchConfig, weights: WeightOptions = WeightOptions(),
                   groups: dict[str, int] | None = None):
    """(the allocation problem of `report` under `cfg`'s formats and cost, the latency table or {})."""
    table = {}
    if cfg.latency_table:
        if not Path(cfg.latency_table).is_file():
            raise LowbitError(f"search.latency_table {cfg.latency_table}: file not found (make it with `lowbit latency-table`)")
        table = read_json(cfg.latency_table)
    return allocate.Problem(report, cfg.formats, cfg.allow_fp16, cfg.cost, table.get("layers"), weights=weights,
                            switch_ms=table.get("switch_ms"), edges=table.get("edges"),
                            target=cfg.target, groups=groups), table


def search_schemes(report, cfg: SearchConfig, weights: WeightOptions = WeightOptions(),
                   groups: dict[str, int] | None = None) -> list[Manifest]:
    """Manifests from a SensitivityReport as `cfg` asks, each with its predicted damage (and, with a latency
    table, its predicted latency) in `origin`."""
    p, table = search_problem(report, cfg, weights, groups)
    searched = [allocate.budget(p, b) for b in cfg.budgets]
    searched += [allocate.top_k(p, k, cfg.topk_low, cfg.topk_high) for k in cfg.topk]
    searched += allocate.pareto(p, cfg.pareto_points) if cfg.pareto_points else []
    if not searched:
        raise LowbitError("nothing to search: give budgets, top-K or Pareto points")
    if table:  # what the table expects, for a report to set beside the measured latency
        for m in searched:
            m.origin.update(predicted_ms=predict_ms(table, {n: f.name for n, f in m.layers.items()}),
                            predicted_float_ms=predict_ms(table, {}), latency_runtime=table.get("runtime"),
                            latency_threads=table.get("threads"))
    out = list(searched)
    # random baselines match a budget scheme's INT4 share, which a latency budget does not set
    for m in [m for m in searched if m.origin["kind"] == "budget" and cfg.cost != "latency"]:
        out += [allocate.random_like(p, m, cfg.topk_low, cfg.topk_high, seed) for seed in cfg.random_seeds]
    return out


def run_search(sensitivity: str | Path, cfg: SearchConfig, out: str | Path) -> list[tuple[Path, Manifest]]:
    """`search_schemes` on a sensitivity run's report (its method folder or the report JSON); writes one manifest
    per scheme into `out` (a folder of manifests, not a run folder) and returns (path, manifest) for each."""
    out = Path(out)
    return [(m.save(out / f"{m.name}.json"), m) for m in search_schemes(SensitivityReport.load(sensitivity), cfg)]


def run_latency_table(float_model: str | Path, quantized: dict[str, str | Path], out: str | Path,
                      threads: int | None = None, reps: int = 20) -> dict:
    """Per-layer conv latency at each precision (OpenVINO's CPU profiler) for the latency cost of a search:
    `quantized` maps a format to a uniform Q/DQ graph of it. Writes the JSON table to `out`."""
    for f, path in quantized.items():
        parse_format(f)
        if not Path(path).is_file():
            raise LowbitError(f"{path}: the {f} graph is not a file")
    table = latency_table(float_model, quantized, threads, reps)
    write_json(out, table)
    return table
