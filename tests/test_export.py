import json

import numpy as np
import onnx
import pytest
import torch

from lowbit import targets
from lowbit.errors import LowbitError
from lowbit.export.onnx_qdq import export_float_onnx, export_qdq_onnx
from lowbit.formats import parse_format
from lowbit.quantize.apply import apply_manifest
from lowbit.quantize.manifest import Manifest, WeightOptions

NEAREST = WeightOptions(rounding="nearest")  # ModelOpt's max calibration alone


@pytest.fixture(scope="module")
def tiny_batches(tiny):
    from lowbit.data.loader import Batch

    g = torch.Generator().manual_seed(1)
    return [Batch(torch.rand(2, 3, 64, 64, generator=g), [])]


def _mixed(tiny, formats):
    layers = tiny.quantizable_layers()
    return Manifest(name="mixed", model="yolov10n.yaml", imgsz=64,
                    layers={x.name: parse_format(formats[i % len(formats)]) for i, x in enumerate(layers)})


def test_weight_only_mixed_int4_int8_matches_pytorch(tmp_path, tiny, tiny_batches):
    m = _mixed(tiny, ["W4A16", "W8A16", "W4A16:pt"])
    q = apply_manifest(tiny, m, tiny_batches)
    info = export_qdq_onnx(tiny.net, q, m, tmp_path / "m.onnx", parity_images=tiny_batches[0].images, target="tensorrt")
    model = onnx.load(info.path)
    assert model.opset_import[0].version == 21
    w4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(w4) == info.weight_dtypes["int4"] > 0 and info.weight_dtypes["int8"] > 0
    # full-range scales (the default) store -8 where a channel's negative extreme dominates
    assert m.weight_range == "full" and min(int(onnx.numpy_helper.to_array(i).min()) for i in w4) == -8
    assert info.parity_max_abs < 1e-3 * max(1.0, float(np.abs(q(tiny_batches[0].images)[0].numpy()).max()))
    assert not info.deployable and "INT4" in info.deploy_note


def test_int8_and_fp8_activations_run_in_onnx_runtime(tmp_path, tiny, tiny_batches):
    from lowbit.evaluate.runners import OrtRunner

    for fmts, dtype in ((["W8A8"], "int8"), (["W8A8-FP8", "W4A8-FP8"], "fp8")):
        m = _mixed(tiny, fmts)
        q = apply_manifest(tiny, m, tiny_batches)
        info = export_qdq_onnx(tiny.net, q, m, tmp_path / f"{dtype}.onnx", target="tensorrt")
        assert info.activation_qdq == len(m.layers)
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(info.path).graph.initializer}
        for layer in ("model.0.conv", "model.9.cv2.conv", "model.23.cv3.0.2"):  # the scales ModelOpt calibrated
            amax = q.get_submodule(layer).input_quantizer.amax.item()
            assert float(inits[f"{layer}.input_scale"]) == pytest.approx(amax / (127 if dtype == "int8" else 448), rel=1e-6)
        out = OrtRunner(info.path)(tiny_batches[0].images[:1])
        ref = q(tiny_batches[0].images[:1])[0]
        assert out.shape == ref.shape and torch.isfinite(out).all()
    assert targets.check("tensorrt", _mixed(tiny, ["W8A8"])).deployable


def test_fp8_schemes_read_the_image_in_int8(tmp_path, tiny, tiny_batches):
    """The image is 8-bit data: every FP8 scheme lowbit builds (uniform in PyTorch, uniform on an ONNX graph,
    searched) gives the conv that reads it INT8 weights and activations, and says so in the manifest; the Q/DQ graph
    carries both encodings, ONNX Runtime runs it, TensorRT's rules run every layer in low precision."""
    from lowbit.evaluate.runners import OrtRunner
    from lowbit.quantize.onnx_ptq import quantize_graph, uniform_manifest
    from lowbit.search import allocate
    from lowbit.sensitivity.report import build_report

    layers = tiny.layers()
    assert [x.name for x in layers if x.reads_image] == ["model.0.conv"]
    m = Manifest.uniform("yolov10n.yaml", layers, "W8A8-FP8:pc", weights=NEAREST, imgsz=64)
    assert m.layers["model.0.conv"].name == "W8A8" and m.origin["image_input"] == {"model.0.conv": "W8A8"}
    assert {f.name for n, f in m.layers.items() if n != "model.0.conv"} == {"W8A8-FP8:pc"}
    assert Manifest.uniform("yolov10n.yaml", layers, "W4A8-FP8").layers["model.0.conv"].name == "W4A8"
    assert "image_input" not in Manifest.uniform("yolov10n.yaml", layers, "W8A8").origin  # INT8 is left alone

    q = apply_manifest(tiny, m, tiny_batches)
    info = export_qdq_onnx(tiny.net, q, m, tmp_path / "fp8.onnx", target="tensorrt")
    zero_points = {i.name: i.data_type for i in onnx.load(info.path).graph.initializer if i.name.endswith(".input_zp")}
    assert zero_points.pop("model.0.conv.input_zp") == onnx.TensorProto.INT8
    assert set(zero_points.values()) == {onnx.TensorProto.FLOAT8E4M3FN}
    out = OrtRunner(info.path)(tiny_batches[0].images[:1])
    assert torch.isfinite(out).all()
    groups = {x.name: 1 for x in layers}  # FP8 depthwise is the search's business, not this rule's
    assert targets.check("tensorrt", m, groups).deployable

    float_graph = export_float_onnx(tiny.net, 64)
    native = uniform_manifest(float_graph, "tiny.onnx", "W8A8-FP8:pc")
    assert native.origin["image_input"] == {"model.0.conv": "W8A8"}
    written = quantize_graph(float_graph, native, tiny_batches[0].images.numpy())
    assert written["activation_dtype"] == "fp8+int8" and written["weight_dtypes"] == {"int8": 1, "fp8": len(layers) - 2}

    rep = build_report("yolov10n.yaml", "synthetic", ["W8A8-FP8:pc"], tiny.quantizable_layers(),
                       {x.name: {"W8A8-FP8:pc": 0.01} for x in layers}, 4, 64, "cpu", 0.0)
    p = allocate.Problem(rep, ["W8A8-FP8:pc"], cost="bitops")
    searched = allocate.budget(p, p.bounds()[0] + 1e-9)  # every layer quantized
    assert searched.layers["model.0.conv"].name == "W8A8" and searched.origin["image_input"]


def test_real_model_map_agrees_with_pytorch(tmp_path, yolov10n, demo_val, demo_calib_batches):
    """The issue's bar: the Q/DQ ONNX's mAP within 0.003 of the fake-quant model's."""
    from lowbit.evaluate.coco import evaluate

    m = Manifest.uniform(yolov10n.source, yolov10n.layers(), "W4A16")
    q = apply_manifest(yolov10n, m, demo_calib_batches)
    info = export_qdq_onnx(yolov10n.net, q, m, tmp_path / "w4.onnx", target="tensorrt")
    ds = demo_val.subset(8)
    pt = evaluate(q, ds, yolov10n.names, progress=False, warmup=0).map50_95
    ox = evaluate(info.path, ds, yolov10n.names, progress=False, warmup=0).map50_95
    assert pt > 0.2 and abs(pt - ox) < 0.003


def test_block_size_must_divide_channels(tmp_path, tiny, tiny_batches):
    m = Manifest.uniform("yolov10n.yaml", tiny.layers(), "W4A16:b16")
    q = apply_manifest(tiny, m, tiny_batches)
    with pytest.raises(LowbitError, match="layer model.0.conv: block size 16 does not divide 3 input channels"):
        export_qdq_onnx(tiny.net, q, m, tmp_path / "b.onnx", target="tensorrt")


def test_bench_times_present_runtimes_checks_outputs_and_lists_absent_ones(tmp_path, tiny, tiny_batches, monkeypatch):
    from lowbit.data.loader import Batch
    from lowbit.evaluate import bench, runners

    m = Manifest.uniform("yolov10n.yaml", tiny.layers(), "W8A8", weights=NEAREST, imgsz=64)
    info = export_qdq_onnx(tiny.net, apply_manifest(tiny, m, tiny_batches), m, tmp_path / "q.onnx", target="openvino-cpu",
                           calib_images=tiny_batches[0].images.numpy())
    onnx.save(export_float_onnx(tiny.net, 64), str(tmp_path / "f.onnx"))
    models = [tmp_path / "f.onnx", info.path]
    verify = [Batch(tiny_batches[0].images[:1], [])]
    rows = {(r.model, r.runtime): r for r in bench.bench_models(models, threads=1, warmup=1, reps=3, verify=verify)}
    f, q = str(models[0]), str(info.path)
    assert rows[(f, "ort-cpu")].median_ms > 0 and rows[(f, "ort-cpu")].parity is None  # the reference itself
    assert not rows[(q, "ort-cuda")].present and rows[(q, "ort-cuda")].median_ms is None
    assert "absent" in rows[(q, "ort-cuda")].note and not rows[(q, "tensorrt")].present
    ov = rows[(q, "openvino-cpu")]  # in the pinned stack: it must run, say what the convs ran in, and agree with ORT
    assert ov.present and ov.median_ms > 0 and ov.parity is not None and ov.parity.ok
    assert sum(n for p, n in ov.executed.items() if p in ("u8", "i8")) > len(m.layers) // 2, ov.executed
    assert ov.speedup == pytest.approx(rows[(f, "openvino-cpu")].median_ms / ov.median_ms)
    assert rows[(f, "ort-cpu")].speedup == 1.0
    if bench.openvino_default_precision() != "f32":  # the honest FP32 baseline beside OpenVINO's bf16 default
        assert set(rows[(f, "openvino-cpu-f32")].executed) == {"f32"}
        assert ov.speedup_vs_f32 == pytest.approx(rows[(f, "openvino-cpu-f32")].median_ms / ov.median_ms)

    # a runtime that computes something else is reported as failing, and is not timed
    real = runners.OpenVinoRunner._run_all
    monkeypatch.setattr(runners.OpenVinoRunner, "_run_all",
                        lambda self, x, extra=None: [o * 0.5 for o in real(self, x, extra)])
    rows = bench.bench_models(models, threads=1, warmup=0, reps=1, verify=verify)
    bad = [r for r in rows if r.runtime.startswith("openvino")]
    assert bad and all(r.failed and r.median_ms is None and "DIVERGES" in r.note for r in bad)
    monkeypatch.undo()

    from typer.testing import CliRunner

    from lowbit.cli import app

    r = CliRunner().invoke(app, ["bench", *map(str, models), "--threads", "1", "--reps", "2", "--verify-images", "2",
                                 "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "b" / "results.json").read_text())
    assert got["host"]["cpu"] and {x["model"] for x in got["results"]} == {f, q}
    assert [x["runtime"] for x in got["results"] if x["model"] == q].count("openvino-cpu") == 1
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    rows = {r.runtime: r for r in bench.bench(info.path, threads=1, warmup=0, reps=1)}
    assert not rows["tensorrt"].present and not rows["openvino-cpu"].present


def test_onnx_native_path_needs_no_pytorch(tmp_path, tiny, tiny_batches):
    from lowbit.evaluate.runners import OrtRunner
    from lowbit.quantize.onnx_ptq import quantize_onnx, uniform_manifest
    from lowbit.quantize.qdq import conv_layers

    float_model = export_float_onnx(tiny.net, 64)
    src = tmp_path / "float.onnx"
    src.write_bytes(float_model.SerializeToString())
    assert len(conv_layers(float_model)) == 83 and [o.name for o in float_model.graph.output] == ["output0"]
    x = tiny_batches[0].images[:1]
    ref = OrtRunner(src)(x)
    m = uniform_manifest(float_model, str(src), "W8A16", "nearest")
    assert "model.23.dfl.conv" not in m.layers and len(m.layers) == 82
    w8 = quantize_onnx(src, m, tmp_path / "w8.onnx")
    out = OrtRunner(w8.path)(x)
    assert w8.weight_dtypes == {"int8": 82} and torch.allclose(out, ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
    # full-range INT4 scales (the default): the same codes as the PyTorch path's
    w4m = uniform_manifest(float_model, str(src), "W4A16", "nearest")
    native = quantize_onnx(src, w4m, tmp_path / "w4n.onnx", target="size")
    assert native.deployable and not targets.check("openvino-cpu", w4m).deployable
    via_torch = export_qdq_onnx(tiny.net, apply_manifest(tiny, w4m, tiny_batches), w4m, tmp_path / "w4t.onnx", target="tensorrt")
    codes = [{i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(e.path).graph.initializer
              if i.data_type == onnx.TensorProto.INT4} for e in (native, via_torch)]
    assert codes[0].keys() == codes[1].keys() and len(codes[0]) == 82
    assert all(np.array_equal(codes[0][k], codes[1][k]) for k in codes[0])
    assert min(int(c.min()) for c in codes[0].values()) == -8
    images = tiny_batches[0].images.numpy()
    a8 = quantize_onnx(src, uniform_manifest(float_model, str(src), "W8A8"), tmp_path / "a8.onnx", images, "tensorrt")
    assert a8.activation_qdq == 82 and a8.activation_dtype == "int8" and torch.isfinite(OrtRunner(a8.path)(x)).all()
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(a8.path).graph.initializer}
    assert inits["model.0.conv.input_zp"].dtype == np.int8 and int(inits["model.0.conv.input_zp"]) == 0
    # OpenVINO's encoding: asymmetric UINT8, quantized once where each tensor is produced (a Concat of several
    # tensors shares one quantizer), every consumer reading it
    u8 = quantize_onnx(src, uniform_manifest(float_model, str(src), "W8A8"), tmp_path / "u8.onnx", images, "openvino-cpu")
    g = onnx.load(u8.path).graph
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert u8.activation_dtype == "uint8" and len(qs) == u8.activation_qdq < 82
    consumers = {c.op_type for q in qs for dq in g.node if dq.op_type == "DequantizeLinear" and dq.input[0] == q.output[0]
                 for c in g.node if dq.output[0] in c.input}
    assert {"Conv", "Concat"} <= consumers
    assert torch.allclose(OrtRunner(u8.path)(x), OrtRunner(a8.path)(x), atol=0.2 * float(ref.abs().max()))
    # the AMX encoding: the same places, symmetric INT8 (zero point 0) for OpenVINO's faster INT8 convs there
    s8 = quantize_onnx(src, uniform_manifest(float_model, str(src), "W8A8"), tmp_path / "s8.onnx", images, "openvino-amx")
    g8 = onnx.load(s8.path).graph
    zps = [onnx.numpy_helper.to_array(i) for i in g8.initializer if i.name in {q.input[2] for q in g8.node
                                                                              if q.op_type == "QuantizeLinear"}]
    assert s8.activation_dtype == "int8" and s8.activation_qdq == u8.activation_qdq
    assert zps and all(z.dtype == np.int8 and int(z) == 0 for z in zps)
    assert torch.allclose(OrtRunner(s8.path)(x), OrtRunner(u8.path)(x), atol=0.2 * float(ref.abs().max()))
    with pytest.raises(LowbitError, match="activation formats need calibration images"):
        quantize_onnx(src, uniform_manifest(float_model, str(src), "W8A8", "nearest"), tmp_path / "x.onnx")
    bad = Manifest(name="b", model=str(src), layers={"model.99.conv": parse_format("W8A16")}, rounding="nearest")
    with pytest.raises(LowbitError, match="names layer 'model.99.conv'"):
        quantize_onnx(src, bad, tmp_path / "y.onnx")
    gptq = Manifest(name="g", model=str(src), layers={"model.0.conv": parse_format("W4A16")}, rounding="gptq")
    with pytest.raises(LowbitError, match="GPTQ weight rounding on the graph needs calibration images"):
        quantize_onnx(src, gptq, tmp_path / "z.onnx")
    seq = gptq.model_copy(update={"rounding": "gptq-seq"})
    with pytest.raises(LowbitError, match="rounding 'gptq-seq', which needs the PyTorch model"):
        quantize_onnx(src, seq, tmp_path / "z.onnx")
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "z.onnx").exists()


@pytest.mark.parametrize("fmt", ["W4A16", "W8A16"])
def test_gptq_on_the_graph_keeps_the_grid_and_lowers_the_layer_error(tmp_path, tiny, tiny_batches, fmt):
    """GPTQ on an ONNX graph (conv input statistics from ONNX Runtime): every weight stays on the grid plain
    rounding writes (same scales), some round the other way, and what GPTQ minimises, each conv's output error on
    the calibration inputs (tr(E H E^T) with E the weight error and H the input-patch Gram), is lower summed over
    the convs than plain rounding's. (The tiny model has random weights, so the network's final output is no
    test: its error moves either way with the draw.)"""
    from lowbit.quantize.onnx_ptq import collect_input_stats, quantize_onnx, uniform_manifest
    from lowbit.quantize.qdq import conv_layers, conv_weights

    float_model = export_float_onnx(tiny.net, 64)
    src = tmp_path / "float.onnx"
    src.write_bytes(float_model.SerializeToString())
    images = torch.cat([b.images for b in tiny_batches]).numpy()
    got = {}
    for rounding in ("nearest", "gptq"):
        info = quantize_onnx(src, uniform_manifest(float_model, str(src), fmt, rounding), tmp_path / f"{rounding}.onnx",
                             images, "size")
        assert info.rounding == rounding and info.source == "onnx"
        got[rounding] = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(info.path).graph.initializer
                     if i.name.endswith((".weight_q", ".weight_scale"))}
    assert got["nearest"].keys() == got["gptq"].keys() and len(got["nearest"]) == 2 * 82
    scales = [k for k in got["nearest"] if k.endswith("_scale")]
    assert all(np.array_equal(got["nearest"][k], got["gptq"][k]) for k in scales)  # the same grid
    codes = [k for k in got["nearest"] if k.endswith("_q")]
    moved = sum(int((got["nearest"][k].astype(np.int32) != got["gptq"][k].astype(np.int32)).sum()) for k in codes)
    assert moved > 0
    refs = {n: r for n, r in conv_layers(float_model).items() if f"{n}.weight_q" in got["nearest"]}
    dense = {n: r for n, r in refs.items() if conv_weights(float_model, {n: r})[n].shape[1] > 1}  # groups == 1
    _, grams = collect_input_stats(float_model, [], images, gram_convs=dense)
    weights = conv_weights(float_model, dense)
    err = {}
    for rounding, t in got.items():
        total = 0.0
        for n, g in grams.items():
            w = weights[n].astype(np.float64)
            q, sc = t[f"{n}.weight_q"].astype(np.float64), t[f"{n}.weight_scale"].astype(np.float64)
            e = (q * sc.reshape(-1, *[1] * (q.ndim - 1)) - w).reshape(w.shape[0], -1)
            total += float(np.einsum("ok,kl,ol->", e, (g.h[0] / g.n).double().numpy(), e))
        err[rounding] = total
    assert err["gptq"] < 0.9 * err["nearest"], err


def test_calibrators_choose_the_ranges_they_promise():
    from lowbit.quantize.onnx_ptq import ActivationCalibration, InputStats, choose_range

    rng = np.random.default_rng(0)
    st = InputStats()
    for _ in range(8):  # SiLU-like activations with one huge outlier per image
        x = np.maximum(rng.normal(0.5, 1.0, (1, 4, 32, 32)), -0.28).astype(np.float32)
        x[0, 0, 0, 0] = 40.0
        st.add(x, 512, rng)
    cal = lambda method: ActivationCalibration(method=method)  # noqa: E731
    mx = choose_range(st, "uint8", cal("max"), None)
    assert mx.dtype == "uint8" and mx.scale == pytest.approx((40.0 + 0.28) / 255, rel=1e-3)
    assert mx.fake(np.array([-0.28, 40.0], np.float32)) == pytest.approx([-0.28, 40.0], abs=mx.scale)
    sym = choose_range(st, "int8", cal("max"), None)
    assert sym.zero_point == 0 and sym.scale == pytest.approx(40.0 / 127, rel=1e-6)
    # the outlier is in every image: the mean of per-image maxima keeps it; a percentile and MSE clip it
    assert choose_range(st, "uint8", cal("mean-minmax"), None).scale == pytest.approx(mx.scale, rel=1e-3)
    pct = choose_range(st, "uint8", ActivationCalibration(method="percentile", percentile=99.9), None)
    assert pct.scale < mx.scale / 4
    # mse: the least quantization error on the sampled values, clipping included, among its candidate ranges
    m = choose_range(st, "uint8", cal("mse"), None)
    sample = st.sample
    err = lambda q: float(((q.fake(sample) - sample) ** 2).mean())  # noqa: E731
    assert err(m) <= err(mx) and err(m) < err(pct)
    # zero is exactly representable (padding and zeros stay exact)
    assert m.fake(np.zeros(1, np.float32))[0] == 0.0


def test_deployability_rules_per_target():
    from lowbit.targets import check, layer_verdict

    fmt = parse_format
    assert layer_verdict("openvino-cpu", fmt("W8A8"))[0] and layer_verdict("tensorrt", fmt("W8A8"))[0]
    for target in ("openvino-cpu", "tensorrt", "onnxruntime-cpu"):
        ok, why = layer_verdict(target, fmt("W4A8"))
        assert not ok and "INT4" in why  # INT4 convolutions run faster nowhere
        assert not layer_verdict(target, fmt("W4A16"))[0] and not layer_verdict(target, fmt("W8A16"))[0]
        assert not layer_verdict(target, fmt("W8A8:b32"))[0]
    assert layer_verdict("size", fmt("W4A16"))[0]
    assert layer_verdict("tensorrt", fmt("W8A8-FP8"))[0]
    ok, why = layer_verdict("tensorrt", fmt("W8A8-FP8"), groups=32)
    assert not ok and "depthwise" in why  # FP8 grouped/depthwise convs are flagged for TensorRT
    assert not layer_verdict("openvino-cpu", fmt("W8A8-FP8"))[0]
    m = Manifest(name="m", model="x", layers={"a": fmt("W8A8"), "b": fmt("W4A16")})
    rep = check("openvino-cpu", m)
    assert not rep.deployable and set(rep.not_low_precision) == {"b"} and "1 of 2" in rep.summary()
    assert check("size", m).deployable
    with pytest.raises(LowbitError, match="unknown target 'gpu'"):
        check("gpu", m)


def test_openvino_artifact_agrees_with_onnx_runtime_on_real_images(tmp_path, yolov10n, demo_val):
    """lowbit's INT8 artifact for OpenVINO computes on OpenVINO what ONNX Runtime computes on the same graph:
    the check whose absence let OpenVINO timings of mis-computed graphs pass for speed-ups."""
    from lowbit.data.loader import make_batches
    from lowbit.evaluate import parity
    from lowbit.evaluate.runners import make_runner
    from lowbit.quantize.onnx_ptq import quantize_onnx, uniform_manifest

    onnx.save(export_float_onnx(yolov10n.net, 640), str(tmp_path / "f.onnx"))
    batches = make_batches(demo_val.subset(6), 640, 1)
    calib = torch.cat([b.images for b in batches[:4]]).numpy()
    m = uniform_manifest(onnx.load(str(tmp_path / "f.onnx")), str(tmp_path / "f.onnx"), "W8A8")
    info = quantize_onnx(tmp_path / "f.onnx", m, tmp_path / "ov.onnx", calib, "openvino-cpu")
    ref = make_runner(info.path, "onnxruntime")
    for runtime in ("openvino", "openvino-f32"):
        p = parity.check(ref, make_runner(info.path, runtime), batches, 80, 640)
        assert p.ok and p.reference_detections > 10, p.note
    # and the check is not blind: the same graph with its activation scales doubled on one runtime is caught
    broken = onnx.load(info.path)
    for i in broken.graph.initializer:
        if i.name.endswith(".act_scale"):
            i.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(i) * np.float32(8), i.name))
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    assert not parity.check(ref, make_runner(tmp_path / "broken.onnx", "openvino"), batches, 80, 640).ok


def test_latency_table_maps_every_conv_to_its_layer(tmp_path, tiny, tiny_batches):
    """OpenVINO's profiler times each conv of the float and the Q/DQ graph under its PyTorch layer name."""
    from lowbit.evaluate.layer_latency import latency_table, predict_ms
    from lowbit.search import allocate
    from lowbit.sensitivity.report import build_report

    m = Manifest.uniform("yolov10n.yaml", tiny.layers(), "W8A8", weights=NEAREST)
    q = export_qdq_onnx(tiny.net, apply_manifest(tiny, m, tiny_batches), m, tmp_path / "q.onnx", target="tensorrt")
    onnx.save(export_float_onnx(tiny.net, 64), str(tmp_path / "f.onnx"))
    table = latency_table(tmp_path / "f.onnx", {"W8A8": q.path}, threads=1, reps=2, probe_switches=False)
    layers = table["layers"]
    assert set(m.layers) <= set(layers), set(m.layers) - set(layers)
    assert all(v["FP16"] >= 0 and "W8A8" in v for v in layers.values())
    # the profiler counts whole microseconds: a depthwise conv at 64 px may read 0 in a run
    assert sum(v["FP16"] > 0 for v in layers.values()) >= 0.9 * len(layers)
    assert table["fixed_ms"] > 0 and set(table["wall_ms"]) == {"FP16", "W8A8"}
    # each precision's profiled times are scaled to wall time, so a uniform graph is predicted exactly
    assert layers == {k: {f: ms * table["scale"][f] for f, ms in v.items()} for k, v in table["profiled"].items()}
    assert predict_ms(table, {}) == pytest.approx(table["wall_ms"]["FP16"])
    assert predict_ms(table, {k: "W8A8" for k in layers}) == pytest.approx(table["wall_ms"]["W8A8"])
    quantizable = tiny.quantizable_layers()
    rep = build_report("tiny", "t", ["W8A8"], quantizable, {x.name: {"W8A8": 1.0} for x in quantizable}, 1, 64, "cpu", 0.0)
    p = allocate.Problem(rep, ["W8A8"], cost="latency", latency_table=layers)
    lo, hi = p.bounds()
    limit = (lo + hi) / 2
    chosen = allocate.budget(p, limit)
    full = {x.name: chosen.layers.get(x.name, allocate.FP16) for x in p.layers}
    assert p.total(full)[1] <= limit + 1e-9  # (at 64 px int8 convs are not always the cheaper choice)

    # the study's search takes the same table from its config
    from lowbit.config import DataConfig
    from lowbit.io import write_json
    from lowbit.config import SearchSpec, StudyConfig
    from lowbit.study import StudyContext, search

    write_json(tmp_path / "t.json", table)
    cfg = StudyConfig(model="m", calib=DataConfig(path="c"), eval=DataConfig(path="e"))
    spec = SearchSpec(method="t", formats=["W8A8"], cost="latency", latency_table=str(tmp_path / "t.json"), budgets=[limit])
    ctx = StudyContext(cfg, tiny, run=None, calib=None, evalset=None)  # a search without ModelOpt's needs no data
    got = search(ctx, spec, {"t": rep})
    assert [g.layers for g in got] == [chosen.layers]  # and no random baselines, which match INT4 shares
    assert got[0].origin["predicted_ms"] == pytest.approx(predict_ms(table, {n: f.name for n, f in chosen.layers.items()}))
    assert got[0].origin["predicted_float_ms"] == pytest.approx(table["wall_ms"]["FP16"])

    # the study report sets the prediction beside the measurement
    from lowbit.report.study_report import predicted_vs_measured

    rows = [{"scheme": "lat", "predicted_ms": 20.0, "predicted_float_ms": 32.0, "latency_ms": 25.0, "speedup": 1.2}]
    assert "| lat | 20.0 ms | 25.0 ms | -20.0% | 1.60x | 1.20x | +33.3% |" in predicted_vs_measured(rows)
    with pytest.raises(LowbitError, match="search.latency_table .*missing.json: file not found"):
        search(ctx, spec.model_copy(update={"latency_table": str(tmp_path / "missing.json")}), {"t": rep})


def test_mixed_graph_edges_and_switch_priced_search(tmp_path, tiny, tiny_batches):
    """Mixed graphs built from the two uniform ones reproduce each; edges link convs; a switch price changes
    the search's choice away from a scheme that switches at every edge."""
    import onnxruntime as ort

    from lowbit.evaluate.layer_latency import conv_edges, mix_qdq_graph, predict_ms, switches
    from lowbit.export.qdq_lint import check_qdq
    from lowbit.search import allocate
    from lowbit.sensitivity.report import build_report

    m = Manifest.uniform("yolov10n.yaml", tiny.layers(), "W8A8", weights=NEAREST)
    q = export_qdq_onnx(tiny.net, apply_manifest(tiny, m, tiny_batches), m, tmp_path / "q.onnx", target="tensorrt")
    onnx.save(export_float_onnx(tiny.net, m.imgsz), str(tmp_path / "f.onnx"))
    edges = conv_edges(tmp_path / "f.onnx")
    assert ("model.0.conv", "model.1.conv") in edges
    assert {a for a, _ in edges} | {b for _, b in edges} <= {x.name for x in tiny.layers()}

    x = np.random.default_rng(0).random((1, 3, m.imgsz, m.imgsz), dtype=np.float32)

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"images": x})[0]

    half = set(sorted(m.layers)[::2])
    mixed = mix_qdq_graph(tmp_path / "f.onnx", q.path, half, tmp_path / "mix.onnx")
    rep = check_qdq(mixed)
    assert rep.weight_quantized == rep.input_quantized == len(half) and rep.violations() == []
    none = mix_qdq_graph(tmp_path / "f.onnx", q.path, set(), tmp_path / "none.onnx")
    allq = mix_qdq_graph(tmp_path / "f.onnx", q.path, set(m.layers), tmp_path / "all.onnx")
    np.testing.assert_array_equal(run(none), run(tmp_path / "f.onnx"))
    np.testing.assert_array_equal(run(allq), run(q.path))
    assert switches(edges, set()) == 0 and switches(edges, half) > 0

    # four layers in a chain; INT8 halves a conv's cost; two of them are free to quantize, and they alternate
    names = [x.name for x in tiny.quantizable_layers()[:4]]
    chain = list(zip(names, names[1:]))
    infos = [x for x in tiny.quantizable_layers() if x.name in names]
    scores = {n: {"W8A8": [0.0, 100.0, 0.0, 100.0][i]} for i, n in enumerate(names)}
    report = build_report("tiny", "t", ["W8A8"], infos, scores, 1, 64, "cpu", 0.0)
    table = {n: {"FP16": 1.0, "W8A8": 0.5} for n in names}
    free = allocate.budget(allocate.Problem(report, ["W8A8"], cost="latency", latency_table=table), 3.0)
    assert set(free.layers) == {names[0], names[2]}  # no switch price: the two harmless layers, 3 switches
    priced = allocate.Problem(report, ["W8A8"], cost="latency", latency_table=table, switch_ms={"W8A8": 0.2}, edges=chain)
    chosen = allocate.budget(priced, 3.3)
    assign = {n: chosen.layers.get(n, allocate.FP16) for n in names}
    assert set(chosen.layers) != {names[0], names[2]} and priced.total(assign)[1] <= 3.3 + 1e-9
    full = {"layers": table, "fixed_ms": 1.0, "edges": chain, "switch_ms": {"W8A8": 0.2}}
    assert predict_ms(full, {names[0]: "W8A8", names[2]: "W8A8"}) == pytest.approx(3.0 + 1.0 + 3 * 0.2)


def test_qdq_rules_hold_for_lowbit_exports_and_catch_broken_graphs(tmp_path, tiny, tiny_batches):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.export.qdq_lint import check_qdq

    m = _mixed(tiny, ["W8A8"])
    info = export_qdq_onnx(tiny.net, apply_manifest(tiny, m, tiny_batches), m, tmp_path / "w8a8.onnx", target="tensorrt")
    rep = check_qdq(info.path)
    assert rep.violations() == []
    assert rep.weight_quantized == rep.input_quantized == len(m.layers)  # every conv but the DFL decoder
    assert rep.weight_dtypes == {"int8": len(m.layers)} and set(rep.activation_consumers) == {"Conv"}
    assert CliRunner().invoke(app, ["check-qdq", str(info.path)]).exit_code == 0

    # break each rule once: re-quantize a dequantized input (ping-pong), quantize a Sigmoid's input (no
    # low-precision kernel), give one weight a non-zero zero point (asymmetric)
    model = onnx.load(info.path)
    g = model.graph
    dq = next(n for n in g.node if n.name.endswith("/input_DQ"))
    conv = next(n for n in g.node if dq.output[0] in n.input)
    q2 = onnx.helper.make_node("QuantizeLinear", [dq.output[0], dq.input[1], dq.input[2]], ["pp_q"], name="pp_q")
    dq2 = onnx.helper.make_node("DequantizeLinear", ["pp_q", dq.input[1], dq.input[2]], ["pp_dq"], name="pp_dq")
    conv.input[0] = "pp_dq"
    sig = next(n for n in g.node if n.op_type == "Sigmoid")
    q3 = onnx.helper.make_node("QuantizeLinear", [sig.input[0], dq.input[1], dq.input[2]], ["fo_q"], name="fo_q")
    dq3 = onnx.helper.make_node("DequantizeLinear", ["fo_q", dq.input[1], dq.input[2]], ["fo_dq"], name="fo_dq")
    sig.input[0] = "fo_dq"
    g.node.extend([q2, dq2, q3, dq3])
    wdq = next(n for n in g.node if n.name.endswith("/weight_DQ"))
    scale, w = (onnx.numpy_helper.to_array(next(i for i in g.initializer if i.name == wdq.input[k])) for k in (1, 0))
    g.initializer.append(onnx.numpy_helper.from_array(np.ones(scale.shape, w.dtype), "asym_zp"))
    wdq.input.append("asym_zp")
    onnx.save(model, str(tmp_path / "broken.onnx"))
    bad = check_qdq(tmp_path / "broken.onnx")
    assert bad.ping_pong == [dq.name] and bad.float_only_qdq == ["fo_q"] and len(bad.weight_asymmetric) == 1
    assert len(bad.violations()) == 3
    r = CliRunner().invoke(app, ["check-qdq", str(tmp_path / "broken.onnx")])
    assert r.exit_code == 1 and "ping-pong" in r.output


@pytest.mark.parametrize("out_channels, per_tensor", [(1, False), (2, True)])
def test_one_scale_is_per_channel_only_for_a_conv_of_one_output_channel(tmp_path, out_channels, per_tensor):
    from onnx import TensorProto, helper, numpy_helper

    from lowbit.export.qdq_lint import check_qdq

    w = np.ones((out_channels, 2, 3, 3), np.int8)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.array(0.1, np.float32), "w_scale")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="conv/weight_DQ"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "c.onnx"))
    rep = check_qdq(tmp_path / "c.onnx")
    assert rep.weight_quantized == 1 and rep.weight_dtypes == {"int8": 1}
    assert bool(rep.weight_per_tensor_int8) == per_tensor


def test_image_convs_found_through_a_space_to_depth_stem():
    """A Focus stem (slices of the image, concatenated) still feeds the image to its conv; the conv after it does not
    read the image."""
    from onnx import TensorProto, helper, numpy_helper

    from lowbit.quantize.qdq import image_convs

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    w1 = np.random.default_rng(0).normal(size=(8, 12, 3, 3)).astype(np.float32)
    w2 = np.random.default_rng(1).normal(size=(8, 8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Div", ["images", "k255"], ["x"])]
    for i, (h, w) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        nodes.append(helper.make_node("Slice", ["x", f"st{i}", "end", "axes", "step"], [f"s{i}"]))
    nodes += [helper.make_node("Concat", [f"s{i}" for i in range(4)], ["focus"], axis=1),
              helper.make_node("Conv", ["focus", "stem.weight"], ["c1"], name="/stem/Conv", pads=[1, 1, 1, 1]),
              helper.make_node("Conv", ["c1", "next.weight"], ["c2"], name="/next/Conv")]
    inits = [const("k255", np.float32(255)), const("end", np.array([2**31 - 1] * 2, np.int64)),
             const("axes", np.array([2, 3], np.int64)), const("step", np.array([2, 2], np.int64)),
             const("stem.weight", w1), const("next.weight", w2)]
    inits += [const(f"st{i}", np.array([h, w], np.int64)) for i, (h, w) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)])]
    g = helper.make_graph(nodes, "focus", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("c2", TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    assert image_convs(model) == {"stem"}


def test_keep_worst_keeps_the_inputs_that_most_change_the_outputs_float(tmp_path, tiny, tiny_batches):
    """`keep_worst`: the K convs whose quantized input alone most changes the head maps keep a float input (no
    Q/DQ in front of them), are reported, and are the K the probe ranks worst."""
    from lowbit.quantize.onnx_ptq import ActivationCalibration, quantize_onnx, uniform_manifest
    from lowbit.sensitivity.onnx_node import OnnxProbe

    float_model = export_float_onnx(tiny.net, 64)
    src = tmp_path / "float.onnx"
    src.write_bytes(float_model.SerializeToString())
    images = torch.cat([b.images for b in tiny_batches]).numpy()
    m = uniform_manifest(float_model, str(src), "W8A8", "nearest")
    base = quantize_onnx(src, m, tmp_path / "a.onnx", images, "tensorrt")
    cal = ActivationCalibration(keep_worst=3, keep_worst_images=4)
    kept = quantize_onnx(src, m, tmp_path / "b.onnx", images, "tensorrt", cal)
    extra = set(kept.activations_kept_float) - set(base.activations_kept_float)
    assert len(extra) == 3 and kept.activation_qdq == base.activation_qdq - 3  # beyond what max_error keeps
    g = onnx.load(kept.path).graph
    assert not any(n.name == f"{layer}/input_Q" for layer in extra for n in g.node)
    # the three are the probe's worst (inputs quantized alone, weights float)
    probe = OnnxProbe(float_model, images[:4], act_dtype="int8")
    act_only = parse_format("W8A8").model_copy(update={"weight": None})
    scores = {n: probe.score(n, act_only) for n in m.layers if n not in base.activations_kept_float}
    assert extra == set(sorted(scores, key=scores.get, reverse=True)[:3])
    assert set(kept.activations_kept_float_by_output) == extra
    with pytest.raises(LowbitError, match="keep_worst measures each conv"):
        quantize_onnx(src, m, tmp_path / "c.onnx", images, "openvino-cpu", cal)


def test_quantize_onnx_reports_how_far_the_head_maps_moved(tmp_path, tiny, tiny_batches):
    """The head-map error against the float graph (lowbit warns past 0.05): zero-ish for INT8 weights, larger for
    INT4, and computed on FP8 graphs too (ONNX Runtime's CPU fusion has no FP8 kernels)."""
    from lowbit.quantize.onnx_ptq import quantize_onnx, uniform_manifest

    float_model = export_float_onnx(tiny.net, 64)
    src = tmp_path / "float.onnx"
    src.write_bytes(float_model.SerializeToString())
    images = torch.cat([b.images for b in tiny_batches]).numpy()
    err = {f: quantize_onnx(src, uniform_manifest(float_model, str(src), f, "nearest"), tmp_path / f"{f[:5]}.onnx",
                            images, "tensorrt").head_error for f in ("W8A16", "W4A16", "W8A8-FP8:pc")}
    assert 0 < err["W8A16"] < err["W4A16"] and err["W8A8-FP8:pc"] > 0, err
    assert quantize_onnx(src, uniform_manifest(float_model, str(src), "W8A16", "nearest"), tmp_path / "n.onnx").head_error is None


class _SharedRangeNet(torch.nn.Module):
    """Two branches joined by a Concat: one large and nearly unused, one small that the next conv amplifies. Quantized
    where produced, the Concat's sources share one range and the small branch rounds to zero, though it holds a
    negligible share of the joined tensor's signal (what the signal-loss rule weighs, channels alike)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.big, self.small = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.big.weight.copy_(torch.randn(8, 3, 3, 3, generator=g) * 20)
            self.small.weight.copy_(torch.randn(8, 3, 3, 3, generator=g) * 0.05)
            self.head.weight.copy_(torch.cat([torch.randn(4, 8, 1, 1, generator=g) * 1e-3,
                                              torch.randn(4, 8, 1, 1, generator=g) * 10], 1))

    def forward(self, x):
        return self.head(torch.cat([self.big(x), torch.relu(self.small(x))], 1))


def test_compounding_check_keeps_float_what_only_the_outputs_show(tmp_path):
    """The whole quantized graph against the float one: a quantizer that ruins the head maps while losing almost
    none of its own tensor's signal is found, kept float and named; without the check the graph is ruined; a graph
    that did not collapse is left as it is. The switches the check tries quantizers with compute what the written
    graph does."""
    from lowbit.quantize.onnx_ptq import ActivationCalibration, head_map_error, quantize_onnx, uniform_manifest
    from lowbit.quantize.qdq import load_graph

    src = tmp_path / "float.onnx"
    torch.onnx.export(_SharedRangeNet().eval(), torch.rand(1, 3, 32, 32), str(src), opset_version=17, dynamo=False,
                      input_names=["images"])
    float_model = load_graph(src)
    images = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    m = uniform_manifest(float_model, str(src), "W8A8", "nearest")
    off = quantize_onnx(src, m, tmp_path / "off.onnx", images, "openvino-cpu", ActivationCalibration(compounding=False))
    assert off.head_error > 0.5 and not off.activations_kept_float  # ruined, and the signal-loss rule saw nothing
    on = quantize_onnx(src, m, tmp_path / "on.onnx", images, "openvino-cpu")
    (unit, err), = on.activations_kept_float_by_compounding.items()
    assert len(unit.split("+")) == 2 and err == on.head_error < 0.01 and on.activation_qdq == off.activation_qdq - 2
    g = onnx.load(on.path).graph
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in unit.split("+") for n in g.node)
    (layer, loss), = on.activations_kept_float.items()  # the conv the Concat feeds reads it float, and says so
    assert layer == "head" and loss < 0.02
    # past the error that says the outputs collapsed, the best removal is taken whatever share it takes away
    collapsed = quantize_onnx(src, m, tmp_path / "c.onnx", images, "openvino-cpu", ActivationCalibration(compound_share=1))
    assert collapsed.activations_kept_float_by_compounding == on.activations_kept_float_by_compounding
    # the error reported is the written graph's, on the same 8 images
    assert head_map_error(float_model, onnx.load(on.path), images) == pytest.approx(on.head_error, rel=1e-4)
    # consumer placement, every quantizer the check takes: the written graph is what the switches computed
    assert not quantize_onnx(src, m, tmp_path / "t.onnx", images, "tensorrt").activations_kept_float_by_compounding
    cal = ActivationCalibration(compound_above=0.0, compound_floor=0.0, compound_share=1e-9)
    trt = quantize_onnx(src, m, tmp_path / "trt.onnx", images, "tensorrt", cal)
    assert trt.activations_kept_float_by_compounding  # a graph under the collapse is checked only when asked
    g = onnx.load(trt.path).graph
    assert not any(n.name == f"{layer}/input_Q" for layer in trt.activations_kept_float_by_compounding for n in g.node)
    assert head_map_error(float_model, onnx.load(trt.path), images) == pytest.approx(trt.head_error, rel=1e-4)
