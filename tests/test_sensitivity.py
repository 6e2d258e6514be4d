import copy
import json

import pytest
import torch

from lowbit.data.loader import make_batches
from lowbit.formats import parse_formats
from lowbit.sensitivity.base import ScoreStore, SensitivityContext, SingleLayerProbe, fingerprint, get_method
from lowbit.sensitivity.report import agreement, build_report

LAYERS = ["model.2.cv1.conv", "model.4.cv1.conv", "model.6.cv1.conv", "model.8.cv1.conv"]
FRAGILE = "model.6.cv1.conv"


@pytest.fixture(scope="module")
def fragile_ctx(yolov10n, demo_val):
    """YOLOv10n at 320 px with one layer made fragile: a single huge weight, so per-tensor INT4
    rounds every other weight of that layer to zero."""
    from lowbit.models.ultralytics import Detector

    net = copy.deepcopy(yolov10n.net)
    with torch.no_grad():
        w = net.get_submodule(FRAGILE).weight
        w[0, 0, 0, 0] = w.abs().max() * 8  # at 60x the gradient method (a local Taylor estimate) misranks it
    det = Detector(net=net, source="fragile", names=yolov10n.names, imgsz=320)
    layers = [x for x in det.layers() if x.name in LAYERS]
    ds = demo_val.subset(8)
    return SensitivityContext(det, make_batches(ds, 320, 4), parse_formats("W4A16:pt"), layers, progress=False,
                              options={"dataset": ds})


@pytest.mark.parametrize("method", ["distortion", "gradient", "gradient-selfsup", "ablation", "onnx"])
def test_fragile_layer_ranks_most_sensitive(tmp_path, fragile_ctx, method):
    ctx = copy.copy(fragile_ctx)
    ctx.options = {**ctx.options, "autoquant_checkpoint": str(tmp_path / "aq.pth")}
    store = ScoreStore(tmp_path / "s.jsonl", "fp")
    get_method(method)(ctx, store)
    scores = {layer: v["W4A16:pt"] for layer, v in store.table().items()}
    assert set(scores) == set(LAYERS)
    assert max(scores, key=scores.get) == FRAGILE, scores


def test_probe_enables_exactly_one_layer(fragile_ctx):
    probe = SingleLayerProbe(fragile_ctx, fragile_ctx.formats[0])
    with probe.only(FRAGILE) as net:
        on = [n for n, m in net.named_modules() if n.endswith("quantizer") and m.is_enabled]
    assert on == [f"{FRAGILE}.weight_quantizer"]
    assert not any(m.is_enabled for n, m in probe.net.named_modules() if n.endswith("quantizer"))


def test_killed_sweep_resumes_without_recomputing(tmp_path, fragile_ctx, monkeypatch):
    path = tmp_path / "scores.jsonl"
    get_method("distortion")(fragile_ctx, ScoreStore(path, "fp1"))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + '\n{"layer": "model.8.cv1.co')  # killed mid-write
    probed = []
    real_only = SingleLayerProbe.only
    monkeypatch.setattr(SingleLayerProbe, "only", lambda self, layer: probed.append(layer) or real_only(self, layer))
    store = ScoreStore(path, "fp1")
    assert len(store.scores) == 2
    get_method("distortion")(fragile_ctx, store)
    assert sorted(probed) == sorted(LAYERS[2:]) and len(store.table()) == 4
    assert len(ScoreStore(path, "other inputs").scores) == 0  # a store for other inputs starts fresh


def test_unknown_method():
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="unknown sensitivity method 'kl'"):
        get_method("kl")


def test_report_and_agreement(yolov10n):
    layers = yolov10n.quantizable_layers()[:5]
    a = build_report("m", "a", ["W4A16"], layers, {x.name: {"W4A16": i} for i, x in enumerate(layers)}, 4, 640, "cpu", 1.0)
    b = build_report("m", "b", ["W4A16"], layers, {x.name: {"W4A16": -i} for i, x in enumerate(layers)}, 4, 640, "cpu", 1.0)
    assert a.rows[-1].ranks["W4A16"] == 1
    (r,) = agreement([a, b], top_k=2)
    assert r.spearman == pytest.approx(-1) and r.top_k_overlap == 0


def test_cli_writes_reports_index_and_agreement(tmp_path, assets):
    from typer.testing import CliRunner

    from lowbit.cli import app

    out = tmp_path / "runs" / "s"
    r = CliRunner().invoke(app, ["sensitivity", "-m", assets["model"], "--calib", assets["val"], "--calib-images", "2",
                                 "--imgsz", "256", "--method", "distortion,gradient", "-f", "W4A16",
                                 "--layers", "model.2.*,model.23.cv3.0.*", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for m in ("distortion", "gradient"):
        for f in ("layer-sensitivity-report.json", "layer-sensitivity-report.md", "layer-sensitivity.png"):
            assert (out / m / f).stat().st_size > 0
    rep = json.loads((out / "distortion" / "layer-sensitivity-report.json").read_text())
    assert len(rep["rows"]) == 9 and all("W4A16" in row["scores"] for row in rep["rows"])
    assert (tmp_path / "runs" / "sensitivity-index.csv").read_text().count("\n") == 3
    assert "Spearman" in (out / "agreement.md").read_text()
    assert fingerprint(1, 2) != fingerprint(2, 1)


def test_onnx_method_on_a_bare_onnx_graph(tmp_path, yolov10n, assets):
    """An .onnx with no PyTorch source: the head maps are found in the graph, layers keep PyTorch's names,
    and only the ONNX-native method is accepted."""
    import onnx
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.export.onnx_qdq import export_float_onnx
    from lowbit.sensitivity.onnx_node import head_outputs, scored_weights

    model = export_float_onnx(copy.deepcopy(yolov10n.net), 64)  # real weights, tiny images: fast
    heads = head_outputs(model, scored_weights(model))
    assert len(heads) == 6 and not any("dfl" in h for h in heads)  # 3 levels x (box, class), DFL decoder set aside
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    run = CliRunner().invoke(app, ["sensitivity", "-m", str(path), "--calib", assets["calib"], "--method", "onnx",
                                   "-f", "W8A8", "--calib-images", "2", "--imgsz", "64", "-o", str(tmp_path / "s")])
    assert run.exit_code == 0, run.output
    rep = json.loads((tmp_path / "s" / "onnx" / "layer-sensitivity-report.json").read_text())
    names = {r["name"] for r in rep["rows"]}
    assert names == {x.name for x in yolov10n.quantizable_layers()}  # ONNX layers map 1:1 onto PyTorch modules
    assert all(r["scores"]["W8A8"] > 0 for r in rep["rows"])
    bad = CliRunner().invoke(app, ["sensitivity", "-m", str(path), "--calib", assets["calib"], "--method", "gradient",
                                   "--calib-images", "2", "--imgsz", "64", "-o", str(tmp_path / "s2")])
    assert "scored by the 'onnx' method only" in str(bad.exception)
