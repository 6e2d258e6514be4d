"""`lowbit` command line: parsing and printing only; the work is in lowbit.api."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from lowbit.errors import LowbitError
from lowbit.targets import DEFAULT_TARGET

app = typer.Typer(add_completion=False, no_args_is_help=False, help="Sensitivity-guided mixed-precision quantization for detectors.")
console = Console(width=None if sys.stdout.isatty() else 200)  # piped: wide enough for every table

MODEL = typer.Option(..., "--model", "-m", help="Ultralytics .pt, model .yaml, .onnx, or a lowbit checkpoint folder")
OUT = typer.Option(None, "--out", "-o", help="run folder (default: runs/<verb>-<time>)")
PREPROCESS = typer.Option(None, help="how a graph lowbit did not export takes its images: a preset (ultralytics, "
                          "yolox, torchvision, imagenet, paddle) and/or key=value (color=bgr, scale=1, mean=a/b/c, "
                          "std=a/b/c, resize=letterbox|letterbox-corner|stretch, pad=114, interp=linear|cubic|area); default: the model card beside it, "
                          "else Ultralytics'")
DECODER = typer.Option(None, help="how its outputs are read: ultralytics, yolox, gfl, boxes-scores, nms-inside (default: "
                       "the model card, else detected from the output shapes)")
TARGET_HELP = ("deployment target: openvino-cpu (asymmetric UINT8 activations quantized where produced), openvino-amx "
               "(symmetric INT8 activations where produced: Xeons with AMX), tensorrt (symmetric INT8/FP8 Q/DQ before "
               "each conv), onnxruntime-cpu, or size (storage only)")
TARGET = typer.Option(DEFAULT_TARGET, "--target", "-t", help=TARGET_HELP)
ACT_RANGE = typer.Option("mse", "--act-range", help="range of INT8 activations on the graph: mse (the clip with the "
                         "least output error), max, mean-minmax (mean over images of each image's range) or percentile")
KEEP_FLOAT = typer.Option(0, "--keep-float", help="also keep float the inputs of the K convs whose quantized input "
                          "most changes the detector's outputs, each measured alone on calibration images (targets "
                          "that quantize in front of each conv: tensorrt, onnxruntime-cpu)")
COMPOUNDING = typer.Option(True, "--compounding/--no-compounding", help="check the whole quantized graph against "
                           "the float one and keep float, one at a time, the activation quantizers whose errors "
                           "compound through it (each taking a good share of the head maps' error away)")
# old spellings, kept hidden for one release
OLD_ACT_RANGE = typer.Option(None, "--method", hidden=True)
CALIB_SEED = typer.Option(0, "--calib-seed", help="which random subset of the calibration images --calib-images "
                          "draws: another seed, another calibration draw")
CLIP = typer.Option("max", "--clip", help="integer weight clip per channel: max (ModelOpt's) or output (chosen by "
                    "the layer's output error)")
ROUNDING = typer.Option("gptq", "--rounding", help="weight rounding: gptq (integer and FP8 weights), gptq-seq (GPTQ on "
                        "the quantized network's own inputs; integer weights) or nearest")
RANGE = typer.Option("full", "--range", help="integer weight scales: full (the finer of max(w)/(2^(b-1)-1) and "
                     "-min(w)/2^(b-1), so -2^(b-1) is used) or absmax (ModelOpt's max calibration alone)")


def _weights(clip: str, rounding: str, weight_range: str) -> dict:
    """The weight options; `--clip gptq` (clip and rounding in one word, lowbit 0.1) still reads as it did."""
    from lowbit.quantize.manifest import split_weight_clip

    if clip not in ("max", "output"):
        if rounding != "gptq":
            raise LowbitError(f"--clip {clip} names a rounding too; give --clip max|output and --rounding {rounding}")
        return {**split_weight_clip({"weight_clip": clip}), "weight_range": weight_range}
    return {"weight_clip": clip, "rounding": rounding, "weight_range": weight_range}


def _data(path: str, images: Optional[str], max_images: Optional[int], seed: Optional[int]):
    from lowbit.config import DataConfig

    return DataConfig(path=path, images=images, max_images=max_images, seed=seed)


def _table(rows) -> Table:
    t = Table(title="lowbit results", caption="latency: model forward per image; ModelOpt fake quant runs in float, "
              "so its PyTorch latency says nothing about deployed speed")
    for col in ("scheme", "mAP50-95", "mAP50", "Δ vs FP32", "W bits", "INT4 share", "latency ms (p50/p90)", "runtime"):
        t.add_column(col, justify="right" if col != "scheme" else "left")
    base = next((r.result.map50_95 for r in rows if r.scheme == "FP32" and r.result), None)
    for r in rows:
        res = r.result
        if res is None:
            t.add_row(r.scheme, "-", "-", "-", f"{r.effective_weight_bits:.2f}", f"{r.int4_share:.0%}", "-", "-")
            continue
        delta = "" if base is None or r.scheme == "FP32" else f"{(res.map50_95 - base) * 100:+.1f} pt"
        known = r.effective_weight_bits == r.effective_weight_bits  # nan: a model whose scheme is not known
        t.add_row(r.scheme, f"{res.map50_95:.3f}", f"{res.map50:.3f}", delta,
                  f"{r.effective_weight_bits:.2f}" if known else "-", f"{r.int4_share:.0%}" if known else "-",
                  f"{res.latency.median_ms:.1f} / {res.latency.p90_ms:.1f}", res.runtime)
    return t


@app.command()
def layers(model: str = MODEL, imgsz: Optional[int] = typer.Option(None, help="image size for MACs (default: an ONNX "
                                                                        "graph's own, else 640)"),
           json_out: Optional[Path] = typer.Option(None, "--json", help="also write the table as JSON")):
    """List quantizable layers: name, type, weight shape, params, MACs."""
    from lowbit import api
    from lowbit.io import write_json

    info = api.layers(model, imgsz)
    t = Table(title=f"{model}: {sum(i.quantizable for i in info)} quantizable of {len(info)} conv/linear layers")
    for col in ("#", "layer", "type", "weight shape", "params", "MMACs", "role", "quantize"):
        t.add_column(col)
    for i, layer in enumerate(info):
        t.add_row(str(i), layer.name, layer.type, "x".join(map(str, layer.weight_shape)), f"{layer.params:,}",
                  f"{layer.macs / 1e6:.1f}", layer.role, "yes" if layer.quantizable else "never")
    console.print(t)
    console.print(f"total params {sum(i.params for i in info):,}, GMACs {sum(i.macs for i in info) / 1e9:.2f}")
    if json_out:
        write_json(json_out, info)


@app.command("eval")
def eval_(model: str = MODEL, data: str = typer.Option(..., "--data", "-d", help="data yaml, COCO json or folder"),
          images: Optional[str] = typer.Option(None, help="image folder for a COCO json"),
          max_images: Optional[int] = typer.Option(None, help="deterministic subset size"),
          seed: Optional[int] = typer.Option(0, help="subset seed"),
          imgsz: Optional[int] = typer.Option(None, help="input size (default: a graph's own, else 640)"),
          batch: int = 1, device: str = "cpu",
          preprocess: Optional[str] = PREPROCESS, decoder: Optional[str] = DECODER,
          runtime: Optional[str] = typer.Option(None, help="torch, onnxruntime, openvino (its default precision: BF16 "
                                                "on CPUs that have it) or openvino-f32; default: torch for a PyTorch "
                                                "model, onnxruntime for .onnx, openvino for an OpenVINO IR"),
          threads: Optional[int] = typer.Option(None, help="runtime threads"), out: Optional[Path] = OUT):
    """COCO mAP (pycocotools) and latency of a PyTorch model, a quantized checkpoint, an ONNX file or an OpenVINO IR,
    on the runtime that will run it."""
    from lowbit.config import EvalConfig
    from lowbit.api import SchemeRow, run_eval

    cfg = EvalConfig(model=model, data=_data(data, images, max_images, seed), imgsz=imgsz, batch=batch,
                     device=device, threads=threads, runtime=runtime, preprocess=preprocess, decoder=decoder)
    res = run_eval(cfg, out)
    bits, int4 = float("nan"), float("nan")  # unknown for a float model or an ONNX file
    if (Path(model) / "manifest.json").is_file():  # a quantized checkpoint states its scheme
        from lowbit.quantize.manifest import Manifest

        stats = Manifest.load(Path(model) / "manifest.json").stats
        bits, int4 = stats.effective_weight_bits, stats.int4_share
    console.print(_table([SchemeRow(scheme=Path(model).name, effective_weight_bits=bits, int4_share=int4,
                                    quantize_s=0, result=res)]))


@app.command()
def compare(runs: list[Path] = typer.Argument(..., help="two or more `lowbit eval` run folders; the first is the reference"),
            replicates: int = typer.Option(500, help="random halves of the images to score every model on"),
            seed: int = typer.Option(0, help="seed of the halves"), out: Optional[Path] = OUT):
    """mAP50-95 differences from the first run, with standard errors from paired resampling of the images."""
    from lowbit.config import CompareConfig
    from lowbit.api import run_compare

    res = run_compare(CompareConfig(runs=[str(r) for r in runs], replicates=replicates, seed=seed), out)
    t = Table(title=f"lowbit compare: {res.images} images of {res.dataset}",
              caption=f"standard errors over the choice of images ({res.replicates} random halves, every model on the "
              "same halves; 95% = +-1.96 SE); they leave out run-to-run spread (seeds), which only repeated runs measure")
    for col in ("run", "mAP50-95", "SE", "Δ vs first", "SE of Δ", "95% interval of Δ"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for i, r in enumerate(res.rows):
        first = i == 0
        t.add_row(Path(r.run).name, f"{r.map50_95:.4f}", f"{r.se:.4f}", "reference" if first else f"{r.delta * 100:+.2f} pt",
                  "" if first else f"{r.delta_se * 100:.2f} pt",
                  "" if first else f"{r.delta_ci95[0] * 100:+.2f} to {r.delta_ci95[1] * 100:+.2f} pt")
    console.print(t)


@app.command()
def quantize(model: str = MODEL,
             formats: Optional[str] = typer.Option(None, "--format", "-f", help="comma list, e.g. W8A8,W4A16:b64 (see "
                                                   "`lowbit formats`); default W8A8 unless --manifest is given"),
             manifest: Optional[list[Path]] = typer.Option(None, help="a manifest to materialize layer by layer (from "
                                                           "`lowbit search`, a study, or hand-written); repeat for more"),
             calib: str = typer.Option(..., help="calibration images: folder, data yaml, COCO json or list file"),
             calib_images: Optional[int] = typer.Option(256, help="calibration subset size, 0 for all (a fine-tune recovers more from a GPTQ start calibrated on all its training images: docs/results.md, fine-tuning)"),
             calib_seed: int = CALIB_SEED,
             data: Optional[str] = typer.Option(None, "--data", "-d", help="evaluate each result on this labelled set"),
             max_images: Optional[int] = None, imgsz: int = 640, algorithm: str = "max",
             clip: str = CLIP, rounding: str = ROUNDING, weight_range: str = RANGE, device: str = "cpu", out: Optional[Path] = OUT):
    """PTQ through ModelOpt, uniform per format or mixed per manifest: save a checkpoint each, evaluate each beside FP32."""
    from lowbit.config import QuantizeConfig
    from lowbit.api import run_quantize

    specs = [f for f in (formats or ("" if manifest else "W8A8")).split(",") if f] + [str(m) for m in manifest or []]
    cfg = QuantizeConfig(model=model, formats=specs, imgsz=imgsz,
                         calib=_data(calib, None, calib_images, calib_seed),
                         eval=_data(data, None, max_images, 0) if data else None, algorithm=algorithm,
                         **_weights(clip, rounding, weight_range), device=device)
    console.print(_table(run_quantize(cfg, out)))


@app.command()
def sensitivity(model: str = MODEL,
                calib: str = typer.Option(..., help="scoring images (labelled for gradient/ablation): data yaml, COCO json, folder"),
                method: str = typer.Option("distortion", help="comma list: distortion, gradient, gradient-selfsup, ablation, onnx (Q/DQ one Conv at a time in the ONNX graph; the only one for a .onnx model)"),
                formats: str = typer.Option("W4A16,W8A16", "--format", "--formats", "-f", help="comma list of formats to score"),
                calib_images: Optional[int] = typer.Option(32, "--calib-images", help="how many of the scoring images "
                                                          "(deterministic subset)"),
                old_images: Optional[int] = typer.Option(None, "--images", hidden=True),
                target: str = TARGET,
                batch: int = 8, imgsz: Optional[int] = typer.Option(None, help="input size (default: an ONNX graph's "
                                                                    "own, else 640)"), device: str = "cpu",
                preprocess: Optional[str] = PREPROCESS,
                layers: Optional[str] = typer.Option(None, help="comma list of layer-name globs to score"),
                clip: str = CLIP, rounding: str = ROUNDING, weight_range: str = RANGE, out: Optional[Path] = OUT):
    """Per-layer sensitivity: one report (JSON, Markdown, PNG) per method; re-run with the same --out to resume."""
    from lowbit.config import SensitivityConfig
    from lowbit.api import run_sensitivity

    cfg = SensitivityConfig(model=model, calib=_data(calib, None, old_images or calib_images, 0), methods=method.split(","),
                            formats=formats.split(","), batch=batch, imgsz=imgsz, device=device,
                            layers=layers.split(",") if layers else None,
                            **_weights(clip, rounding, weight_range), preprocess=preprocess, target=target)
    reports = run_sensitivity(cfg, out)
    for name, rep in reports.items():
        t = Table(title=f"{name}: most sensitive layers ({rep.seconds:.1f} s)")
        t.add_column("rank")
        t.add_column("layer")
        for f in rep.formats:
            t.add_column(f"{f} score", justify="right")
        f0 = rep.formats[0]
        for r in sorted((r for r in rep.rows if f0 in r.scores), key=lambda r: -r.scores[f0])[:10]:
            t.add_row(str(r.ranks[f0]), r.name, *(f"{r.scores.get(f, float('nan')):.4g}" for f in rep.formats))
        console.print(t)


@app.command()
def search(sensitivity: Path = typer.Option(..., "--sensitivity", "-s", help="a method folder of a sensitivity run (holds layer-sensitivity-report.json)"),
           formats: str = typer.Option("W4A16,W8A16", "--format", "--formats", "-f", help="candidate formats (comma list); FP16 is always allowed"),
           budget: Optional[str] = typer.Option(None, help="comma list of budgets (effective weight bits, or share of FP16 bit-ops with --cost bitops)"),
           topk: Optional[str] = typer.Option(None, help="comma list of K: K most sensitive layers at --high, the rest at --low"),
           low: str = "W4A16", high: str = "W8A16",
           pareto: int = typer.Option(0, help="points on the damage/cost front"),
           cost: str = typer.Option("weight_bits", help="weight_bits, bitops, or latency (needs --latency-table)"),
           latency_table: Optional[Path] = typer.Option(None, help="per-layer latency JSON from `lowbit latency-table`; budgets are then milliseconds of conv time and precision switches"),
           no_fp16: bool = typer.Option(False, "--no-fp16", help="every layer must take one of --formats"),
           target: str = TARGET,
           out: Path = typer.Option(Path("schemes"), "--out", "-o", help="folder for the manifests")):
    """Mixed-precision manifests from a sensitivity report: top-K, exact budget (integer program), Pareto front."""
    from lowbit.config import SearchConfig
    from lowbit.api import run_search

    saved = run_search(sensitivity, SearchConfig(
        formats=formats.split(","), allow_fp16=not no_fp16, cost=cost, latency_table=str(latency_table) if latency_table else None,
        budgets=[float(b) for b in budget.split(",")] if budget else [], topk=[int(k) for k in topk.split(",")] if topk else [],
        topk_low=low, topk_high=high, pareto_points=pareto, target=target), out)
    t = Table(title=f"schemes from {sensitivity}")
    for col in ("manifest", "INT4 share", "eff. W bits", "mean A bits", "predicted damage"):
        t.add_column(col)
    for path, m in saved:
        t.add_row(str(path), f"{m.stats.int4_share:.0%}", f"{m.stats.effective_weight_bits:.2f}",
                  f"{m.stats.mean_act_bits:.1f}", f"{m.origin['predicted_damage']:.4g}")
    console.print(t)


@app.command()
def study(config: Optional[Path] = typer.Argument(None, help="study yaml (see configs/)"),
          old_config: Optional[Path] = typer.Option(None, "--config", "-c", hidden=True), out: Optional[Path] = OUT):
    """Baseline -> sensitivity -> schemes -> materialize -> evaluate -> report; cached stages, so re-runs redo only what
    changed. Started by torchrun (`torchrun --nproc-per-node N $(which lowbit) study CONFIG`, `--nnodes` for several
    hosts), the schemes are spread over the workers."""
    from lowbit.config import StudyConfig
    from lowbit.study import run_study

    if (config is None) == (old_config is None):
        raise LowbitError("give the study's yaml: lowbit study CONFIG.yaml")
    cfg = StudyConfig.load(config or old_config)
    summary = run_study(cfg, out)
    if "rank" in summary:  # one of several workers (torchrun): rank 0 prints
        return
    console.print(study_table(summary, f"study {cfg.name} (target {cfg.target})"))
    _print_speed_and_pick(summary, Path(summary["folder"]))
    console.print(f"evaluated {summary['work']['evaluated']} schemes, {summary['work']['cached']} from cache")


def study_table(summary: dict, title: str, caption: str | None = None) -> Table:
    t = Table(title=title, caption=caption)
    longest = max(len(r["scheme"]) for r in summary["rows"])
    # short headers: the table has to fit a terminal beside the scheme names
    for col in ("scheme", "kind", "deploys", "mAP50-95", "Δ pt", "SE", "ms", "speed-up", "vs f32", "img/s ×", "INT4",
                "MB"):
        t.add_column(col, justify="left" if col in ("scheme", "kind", "deploys") else "right",
                     **({"no_wrap": True, "min_width": longest} if col == "scheme" else {}))
    for r in summary["rows"]:
        se = f"{r['delta_se_points']:.2f}" if r["delta_se_points"] is not None else ""
        lat = "fails" if r.get("speed_failed") else (f"{r['latency_ms']:.1f}" if r.get("latency_ms") else "-")
        t.add_row(("[bold]" if r["scheme"] == summary["recommended"] else "") + r["scheme"], r["kind"],
                  "yes" if r["deployable"] else "no", f"{r['map50_95']:.4f}",
                  "" if r["kind"] == "fp32" else f"{-r['drop_points']:+.2f}", se, lat,
                  f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
                  f"{r['speedup_vs_f32']:.2f}x" if r.get("speedup_vs_f32") else "-",
                  f"{r['throughput_speedup']:.2f}x" if r.get("throughput_speedup") else "-", f"{r['int4_share']:.0%}",
                  f"{r['weight_mb']:.2f}")
    return t


@app.command()
def export(checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="lowbit checkpoint folder"),
           onnx_out: Optional[Path] = typer.Option(None, "--onnx", help="the .onnx to write (default: model.onnx in "
                                                   "the run folder)"),
           target: str = TARGET,
           calib: Optional[str] = typer.Option(None, help="images to calibrate activation ranges on the exported graph "
                                               "(default: the checkpoint's ModelOpt ranges)"),
           act_range: str = ACT_RANGE, keep_float: int = KEEP_FLOAT, compounding: bool = COMPOUNDING,
           calib_images: int = typer.Option(256, help="calibration subset size, 0 for all"),
           calib_seed: int = CALIB_SEED,
           parity: Optional[str] = typer.Option(None, help="images to compare ONNX Runtime with PyTorch on"),
           parity_images: int = 4, out: Optional[Path] = OUT):
    """Q/DQ ONNX of a checkpoint for a deployment target (INT8/INT4/FP8 as its manifest says), with whether the
    target runs every quantized layer in low precision."""
    from lowbit.config import ActivationCalibration, ExportConfig
    from lowbit.api import run_export

    info = run_export(ExportConfig(checkpoint=str(checkpoint), onnx=str(onnx_out) if onnx_out else None,
                                   target=target, calib=_data(calib, None, calib_images or None, calib_seed) if calib else None,
                                   calibration=ActivationCalibration(method=act_range, keep_worst=keep_float,
                                                                     compounding=compounding),
                                   parity=_data(parity, None, parity_images, 0) if parity else None), out)
    console.print(f"wrote {info.path} ({info.size_mb:.2f} MB) for {info.target}: weights {info.weight_dtypes}, "
                  f"{info.activation_qdq} activation Q/DQ pairs")
    _kept_float(info)
    _head_error(info.head_error)
    console.print(("[green]deployable:[/green] " if info.deployable else "[yellow]not deployable:[/yellow] ") + info.deploy_note)
    if info.parity_max_abs is not None:
        console.print(f"parity vs PyTorch fake quant: max |Δ| {info.parity_max_abs:.3g}, mean |Δ| {info.parity_mean_abs:.3g}")


@app.command()
def finetune(checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="lowbit checkpoint folder to fine-tune"),
             train: str = typer.Option(..., help="training images (unlabelled is fine): folder, data yaml or COCO json"),
             train_images: Optional[int] = typer.Option(None, help="training subset size (default: all)"),
             data: Optional[str] = typer.Option(None, "--data", "-d", help="labelled set for before/after mAP (never trained on)"),
             max_images: Optional[int] = typer.Option(None, help="evaluation subset size (default: all)"),
             recipe: str = typer.Option("mixed", help="mixed (mixed INT4/INT8 schemes: MSE + Fisher block loss) or w4 "
                                        "(uniform INT4: learned steps; start it from `lowbit quantize --rounding gptq-seq`)"),
             block_steps: Optional[int] = typer.Option(None, help="optimizer steps per block (default: the recipe's)"),
             seed: int = typer.Option(0, help="batch order (it alone moves a run's mAP: docs/results.md)"),
             device: str = "cpu", out: Optional[Path] = OUT):
    """Recover accuracy of a quantized checkpoint by block-wise AdaRound from its float model (no labels needed)."""
    from lowbit.config import FinetuneRunConfig
    from lowbit.api import run_finetune
    from lowbit.finetune.blockwise import RECIPES

    if recipe not in RECIPES:
        raise LowbitError(f"unknown recipe {recipe!r}; use one of {', '.join(RECIPES)}")
    algo = RECIPES[recipe].model_copy(update={"seed": seed, **({"block_steps": block_steps} if block_steps else {})})
    res = run_finetune(FinetuneRunConfig(checkpoint=str(checkpoint), train=_data(train, None, train_images, 0),
                                         eval=_data(data, None, max_images, 0) if data else None, recipe=recipe,
                                         config=algo, device=device), out)
    f = res["finetune"]
    console.print(f"{recipe}: {f['steps']} steps in {f['seconds']:.1f} s on {f['device']}, loss {f['first_loss']:.4g} "
                  f"-> {f['last_loss']:.4g}; checkpoint {res['checkpoint']}")
    if res["before"]:
        b, a = res["before"]["map50_95"], res["after"]["map50_95"]
        console.print(f"mAP50-95 {b:.4f} -> {a:.4f} ({(a - b) * 100:+.2f} points)")


@app.command("check-qdq")
def check_qdq_cmd(model: Path = typer.Argument(..., help="a Q/DQ .onnx")):
    """Q/DQ placement a runtime can fuse: symmetric per-channel INT8 weights, activation Q/DQ only before ops
    with low-precision kernels, no DQ -> Q ping-pong. Exits 1 when a rule is broken."""
    from lowbit.export.qdq_lint import check_qdq

    rep = check_qdq(model)
    console.print(f"{rep.convs} conv/matmul nodes: {rep.weight_quantized} with quantized weights {rep.weight_dtypes}, "
                  f"{rep.input_quantized} with quantized inputs; {rep.activation_qdq} activation Q/DQ pairs read by "
                  f"{rep.activation_consumers or 'nothing'}")
    broken = rep.violations()
    for v in broken:
        console.print(f"[red]rule broken:[/red] {v}")
    if broken:
        raise typer.Exit(1)
    console.print("Q/DQ placement: no rule broken")


@app.command("quantize-onnx")
def quantize_onnx(model: Path = typer.Argument(..., help="a float .onnx detector"),
                  onnx_out: Optional[Path] = typer.Option(None, "--onnx", help="the Q/DQ .onnx to write (default: "
                                                          "model.onnx in the run folder)"),
                  formats: Optional[str] = typer.Option(None, "--format", "-f", help="one format for every conv (DFL excluded)"),
                  manifest: Optional[list[Path]] = typer.Option(None, help="a lowbit manifest (layer names as `lowbit "
                                                                "layers -m MODEL.onnx` lists them)"),
                  target: str = TARGET,
                  calib: Optional[str] = typer.Option(None, help="calibration images, for activation formats"),
                  calib_images: int = typer.Option(256, help="calibration subset size, 0 for all"),
                  calib_seed: int = CALIB_SEED,
                  act_range: str = ACT_RANGE, keep_float: int = KEEP_FLOAT, compounding: bool = COMPOUNDING,
                  old_act_range: Optional[str] = OLD_ACT_RANGE,
                  rounding: Optional[str] = typer.Option(None, help="weight rounding of --format on the graph: gptq "
                                                         "(on the calibration images' conv inputs, collected with ONNX "
                                                         "Runtime) or nearest; default: gptq with --calib, else "
                                                         "nearest; a manifest carries its own"),
                  imgsz: Optional[int] = typer.Option(None, help="input size (default: the graph's own)"),
                  preprocess: Optional[str] = PREPROCESS, out: Optional[Path] = OUT):
    """ONNX-native PTQ: apply a format or a manifest straight to an existing .onnx (no PyTorch source), written for
    a deployment target."""
    from lowbit.config import ActivationCalibration, QuantizeOnnxConfig
    from lowbit.api import run_quantize_onnx

    if formats and "," in formats or manifest and len(manifest) > 1:
        raise LowbitError("quantize-onnx writes one graph: give one format or one manifest")
    info = run_quantize_onnx(QuantizeOnnxConfig(
        model=str(model), onnx=str(onnx_out) if onnx_out else None, formats=formats,
        manifest=str(manifest[0]) if manifest else None, target=target,
        calib=_data(calib, None, calib_images or None, calib_seed) if calib else None, imgsz=imgsz,
        calibration=ActivationCalibration(method=old_act_range or act_range, keep_worst=keep_float,
                                          compounding=compounding),
        preprocess=preprocess,
        rounding=rounding), out)
    console.print(f"wrote {info.path} ({info.size_mb:.2f} MB) for {info.target}: {info.layers_quantized} convs, weights "
                  f"{info.weight_dtypes} rounded {'by GPTQ' if info.rounding == 'gptq' else 'to nearest'}, "
                  f"{info.activation_qdq} activation Q/DQ pairs"
                  f"{f' ({info.activation_dtype})' if info.activation_dtype else ''}")
    _kept_float(info)
    _head_error(info.head_error)
    console.print(("[green]deployable:[/green] " if info.deployable else "[yellow]not deployable:[/yellow] ") + info.deploy_note)


def _head_error(err: float | None) -> None:
    if err is None:
        return
    from lowbit.quantize.onnx_ptq import COLLAPSED

    if err > COLLAPSED:
        console.print(f"[bold red]warning:[/bold red] the quantized graph's head maps are {err:.2f} (relative squared "
                      "error) from the float graph's on calibration images: its accuracy may have collapsed; score it "
                      "with `lowbit eval` before deploying (another --target, or --keep-float, may help)")
    else:
        console.print(f"head maps' error against the float graph on calibration images: {err:.3g}")


def _kept_float(info) -> None:
    worst, compounding = info.activations_kept_float_by_output, info.activations_kept_float_by_compounding
    # the checks that look at the outputs keep float inputs the signal-loss rule let through
    bound = info.calibration.max_error if info.calibration else 0.0
    plain = {n: e for n, e in info.activations_kept_float.items() if e > bound}
    if plain:
        console.print(f"[yellow]activations kept float[/yellow] in {len(plain)} layer(s), where INT8 would lose this "
                      "share of the input's signal: " + ", ".join(f"{n} {e:.0%}" for n, e in sorted(
                          plain.items(), key=lambda kv: -kv[1])[:8]))
    if worst:
        console.print(f"[yellow]activations kept float[/yellow] in the {len(worst)} layer(s) whose quantized input "
                      "most changes the outputs (--keep-float; head maps' relative error): " + ", ".join(
                          f"{n} {e:.2g}" for n, e in sorted(worst.items(), key=lambda kv: -kv[1])))
    if compounding:
        console.print(f"[yellow]activations kept float[/yellow] where errors compounded through the graph, "
                      f"{len(compounding)} quantizer(s), in the order taken (head maps' error once each was float): "
                      + ", ".join(f"{u} {e:.2g}" for u, e in compounding.items()))


@app.command()
def bench(models: list[Path] = typer.Argument(..., help=".onnx files or OpenVINO IRs (model.xml or its folder); the "
                                               "first is the baseline of the speed-ups"),
          threads: Optional[int] = typer.Option(None, help="runtime threads (default: the runtime's)"),
          reps: int = typer.Option(30, help="timed inferences per graph and runtime"),
          verify: Optional[str] = typer.Option(None, help="images to check each runtime's detections on before timing "
                                               "(default: the COCO images lowbit carries)"),
          verify_images: int = typer.Option(8, help="how many of them; 0 skips the check"),
          throughput_rounds: int = typer.Option(8, help="interleaved rounds of throughput on OpenVINO (its THROUGHPUT "
                                                "hint, parallel requests); 0: batch-1 latency only"),
          preprocess: Optional[str] = PREPROCESS, decoder: Optional[str] = DECODER, out: Optional[Path] = OUT):
    """Latency of graphs on every runtime present (ONNX Runtime, OpenVINO at its default precision and at f32),
    timed interleaved; a runtime whose detections diverge from ONNX Runtime's fails instead of being timed."""
    from lowbit.config import BenchConfig
    from lowbit.api import run_bench

    res = run_bench(BenchConfig(models=[str(m) for m in models], threads=threads, reps=reps,
                                verify=_data(verify, None, None, 0) if verify else None, verify_images=verify_images,
                                throughput_rounds=throughput_rounds,
                                preprocess=preprocess, decoder=decoder), out)
    from lowbit.evaluate.bench import describe_host

    t = Table(title=f"lowbit bench on {describe_host(res.host)}, interleaved",
              caption=f"speed-up: the first model's batch-1 median over this one's on the same runtime; vs f32: over "
                      "the first model on OpenVINO forced to f32; img/s: OpenVINO's THROUGHPUT hint. "
                      f"{'' if verify_images else 'Outputs NOT checked (--verify-images 0).'}")
    for col in ("model", "runtime", "median ms", "p90 ms", "speed-up", "vs f32", "img/s", "img/s ×", "note"):
        t.add_column(col, justify="left" if col in ("model", "runtime", "note") else "right")
    for r in res.results:
        ms = "[red]FAILS[/red]" if r.failed else (f"{r.median_ms:.1f}" if r.median_ms else "-")
        t.add_row(Path(r.model).name, r.runtime, ms, f"{r.p90_ms:.1f}" if r.p90_ms else "-",
                  f"{r.speedup:.2f}x" if r.speedup else "-", f"{r.speedup_vs_f32:.2f}x" if r.speedup_vs_f32 else "-",
                  f"{r.throughput_ips:.1f}" if r.throughput_ips else "-",
                  f"{r.throughput_speedup:.2f}x" if r.throughput_speedup else "-", r.note)
    console.print(t)
    if not any(r.median_ms for r in res.results):
        raise LowbitError("no model could be timed on any runtime (see the notes above)")


@app.command("latency-table")
def latency_table(float_model: Path = typer.Argument(..., help="the float .onnx"),
                  quantized: Optional[list[str]] = typer.Option(None, "--graph", "-g", help="FORMAT=q.onnx, a uniform "
                                                                "Q/DQ graph of that format (repeat)"),
                  old_quantized: Optional[list[str]] = typer.Option(None, "--format", "-f", hidden=True),
                  threads: Optional[int] = typer.Option(None, help="inference threads"), reps: int = 20,
                  out: Path = typer.Option(..., "--out", "-o", help="the JSON table to write")):
    """Per-layer conv latency at each precision from OpenVINO's CPU profiler, for `lowbit search --cost latency`."""
    from lowbit.api import run_latency_table

    quantized = [*(quantized or []), *(old_quantized or [])]
    if not quantized:
        raise LowbitError("give at least one quantized graph: --graph FORMAT=path.onnx")
    pairs = dict(q.split("=", 1) for q in quantized if "=" in q)
    if len(pairs) != len(quantized):
        raise LowbitError("--graph takes FORMAT=path.onnx")
    table = run_latency_table(float_model, pairs, out, threads, reps)
    conv = {f: sum(v.get(f, 0.0) for v in table["layers"].values()) for f in ["FP16", *pairs]}
    console.print(f"{len(table['layers'])} convs; wall time per uniform graph: "
                  + ", ".join(f"{f} {ms:.1f} ms" for f, ms in table["wall_ms"].items()) + "; of that in convs: "
                  + ", ".join(f"{f} {ms:.1f}" for f, ms in conv.items()) + f"; everything else {table['fixed_ms']:.1f} ms; "
                  + "each precision switch between neighbouring convs: "
                  + (", ".join(f"{f} {ms:.2f} ms" for f, ms in table["switch_ms"].items()) or "not measured"))


@app.command()
def formats():
    """List the format presets."""
    from lowbit.formats import PRESETS

    t = Table(title="formats (append :pt, :pc or :b<N> to set the weight granularity)")
    for col in ("name", "weights", "activations"):
        t.add_column(col)
    for f in PRESETS.values():
        t.add_row(f.name, f.weight.label if f.weight else "float", f.act.label if f.act else "float")
    console.print(t)


@app.command()
def demo(out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (default: runs/demo; a re-run resumes)"),
         quick: bool = typer.Option(False, hidden=True, help="the same study at a toy size, for tests")):
    """Which layers of YOLOv10n can take low precision, what the schemes score and how fast they really run, on the
    model and COCO images lowbit carries (CPU, a few minutes)."""
    from lowbit.study import demo_target, run_demo

    console.print("[bold]lowbit demo[/]: YOLOv10n; label-free sensitivity on 16 COCO train2017 images; four schemes "
                  f"exported for OpenVINO on this CPU (target {demo_target()}), scored and timed there beside the float "
                  "model; 32 COCO val2017 images")
    summary, reports = run_demo(out, quick=quick)
    for method, rep in reports.items():
        console.print(sensitivity_table(rep, f"layer sensitivity ({method}): the most and the least sensitive layers"))
    folder = Path(out or "runs/demo")
    study = "configs/study-yolov10n-openvino" + ("-amx" if summary["target"] == "openvino-amx" else "") + ".yaml"
    console.print(study_table(summary, f"schemes on {summary['target']}",
                              caption="mAP50-95 on 32 images is noisy: SE is each Δ's standard error over the choice of "
                                      f"images, so differences within about 2 SE are not resolved here. Decide with "
                                      f"{study} (coco-val800)."))
    _print_speed_and_pick(summary, folder)
    plots = ", ".join(p for p in ("pareto.png", "pareto-latency.png", "recommended-bitmap.png") if (folder / p).is_file())
    console.print(f"report: {folder / 'study-report.md'} (plots: {plots}); evaluated {summary['work']['evaluated']} "
                  f"schemes, {summary['work']['cached']} from cache (a re-run resumes); the real study: lowbit study "
                  f"{study}")


def _print_speed_and_pick(summary: dict, folder: Path) -> None:
    """The host every speed was timed on, and the pick with its reason when the float model won."""
    from lowbit.evaluate.bench import describe_host

    speed = summary.get("speed") or {}
    if speed.get("rows"):
        console.print(f"timed on {describe_host(speed.get('host', {}))}: batch-1 latency, interleaved medians at "
                      "OpenVINO's default precision (speed-up vs the FP32 export there, vs f32 against OpenVINO "
                      "forced to f32); img/s ×: throughput under OpenVINO's THROUGHPUT hint against the FP32 export's")
    if summary["recommended"] is None:
        console.print("recommended: none of the schemes meets the accuracy bounds")
        return
    where = f" -> {folder / 'recommended.onnx'}" if (folder / "recommended.onnx").is_file() else ""
    by = f" (by {summary.get('decide_by', 'latency')})" if speed.get("rows") else ""
    console.print(f"recommended{by}: [bold]{summary['recommended']}[/]{where}"
                  + (f" and {summary['openvino_ir']}" if summary.get("openvino_ir") else ""))
    if summary.get("why"):
        console.print(f"  why the float model: {summary['why']}")


def sensitivity_table(rep, title: str, n: int = 5) -> Table:
    t = Table(title=title)
    for col in ("rank", "layer", "role", *(f"{f} score" for f in rep.formats)):
        t.add_column(col, justify="right" if "score" in col or col == "rank" else "left")
    f0 = rep.formats[0]
    order = sorted((r for r in rep.rows if f0 in r.scores), key=lambda r: -r.scores[f0])
    for i, r in enumerate(order):
        if n <= i < len(order) - n:
            if i == n:
                t.add_row("...", f"({len(order) - 2 * n} more)", "", *("" for _ in rep.formats))
            continue
        t.add_row(str(i + 1), r.name, r.role, *(f"{r.scores.get(f, float('nan')):.3g}" for f in rep.formats))
    return t


def main() -> None:
    import logging

    # Python warnings from the libraries underneath go to the run's log (lowbit.io.RunDir), not the terminal
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.propagate = False
    warnings_log.handlers = warnings_log.handlers or [logging.NullHandler()]
    try:
        if len(sys.argv) == 1:
            sys.argv.append("demo")
        app()
    except LowbitError as e:
        _mark_failed(e, bad_input=True)
        console.print(f"[bold red]Error:[/] {e}")  # click's own word for a usage error, so every refusal reads alike
        sys.exit(2)
    except ValidationError as e:  # a bad option value reaching a typed config
        _mark_failed(e, bad_input=True)
        err = e.errors()[0]
        console.print(f"[bold red]Error:[/] {'.'.join(map(str, err['loc']))}: {err['msg']}")
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as e:  # typer ends every command this way; only a non-zero code is a failure
        if e.code == 130:  # click's own word for Ctrl-C
            _interrupted()
        if e.code not in (0, None):
            _mark_failed(e)
        raise
    except Exception as e:
        _mark_failed(e)
        raise


def _interrupted() -> None:
    _mark_failed(KeyboardInterrupt("interrupted (Ctrl-C); a study re-run with the same --out resumes"))
    console.print("[bold red]interrupted[/] (Ctrl-C); nothing half-written was kept")
    sys.exit(130)


def _mark_failed(error: BaseException, bad_input: bool = False) -> None:
    from lowbit.io import RunDir

    for run in RunDir.opened:
        run.fail(error, bad_input)
    RunDir.opened.clear()  # this command has ended


if __name__ == "__main__":
    main()
