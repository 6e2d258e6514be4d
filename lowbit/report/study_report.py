"""The study report: one table of every scheme (its mAP on the target's runtime, whether the target runs it in low
precision, its measured latency and speed-up), a CSV, plots of accuracy against weight size and against measured
latency, the recommended scheme's per-layer bit map, and the decision rule."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lowbit.evaluate.bench import describe_host
from lowbit.evaluate.parity import Parity
from lowbit.io import atomic_write_bytes, atomic_write_text

KIND_STYLE = {"fp32": ("k", "*"), "uniform": ("tab:gray", "s"), "budget": ("tab:blue", "o"), "topk": ("tab:green", "^"),
              "pareto": ("tab:blue", "o"), "random": ("tab:red", "x"), "modelopt": ("tab:purple", "D"),
              "manifest": ("tab:orange", "P"), "finetune": ("tab:cyan", "v")}


def _speed_of(speed: dict | None, name: str) -> dict:
    """The scheme's timing on the target: default-precision row, and the forced-f32 row where there is one."""
    if not speed:
        return {}
    rows = {b["runtime"]: b for b in speed.get("rows", {}).get(name, [])}
    main = rows.get("openvino-cpu") or rows.get("ort-cpu") or next(iter(rows.values()), None)
    if main is None:
        return {}
    failed = main.get("parity") is not None and not Parity.model_validate(main["parity"]).ok
    keep = ("median_ms", "speedup", "speedup_vs_f32", "throughput_ips", "throughput_speedup")
    got = {k: None if failed else main.get(k) for k in keep}
    return {"latency_ms": got["median_ms"], "speed_runtime": main["runtime"], "speedup": got["speedup"],
            "speedup_vs_f32": got["speedup_vs_f32"], "throughput_ips": got["throughput_ips"],
            "throughput_speedup": got["throughput_speedup"], "parity": main.get("parity"),
            "executed": main.get("executed"), "speed_failed": failed}


def _rows(results, errors: dict[str, float], speed: dict | None = None) -> list[dict]:
    base = results[0].result.map50_95
    rows = []
    for r in results:
        s, res = r.manifest.stats, r.result
        kind = "fp32" if r.manifest.name == "FP32" else r.manifest.origin.get("kind", "manifest")
        se = errors.get(r.manifest.name)
        rows.append({"scheme": r.manifest.name, "kind": kind, "map50_95": res.map50_95, "map50": res.map50,
                     "drop_points": (base - res.map50_95) * 100, "delta_se_points": None if se is None else se * 100,
                     "int4_share": s.int4_share if s else 0.0,
                     "effective_weight_bits": 32.0 if kind == "fp32" else (s.effective_weight_bits if s else 16.0),
                     "mean_act_bits": 32.0 if kind == "fp32" else (s.mean_act_bits if s else 16.0),
                     "bit_ops_g": s.bit_ops_g if s and kind != "fp32" else None,
                     "weight_mb": s.weight_mb * (2 if kind == "fp32" else 1) if s else 0.0,
                     "predicted_damage": r.manifest.origin.get("predicted_damage"),
                     "predicted_ms": r.manifest.origin.get("predicted_ms"),
                     "predicted_float_ms": r.manifest.origin.get("predicted_float_ms"),
                     "deployable": r.deployable, "deploy_note": r.deploy_note, "runtime": res.runtime,
                     "latency_ms": None, "speedup": None, "speedup_vs_f32": None, "throughput_ips": None,
                     "throughput_speedup": None,
                     **_speed_of(speed, r.manifest.name)})
    return rows


# what a timed decision minimises, per row
SPEED_KEYS = {"latency": lambda r: r.get("latency_ms"), "throughput": lambda r: (1.0 / r["throughput_ips"]
                                                                               if r.get("throughput_ips") else None)}


def decide(rows: list[dict], max_drop: float, target: str = "size", by: str = "latency") -> dict | None:
    """Among schemes within `max_drop` mAP points of FP32 (random baselines excluded) that the target runs in low
    precision: the fewest weight bits for `size`; the fewest bit-operations for TensorRT (not available to time
    here); where the target is timed, the fastest measured one by `by` (batch-1 latency or throughput), with the
    float model itself a candidate: a quantized scheme is picked only where it runs faster than float on the host
    it was timed on."""
    ok = [r for r in rows if r["kind"] not in ("fp32", "random") and r["drop_points"] <= max_drop and r["deployable"]]
    if target == "size":
        return min(ok, key=lambda r: (r["effective_weight_bits"], r["drop_points"])) if ok else None
    if target == "tensorrt":
        return min(ok, key=lambda r: (r["bit_ops_g"] or 1e18, r["drop_points"])) if ok else None
    cost = SPEED_KEYS[by]
    timed = [r for r in ok + [r for r in rows if r["kind"] == "fp32"] if cost(r)]
    return min(timed, key=lambda r: (cost(r), r["drop_points"])) if timed else None


def why_float(rows: list[dict], max_drop: float, by: str, host: dict) -> str:
    """In words, why the float model won a timed decision."""
    cost = SPEED_KEYS[by]
    fp = next(r for r in rows if r["kind"] == "fp32")
    rivals = [r for r in rows if r["kind"] not in ("fp32", "random") and r["deployable"] and cost(r)]
    within = [r for r in rivals if r["drop_points"] <= max_drop]
    precision = (host.get("openvino_float") or "its default precision").upper()
    what = "at batch 1" if by == "latency" else "in throughput"
    if not within:
        return (f"no quantized scheme within {max_drop:g} point(s) of FP32 was timed" if not rivals else
                f"every timed quantized scheme loses more than {max_drop:g} point(s)")
    best = min(within, key=cost)
    ratio = cost(fp) / cost(best)
    return (f"on this CPU ({host.get('cpu', 'unknown')}) the float model in {precision} is faster {what} than every "
            f"quantized scheme within {max_drop:g} point(s); the fastest, {best['scheme']}, runs at {ratio:.2f}x its "
            "speed")


def _scatter_png(rows: list[dict], x: str, xlabel: str, title: str, logx: bool = False) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    pts = [r for r in rows if r["kind"] != "fp32" and r.get(x)]
    for kind in sorted({r["kind"] for r in pts}):
        color, marker = KIND_STYLE.get(kind, ("k", "."))
        sel = [r for r in pts if r["kind"] == kind]
        ax.scatter([r[x] for r in sel], [r["map50_95"] for r in sel], c=color, marker=marker, label=kind, s=40)
    front, best = [], -1.0
    for r in sorted((r for r in pts if r["kind"] != "random"), key=lambda r: r[x]):
        if r["map50_95"] > best:
            front.append(r)
            best = r["map50_95"]
    if front:
        ax.plot([r[x] for r in front], [r["map50_95"] for r in front], "k--", lw=0.8, label="front")
        for r in front:
            ax.annotate(r["scheme"], (r[x], r["map50_95"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    fp = rows[0]
    if fp.get(x):
        ax.scatter([fp[x]], [fp["map50_95"]], c="k", marker="*", s=90, label="FP32")
    ax.axhline(fp["map50_95"], color="k", lw=0.8)
    ax.axhline(fp["map50_95"] - 0.01, color="k", lw=0.5, ls=":", label="FP32 - 1 point")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("COCO mAP50-95")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _bitmap_png(manifest, layers) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = sorted({f.name for f in manifest.layers.values()} | {"FP16"})
    cmap = plt.get_cmap("tab10")
    color = {n: cmap(i) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(max(10, len(layers) * 0.14), 2.8))
    for i, layer in enumerate(layers):
        f = manifest.layers.get(layer.name)
        ax.bar(i, layer.params, color=color[f.name if f else "FP16"], width=0.9)
    ax.set_yscale("log")
    ax.set_xlabel("layer (network order); bar height = parameters")
    ax.set_title(f"per-layer formats of {manifest.name}")
    ax.legend(handles=[Patch(color=color[n], label=n) for n in names], fontsize=8, ncol=len(names))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _finetune_section(results) -> list[str]:
    tuned = [r for r in results if r.manifest.origin.get("kind") == "finetune"]
    if not tuned:
        return []
    base = results[0].result.map50_95
    lines = ["## Fine-tuning", "", "Fine-tuned from the float model on the calibration images only (no evaluation "
             "image is trained on); quantizer formats unchanged.", "",
             "| scheme | before | after | Δ vs FP32 before → after (points) | recipe | steps | time |", "|---|---|---|---|---|---|---|"]
    for r in tuned:
        o, ft = r.manifest.origin, r.manifest.origin["finetune"]
        b, a = o["base_map50_95"], r.result.map50_95
        lines.append(f"| {o['base']} | {b:.4f} | {a:.4f} | {(b - base) * 100:+.2f} → {(a - base) * 100:+.2f} | "
                     f"AdaRound, {ft['block_loss']} blocks{', learned steps' if ft['learn_steps'] else ''} | {ft['steps']} | "
                     f"{ft['seconds']:.0f} s on {ft['device']} |")
    return lines + [""]


def _ms(v) -> str:
    return f"{v:.1f}" if v else "-"


def _times(v) -> str:
    return f"{v:.2f}x" if v else "-"


def _se(row: dict) -> str:
    return "" if row["delta_se_points"] is None else f" ± {row['delta_se_points']:.2f}"


def write_study_report(cfg, results, reports, folder: Path, errors: dict[str, float] | None = None,
                       speed: dict | None = None) -> dict:
    """`errors`: each scheme's standard error of its Δ vs FP32 over the choice of evaluation images; `speed`: the
    speed stage's interleaved timings on the target's runtime."""
    from lowbit.targets import get_target

    target = get_target(cfg.target)
    rows = _rows(results, errors or {}, speed)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[k for k in rows[0] if k not in ("parity", "executed")], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(folder / "schemes.csv", buf.getvalue())
    name = Path(cfg.model).name
    atomic_write_bytes(folder / "pareto.png", _scatter_png(rows, "weight_mb", "weight storage of the quantizable layers (MB)",
                                                           f"{name}: accuracy vs weight size"))
    timed = any(r.get("latency_ms") for r in rows)
    if timed:
        rt = next(r["speed_runtime"] for r in rows if r.get("latency_ms"))
        atomic_write_bytes(folder / "pareto-latency.png",
                           _scatter_png(rows, "latency_ms", f"measured latency on {rt}, ms per image (batch 1)",
                                        f"{name}: accuracy vs measured latency ({cfg.target})"))
    by = cfg.decide_by
    host = (speed or {}).get("host", {})
    decisions = {d: decide(rows, d, cfg.target, by) for d in cfg.max_drop_points}
    recommended = next((r for r in decisions.values() if r), None)
    why = {d: why_float(rows, d, by, host) for d, r in decisions.items() if r and r["kind"] == "fp32"}
    runtime = results[0].result.runtime
    lines = [f"# lowbit study: {cfg.name}", "",
             f"Model `{cfg.model}`; target **{cfg.target}**: {target.description}. Evaluated on `{cfg.eval.path}` "
             f"({results[0].result.images} images, pycocotools); calibration and sensitivity on `{cfg.calib.path}`.", "",
             (f"Every scheme the target runs in low precision is scored as its Q/DQ ONNX on the target's runtime "
              f"(FP32: lowbit's float export on {runtime}); the others in PyTorch fake quantization, and marked." if
              target.name != "size" else "Every scheme is scored as PyTorch fake quantization: a storage result, since "
              "no runtime runs INT4 convolutions faster."), "",
             "| scheme | kind | deployable | mAP50-95 | Δ points | SE of Δ | scored on | latency ms | speed-up | vs f32 | "
             "img/s | throughput speed-up | INT4 share | eff. W bits | weights MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        se = "" if r["delta_se_points"] is None else f"{r['delta_se_points']:.2f}"
        lat = "fails parity" if r.get("speed_failed") else _ms(r.get("latency_ms"))
        lines.append(f"| {r['scheme']} | {r['kind']} | {'yes' if r['deployable'] else 'no'} | {r['map50_95']:.4f} | "
                     f"{'' if r['kind'] == 'fp32' else format(-r['drop_points'], '+.2f')} | {se} | {r['runtime']} | {lat} | {_times(r.get('speedup'))} | "
                     f"{_times(r.get('speedup_vs_f32'))} | {_ms(r.get('throughput_ips'))} | "
                     f"{_times(r.get('throughput_speedup'))} | {r['int4_share']:.0%} | {r['effective_weight_bits']:.2f} | "
                     f"{r['weight_mb']:.2f} |")
    notes = sorted({r["deploy_note"] for r in rows if not r["deployable"]})
    if notes:
        lines += ["", f"Not deployable on {cfg.target} (scored in PyTorch; storage or research results):"]
        lines += [f"- {n}" for n in notes]
    if errors:
        lines += ["", f"SE of Δ: the standard error of a scheme's difference from FP32 over the choice of the "
                  f"{results[0].result.images} evaluation images ({cfg.error_halves} random halves, every scheme on the "
                  "same halves, as `lowbit compare`). Two schemes whose Δ differ by less than about twice that are not "
                  "told apart by these images."]
    if timed:
        lines += ["", f"Host: {describe_host(host)}.", "",
                  f"Latency: batch 1, median of {cfg.speed_reps} interleaved rounds (every scheme timed in the same "
                  "run, one inference each in turn), at the runtime's default precision; speed-up against the FP32 "
                  "export on the same runtime, vs f32 against it forced to f32. Throughput (img/s): OpenVINO's "
                  f"THROUGHPUT hint (as many parallel requests as it asks for), median of {cfg.throughput_rounds} "
                  "interleaved rounds. Each runtime's detections were checked against ONNX Runtime's on 8 calibration "
                  "images before timing."]
    lines += predicted_vs_measured(rows)
    lines += ["", "![accuracy vs weight size](pareto.png)", ""]
    if timed:
        lines += ["![accuracy vs measured latency](pareto-latency.png)", ""]
    lines += _finetune_section(results)
    rule = {"size": "fewest weight bits", "tensorrt": "fewest bit-operations"}.get(
        cfg.target, f"fastest measured ({'batch-1 latency' if by == 'latency' else 'throughput'}), the float model "
                    "included")
    lines += ["## Which scheme to pick", ""]
    for d, r in decisions.items():
        if r is not None and r["kind"] == "fp32":
            lines.append(f"- Within {d:g} mAP point(s) of FP32, {rule}: **FP32**, the float model: {why[d]}.")
            continue
        lines.append(f"- Within {d:g} mAP point(s) of FP32, deployable on {cfg.target}, {rule}: "
                     + (f"**{r['scheme']}** ({-r['drop_points']:+.2f}{_se(r)} points, "
                        + (f"{_ms(r['latency_ms'])} ms, {_times(r['speedup'])} FP32 at the runtime's default, "
                           f"{_times(r['speedup_vs_f32'])} FP32 f32"
                           + (f", {_times(r['throughput_speedup'])} its throughput" if r.get("throughput_speedup")
                              else "") if r.get("latency_ms") else
                           f"{r['effective_weight_bits']:.2f} weight bits, {r['int4_share']:.0%} INT4") + ")"
                        if r else "none of the evaluated schemes"))
    if cfg.target == "size" and recommended:
        lines.append("- A storage result: INT4 convolution weights make no runtime faster.")
    if recommended and recommended["kind"] != "fp32":
        m = next(x.manifest for x in results if x.manifest.name == recommended["scheme"])
        layers = next(iter(reports.values())).rows if reports else []
        if layers:
            atomic_write_bytes(folder / "recommended-bitmap.png", _bitmap_png(m, layers))
            lines += ["", f"![per-layer formats of {m.name}](recommended-bitmap.png)"]
        m.save(folder / "recommended-manifest.json")
    atomic_write_text(folder / "study-report.md", "\n".join(lines) + "\n")
    return {"target": cfg.target, "rows": rows, "decisions": {str(k): v for k, v in decisions.items()},
            "recommended": recommended["scheme"] if recommended else None, "decide_by": by,
            "why": why.get(next((d for d, r in decisions.items() if r), None)), "speed": speed}


def append_onnx_section(folder: Path, scheme: str, out: dict) -> None:
    e = out["export"]
    text = (folder / "study-report.md").read_text() + "\n".join([
        "", "## Storage artifact", "",
        f"`recommended.onnx` ({e['size_mb']:.2f} MB): **{scheme}** as standard Q/DQ operators (opset 21); weights "
        f"{e['weight_dtypes']}, {e['activation_qdq']} activation Q/DQ pairs.", "",
        f"- ONNX Runtime ({out['runtime']}) mAP50-95 {out['ort_map50_95']:.4f} vs PyTorch fake quant "
        f"{out['torch_map50_95']:.4f} (Δ {out['ort_map50_95'] - out['torch_map50_95']:+.4f})",
        f"- raw-output parity on 4 calibration images: max |Δ| {e['parity_max_abs']:.3g}, mean |Δ| {e['parity_mean_abs']:.3g}",
        f"- TensorRT: {out['tensorrt']}", ""])
    atomic_write_text(folder / "study-report.md", text)


def predicted_vs_measured(rows: list[dict]) -> list[str]:
    """Schemes chosen against a per-layer latency table (`lowbit latency-table`): the table's prediction beside the
    measurement. Speed-ups are compared too: they hold where the machine's overall speed drifts between building
    the table and timing (docs/results.md, "Speed")."""
    sel = [r for r in rows if r.get("predicted_ms")]
    if not sel:
        return []
    out = ["", "Latency-budget schemes: the per-layer table's prediction against the measurement.", "",
           "| scheme | predicted | measured | error | speed-up predicted | speed-up measured | error |",
           "|---|---|---|---|---|---|---|"]
    for r in sel:
        ms, up = r.get("latency_ms"), r.get("speedup")
        p_up = r["predicted_float_ms"] / r["predicted_ms"] if r.get("predicted_float_ms") else None
        err = f"{(r['predicted_ms'] / ms - 1) * 100:+.1f}%" if ms else "-"
        up_err = f"{(p_up / up - 1) * 100:+.1f}%" if up and p_up else "-"
        out.append(f"| {r['scheme']} | {r['predicted_ms']:.1f} ms | {_ms(ms)} ms | {err} | {_times(p_up)} | "
                   f"{_times(up)} | {up_err} |")
    return out
