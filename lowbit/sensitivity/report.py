"""Sensitivity reports (JSON, Markdown, PNG), the sweep index, and rank agreement between methods."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from lowbit.io import atomic_write_bytes, atomic_write_text, read_json, write_json
from lowbit.models.layers import LayerInfo

REPORT_JSON = "layer-sensitivity-report.json"


class LayerScores(LayerInfo):
    scores: dict[str, float]
    ranks: dict[str, int]  # 1 = most sensitive, per format


class SensitivityReport(BaseModel):
    model: str
    method: str
    formats: list[str]
    images: int
    imgsz: int
    device: str
    seconds: float  # this invocation's time
    resumed_scores: int = 0  # scores taken from an earlier, interrupted invocation
    rows: list[LayerScores]

    def score_matrix(self, fmt: str) -> dict[str, float]:
        return {r.name: r.scores[fmt] for r in self.rows if fmt in r.scores}

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityReport":
        path = Path(path)
        return cls.model_validate(read_json(path / REPORT_JSON if path.is_dir() else path))


def build_report(model: str, method: str, formats: list[str], layers: list[LayerInfo], table: dict[str, dict[str, float]],
                 images: int, imgsz: int, device: str, seconds: float, resumed: int = 0) -> SensitivityReport:
    ranks: dict[str, dict[str, int]] = {}
    for f in formats:
        order = sorted((n for n in table if f in table[n]), key=lambda n: -table[n][f])
        for i, n in enumerate(order, 1):
            ranks.setdefault(n, {})[f] = i
    rows = [LayerScores(**layer.model_dump(), scores=table.get(layer.name, {}), ranks=ranks.get(layer.name, {}))
            for layer in layers]
    return SensitivityReport(model=model, method=method, formats=formats, images=images, imgsz=imgsz, device=device,
                             seconds=seconds, resumed_scores=resumed, rows=rows)


def _markdown(rep: SensitivityReport) -> str:
    lines = [f"# Layer sensitivity: {rep.method}", "",
             f"model `{rep.model}`, {rep.images} scoring images at {rep.imgsz} px, {rep.device}, {rep.seconds:.1f} s"
             + (f" ({rep.resumed_scores} scores resumed from an earlier run)" if rep.resumed_scores else ""), "",
             "Score: higher means quantizing this layer alone hurts more. Rank 1 is the most sensitive layer for that format.", "",
             "| # | layer | type | role | params | MMACs | " + " | ".join(f"{f} score | {f} rank" for f in rep.formats) + " |",
             "|---|---|---|---|---|---|" + "---|---|" * len(rep.formats)]
    for i, r in enumerate(rep.rows):
        cells = " | ".join(f"{r.scores.get(f, float('nan')):.4g} | {r.ranks.get(f, '-')}" for f in rep.formats)
        lines.append(f"| {i} | `{r.name}` | {r.type} | {r.role} | {r.params:,} | {r.macs / 1e6:.1f} | {cells} |")
    for f in rep.formats:
        top = sorted((r for r in rep.rows if f in r.scores), key=lambda r: -r.scores[f])[:10]
        lines += ["", f"Most sensitive under {f}: " + ", ".join(f"`{r.name}`" for r in top)]
    return "\n".join(lines) + "\n"


def chart(rep: SensitivityReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep.rows
    fig, ax = plt.subplots(figsize=(max(10, len(rows) * 0.14), 4.5))
    x = np.arange(len(rows))
    every = np.array([v for r in rows for v in r.scores.values()], float)
    nonzero = np.abs(every[np.isfinite(every) & (every != 0)])
    for f in rep.formats:
        y = np.array([r.scores.get(f, np.nan) for r in rows], float)
        ax.plot(x, y, marker="o", ms=3, lw=1, label=f)
    # symlog: ablation drops can be zero or negative (noise); a log axis would hide them
    ax.set_yscale("symlog", linthresh=float(np.percentile(nonzero, 10)) if len(nonzero) else 1e-6)
    head = [i for i, r in enumerate(rows) if r.role.startswith("head")]
    if head:
        ax.axvspan(head[0] - 0.5, len(rows) - 0.5, color="0.9", zorder=0, label="detection head")
    for f in rep.formats[:1]:
        for r in sorted((r for r in rows if f in r.scores), key=lambda r: -r.scores[f])[:3]:
            i = rows.index(r)
            ax.annotate(r.name.removeprefix("model."), (i, r.scores[f]), fontsize=7, rotation=30,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("layer (network order)")
    ax.set_ylabel(f"{rep.method} score (symlog)")
    ax.set_title(f"Per-layer sensitivity of {Path(rep.model).name}: {rep.method}")
    ax.set_xlim(-1, len(rows))
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(rep: SensitivityReport, folder: Path, index_csv: Path | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / REPORT_JSON, rep)
    atomic_write_text(folder / "layer-sensitivity-report.md", _markdown(rep))
    atomic_write_bytes(folder / "layer-sensitivity.png", chart(rep))
    if index_csv is not None:
        _append_index(index_csv, rep, folder)


def _append_index(path: Path, rep: SensitivityReport, folder: Path) -> None:
    fields = ["time", "folder", "model", "method", "formats", "layers", "images", "device", "seconds"]
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["folder"] != str(folder)]
    rows.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "folder": str(folder), "model": rep.model,
                 "method": rep.method, "formats": " ".join(rep.formats), "layers": len(rep.rows), "images": rep.images,
                 "device": rep.device, "seconds": f"{rep.seconds:.1f}"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


class Agreement(BaseModel):
    method_a: str
    method_b: str
    format: str
    layers: int
    spearman: float
    kendall: float
    top_k: int
    top_k_overlap: float


def agreement(reports: list[SensitivityReport], top_k: int = 10) -> list[Agreement]:
    """Rank agreement of every pair of methods on every format they share."""
    from scipy.stats import kendalltau, spearmanr

    out = []
    for i, a in enumerate(reports):
        for b in reports[i + 1:]:
            for f in a.formats:
                if f not in b.formats:
                    continue
                sa, sb = a.score_matrix(f), b.score_matrix(f)
                common = [n for n in sa if n in sb]
                if len(common) < 3:
                    continue
                va, vb = [sa[n] for n in common], [sb[n] for n in common]
                k = min(top_k, len(common))
                ta = set(sorted(common, key=lambda n: -sa[n])[:k])
                tb = set(sorted(common, key=lambda n: -sb[n])[:k])
                out.append(Agreement(method_a=a.method, method_b=b.method, format=f, layers=len(common),
                                     spearman=float(spearmanr(va, vb).statistic), kendall=float(kendalltau(va, vb).statistic),
                                     top_k=k, top_k_overlap=len(ta & tb) / k))
    return out


def agreement_markdown(rows: list[Agreement]) -> str:
    lines = ["# Rank agreement between sensitivity methods", "",
             "| method A | method B | format | layers | Spearman | Kendall | top-K overlap |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method_a} | {r.method_b} | {r.format} | {r.layers} | {r.spearman:.3f} | {r.kendall:.3f} | "
                     f"{r.top_k_overlap:.0%} of {r.top_k} |")
    return "\n".join(lines) + "\n"
