"""The study report: one table of every scheme, a CSV, the Pareto plot, the recommended scheme's
per-layer bit map, and the decision rule."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lowbit.io import atomic_write_bytes, atomic_write_text

KIND_STYLE = {"fp32": ("k", "*"), "uniform": ("tab:gray", "s"), "budget": ("tab:blue", "o"), "topk": ("tab:green", "^"),
              "pareto": ("tab:blue", "o"), "random": ("tab:red", "x"), "modelopt": ("tab:purple", "D"), "manifest": ("tab:orange", "P"),
              "finetune": ("tab:cyan", "v")}


def _rows(results, errors: dict[str, float]) -> list[dict]:
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
                     "weight_mb": s.weight_mb * (2 if kind == "fp32" else 1) if s else 0.0,
                     "predicted_damage": r.manifest.origin.get("predicted_damage"),
                     "latency_ms": res.latency.median_ms, "runtime": res.runtime})
    return rows


def decide(rows: list[dict], max_drop: float) -> dict | None:
    """Fewest effective weight bits among schemes within `max_drop` mAP points of FP32 (random baselines excluded)."""
    ok = [r for r in rows if r["kind"] not in ("fp32", "random") and r["drop_points"] <= max_drop]
    return min(ok, key=lambda r: (r["effective_weight_bits"], r["drop_points"])) if ok else None


def _pareto_png(rows: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    pts = [r for r in rows if r["kind"] != "fp32"]
    for kind in sorted({r["kind"] for r in pts}):
        color, marker = KIND_STYLE.get(kind, ("k", "."))
        sel = [r for r in pts if r["kind"] == kind]
        ax.scatter([r["effective_weight_bits"] for r in sel], [r["map50_95"] for r in sel], c=color, marker=marker,
                   label=kind, s=40)
    front, best = [], -1.0
    for r in sorted((r for r in pts if r["kind"] != "random"), key=lambda r: r["effective_weight_bits"]):
        if r["map50_95"] > best:
            front.append(r)
            best = r["map50_95"]
    ax.plot([r["effective_weight_bits"] for r in front], [r["map50_95"] for r in front], "k--", lw=0.8, label="front")
    fp = rows[0]["map50_95"]
    ax.axhline(fp, color="k", lw=0.8, label=f"FP32 {fp:.3f}")
    ax.axhline(fp - 0.01, color="k", lw=0.5, ls=":", label="FP32 - 1 point")
    ax.set_xlabel("effective weight bits (parameter-weighted)")
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
    lines = ["## Fine-tuning", "", "Distilled from the float model on the calibration images only (no evaluation "
             "image is trained on); quantizer formats unchanged.", "",
             "| scheme | before | after | Δ vs FP32 before → after (points) | mode | steps | time |", "|---|---|---|---|---|---|---|"]
    for r in tuned:
        o, ft = r.manifest.origin, r.manifest.origin["finetune"]
        b, a = o["base_map50_95"], r.result.map50_95
        lines.append(f"| {o['base']} | {b:.4f} | {a:.4f} | {(b - base) * 100:+.2f} → {(a - base) * 100:+.2f} | "
                     f"{ft['mode']} (lr {ft['lr']:g}{', LSQ scales' if ft['learn_scales'] else ''}) | {ft['steps']} | "
                     f"{ft['seconds']:.0f} s on {ft['device']} |")
    return lines + [""]


def write_study_report(cfg, results, reports, folder: Path, errors: dict[str, float] | None = None) -> dict:
    """`errors`: each scheme's standard error of its Δ vs FP32 over the choice of evaluation images."""
    rows = _rows(results, errors or {})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(folder / "schemes.csv", buf.getvalue())
    atomic_write_bytes(folder / "pareto.png", _pareto_png(rows, f"{Path(cfg.model).name}: accuracy vs weight bits"))
    decisions = {d: decide(rows, d) for d in cfg.max_drop_points}
    recommended = next((r for r in decisions.values() if r), None)
    lines = [f"# lowbit study: {cfg.name}", "",
             f"Model `{cfg.model}`; evaluated on `{cfg.eval.path}` ({results[0].result.images} images, pycocotools); "
             f"calibration and sensitivity on `{cfg.calib.path}`; {cfg.device}.", "",
             "| scheme | kind | mAP50-95 | mAP50 | Δ points | SE of Δ | INT4 share | eff. W bits | mean A bits | weights MB | predicted damage |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pdmg = "" if r["predicted_damage"] is None else f"{r['predicted_damage']:.3g}"
        se = "" if r["delta_se_points"] is None else f"{r['delta_se_points']:.2f}"
        lines.append(f"| {r['scheme']} | {r['kind']} | {r['map50_95']:.4f} | {r['map50']:.4f} | {-r['drop_points']:+.2f} | "
                     f"{se} | {r['int4_share']:.0%} | {r['effective_weight_bits']:.2f} | {r['mean_act_bits']:.1f} | "
                     f"{r['weight_mb']:.2f} | {pdmg} |")
    if errors:
        lines += ["", f"SE of Δ: the standard error of a scheme's difference from FP32 over the choice of the "
                  f"{results[0].result.images} evaluation images ({cfg.error_halves} random halves, every scheme on the "
                  "same halves, as `lowbit compare`). Two schemes whose Δ differ by less than about twice that are not "
                  "told apart by these images."]
    lines += ["", "![accuracy vs weight bits](pareto.png)", ""]
    lines += _finetune_section(results)
    lines += ["## Which scheme to pick", ""]
    for d, r in decisions.items():
        lines.append(f"- Within {d:g} mAP point(s) of FP32, fewest weight bits: "
                     + (f"**{r['scheme']}** ({r['effective_weight_bits']:.2f} bits, {r['int4_share']:.0%} INT4, "
                        f"{-r['drop_points']:+.2f}{_se(r)} points)" if r else "none of the evaluated schemes"))
    if recommended:
        m = next(x.manifest for x in results if x.manifest.name == recommended["scheme"])
        layers = next(iter(reports.values())).rows if reports else []
        if layers:
            atomic_write_bytes(folder / "recommended-bitmap.png", _bitmap_png(m, layers))
            lines += ["", f"![per-layer formats of {m.name}](recommended-bitmap.png)"]
        m.save(folder / "recommended-manifest.json")
    lines += ["", "Latency here is the PyTorch forward of ModelOpt's fake quantization, which computes in float: it "
              "does not show deployed speed."]
    atomic_write_text(folder / "study-report.md", "\n".join(lines) + "\n")
    return {"rows": rows, "decisions": {str(k): v for k, v in decisions.items()},
            "recommended": recommended["scheme"] if recommended else None}


def _se(row: dict) -> str:
    return "" if row["delta_se_points"] is None else f" ± {row['delta_se_points']:.2f}"


def _ms(v) -> str:
    return f"{v:.1f} ms" if v else "-"


def _times(v) -> str:
    return f"{v:.2f}x" if v else "-"


def append_onnx_section(folder: Path, scheme: str, out: dict) -> None:
    e = out["export"]
    text = (folder / "study-report.md").read_text() + "\n".join([
        "", "## Deployable artifact", "",
        f"`recommended.onnx` ({e['size_mb']:.2f} MB): **{scheme}** as standard Q/DQ operators (opset 21); weights "
        f"{e['weight_dtypes']}, {e['activation_qdq']} activation Q/DQ pairs.", "",
        f"- ONNX Runtime ({out['runtime']}) mAP50-95 {out['ort_map50_95']:.4f} vs PyTorch fake quant "
        f"{out['torch_map50_95']:.4f} (Δ {out['ort_map50_95'] - out['torch_map50_95']:+.4f})",
        f"- raw-output parity on 4 calibration images: max |Δ| {e['parity_max_abs']:.3g}, mean |Δ| {e['parity_mean_abs']:.3g}",
        f"- TensorRT: {'buildable' if e['tensorrt_buildable'] else 'not buildable'}: {e['tensorrt_reason']}", "",
        "Deployed speed on this machine (batch 1, median; the float graph is lowbit's FP32 export):", "",
        "| runtime | FP32 | this scheme | speed-up | note |", "|---|---|---|---|---|",
        *[f"| {r['runtime']} | {_ms(r['float_ms'])} | {_ms(r['ms'])} | "
          f"{_times(r['speedup'])} | {r['note']} |" for r in out.get("speed", [])], ""])
    atomic_write_text(folder / "study-report.md", text)


def append_speed_section(folder: Path, speed: dict, max_drop_points: list[float] = ()) -> None:
    """Latency and speed-up vs FP32 of every scheme on every runtime present, beside its mAP, and the
    fastest scheme within each accuracy bound on each runtime."""
    rts = speed["runtimes"]
    base = {b["runtime"]: b.get("median_ms") for b in speed["rows"][0]["bench"]} if speed["rows"] else {}
    lines = ["", "## Deployed speed of every scheme", "",
             f"Each scheme as a Q/DQ ONNX, batch 1, median of 20 runs on this machine, threads: "
             f"{speed['threads'] or 'runtime default'}; speed-up against lowbit's FP32 export on the same runtime. "
             "A fine-tuned scheme runs exactly as fast as its base (same formats, same graph).", "",
             "| scheme | mAP50-95 | " + " | ".join(rts) + " |", "|---|---|" + "---|" * len(rts)]
    notes = {}
    for row in speed["rows"]:
        cells = []
        by_rt = {b["runtime"]: b for b in row["bench"]}
        for rt in rts:
            b = by_rt.get(rt)
            if b is None or b.get("median_ms") is None:
                cells.append("cannot run" if b else "-")
                if b and b.get("note"):
                    notes.setdefault(b["note"], []).append(f"{row['scheme']} on {rt}")
                continue
            speedup = base.get(rt) / b["median_ms"] if base.get(rt) else None
            cells.append(f"{_ms(b['median_ms'])} ({_times(speedup)})")
        lines.append(f"| {row['scheme']} | {row['map50_95']:.4f} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {', '.join(who)}: {note}" for note, who in notes.items()]
    fp32 = speed["rows"][0]["map50_95"] if speed["rows"] else None
    for drop in max_drop_points if fp32 is not None else ():
        for rt in rts:
            ok = [(b["median_ms"], row) for row in speed["rows"] if row["map50_95"] >= fp32 - drop / 100
                  for b in row["bench"] if b["runtime"] == rt and b.get("median_ms")]
            if ok:
                ms, row = min(ok, key=lambda t: t[0])
                lines.append(f"- Within {drop:g} point(s) of FP32, fastest on {rt}: **{row['scheme']}** "
                             f"({_ms(ms)}, {_times(base.get(rt) / ms if base.get(rt) else None)} FP32, "
                             f"mAP50-95 {row['map50_95']:.4f})")
    lines += _predicted_vs_measured(speed, base)
    lines.append("")
    atomic_write_text(folder / "study-report.md", (folder / "study-report.md").read_text() + "\n".join(lines))


def _predicted_vs_measured(speed: dict, base: dict) -> list[str]:
    """Schemes chosen against a per-layer latency table: the table's prediction beside the measurement on
    the table's runtime. The speed-up is compared too: it holds where the machine's overall speed drifts
    between building the table and timing (docs/results.md, section 6)."""
    rows = [r for r in speed["rows"] if r.get("predicted_ms")]
    if not rows:
        return []
    out = ["", "Latency-budget schemes: the per-layer table's prediction against the measurement on its runtime "
           f"(table threads: {rows[0].get('latency_threads') or 'runtime default'}, timing threads: "
           f"{speed['threads'] or 'runtime default'}).", "",
           "| scheme | runtime | predicted | measured | error | speed-up predicted | speed-up measured | error |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rt = r.get("latency_runtime")
        b = next((b for b in r["bench"] if b["runtime"] == rt), None)
        ms = b.get("median_ms") if b else None
        p_up = r["predicted_float_ms"] / r["predicted_ms"]
        m_up = base.get(rt) / ms if ms and base.get(rt) else None
        out.append(f"| {r['scheme']} | {rt} | {_ms(r['predicted_ms'])} | {_ms(ms) if ms else 'not timed'} | "
                   f"{_pct(r['predicted_ms'] / ms - 1) if ms else '-'} | {_times(p_up)} | {_times(m_up)} | "
                   f"{_pct(p_up / m_up - 1) if m_up else '-'} |")
    return out


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"
