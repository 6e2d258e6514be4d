import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import PRESETS, Format
from lowbit.quantize.apply import apply_manifest, load_quantized, save_quantized, verify
from lowbit.quantize.manifest import Manifest, WeightOptions

NEAREST = WeightOptions(rounding="nearest")  # ModelOpt's max calibration alone


@pytest.fixture(scope="module")
def tiny_calib(tiny):
    from lowbit.data.loader import Batch

    g = torch.Generator().manual_seed(0)
    return [Batch(torch.rand(2, 3, 64, 64, generator=g), [])]


@pytest.mark.parametrize("fmt", [f for f in PRESETS if f != "FP16"] + ["W4A16:b16", "W8A8:pt"])
def test_each_preset_quantizes_exactly_what_it_says(tiny, tiny_calib, fmt):
    from modelopt.torch.quantization.nn import TensorQuantizer

    m = Manifest.uniform("yolov10n.yaml", tiny.layers(), fmt, weights=NEAREST)  # ModelOpt's formats, exactly
    net = apply_manifest(tiny, m, tiny_calib)
    f = m.layers["model.0.conv"]
    wq = net.get_submodule("model.0.conv").weight_quantizer
    assert wq.is_enabled and (wq.num_bits == (4, 3) if f.weight.dtype == "fp8" else wq.num_bits == f.weight.bits)
    iq = net.get_submodule("model.0.conv").input_quantizer
    assert iq.is_enabled == (f.act is not None)
    assert not any(q.is_enabled for n, q in net.named_modules() if "dfl" in n and isinstance(q, TensorQuantizer))
    x = tiny_calib[0].images
    with torch.no_grad():
        assert torch.isfinite(net(x)[0]).all()
        # the random-weight tiny model's final outputs are near-constant; its first conv shows the change
        ref, out = tiny.net.get_submodule("model.0.conv")(x), net.get_submodule("model.0.conv")(x)
    assert not torch.equal(ref, out)


def test_mixed_manifest_and_save_restore_round_trip(tmp_path, tiny, tiny_calib):
    layers = tiny.quantizable_layers()
    assign = {x.name: PRESETS["W4A16"] if i % 2 else PRESETS["W8A8"] for i, x in enumerate(layers[:10])}
    m = Manifest(name="mixed", model="yolov10n.yaml", imgsz=64, layers=assign)
    net = apply_manifest(tiny, m, tiny_calib)
    save_quantized(net, m, tmp_path / "ck")
    restored, m2 = load_quantized(tmp_path / "ck", tiny)
    assert m2.layers == m.layers
    x = tiny_calib[0].images
    with torch.no_grad():
        assert torch.equal(net(x)[0], restored(x)[0])


def test_verify_catches_a_wrong_format(tiny, tiny_calib):
    m = Manifest.uniform("yolov10n.yaml", tiny.layers(), "W8A16", weights=NEAREST)
    net = apply_manifest(tiny, m, tiny_calib)
    wrong = dict(m.layers)
    wrong["model.2.cv1.conv"] = PRESETS["W4A16"]
    with pytest.raises(LowbitError, match="layer model.2.cv1.conv: weight_quantizer"):
        verify(net, wrong)
    del wrong["model.2.cv1.conv"]
    with pytest.raises(LowbitError, match="model.2.cv1.conv: weight_quantizer is enabled but the manifest keeps it float"):
        verify(net, wrong)


def test_manifest_errors_name_the_layer(tmp_path, tiny, tiny_calib):
    bad = Manifest(name="bad", model="x", layers={"model.99.conv": PRESETS["W8A8"]})
    with pytest.raises(LowbitError, match="model.99.conv"):
        apply_manifest(tiny, bad, tiny_calib)
    dfl = Manifest(name="dfl", model="x", layers={"model.23.dfl.conv": PRESETS["W8A8"]})
    with pytest.raises(LowbitError, match="must stay float"):
        apply_manifest(tiny, dfl, tiny_calib)
    p = tmp_path / "m.json"
    p.write_text('{"name": "x"}')
    with pytest.raises(LowbitError, match="not a valid lowbit manifest"):
        Manifest.load(p)
    with pytest.raises(LowbitError, match="not a lowbit quantized checkpoint"):
        load_quantized(tmp_path)


def test_manifests_written_before_full_range_scales_load_as_made(tmp_path, tiny):
    import json

    m = Manifest.uniform("yolov10n.yaml", tiny.layers(), "W4A16")
    assert m.weight_range == "full"
    assert Manifest.load(m.save(tmp_path / "new.json")).weight_range == "full"
    old = m.model_dump(mode="json")
    del old["weight_range"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Manifest.load(tmp_path / "old.json").weight_range == "absmax"


def test_stats(tiny):
    layers = tiny.layers()
    w4 = Manifest.uniform("t", layers, "W4A16").stats
    assert w4.effective_weight_bits == 4 and w4.int4_share == 1 and w4.mean_act_bits == 16
    half = Manifest(name="h", model="t", layers={layers[0].name: Format(name="FP16")})
    assert half.layers[layers[0].name].is_float


@pytest.mark.parametrize("fmt", ["W4A16", "W4A16:pt", "W8A16"])
def test_full_range_scales_reach_the_negative_level_and_clip_no_weight(tiny, tiny_calib, fmt):
    """ModelOpt's max calibration leaves -2^(b-1) unused; "full" scales use it wherever the negative extreme
    dominates, every step is as fine or finer, and every weight stays within half a step of its grid point."""
    nets = {}
    for rng in ("absmax", "full"):
        m = Manifest.uniform("yolov10n.yaml", tiny.layers(), fmt, weights=NEAREST)
        m.weight_range = rng
        nets[rng] = apply_manifest(tiny, m, tiny_calib)
    per_channel = m.layers["model.0.conv"].weight.granularity == "per_channel"
    qmax = 2 ** (int(m.layers["model.0.conv"].weight.bits) - 1) - 1
    finer = dominated = 0
    for name in m.layers:
        w = tiny.net.get_submodule(name).weight.detach()
        flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        # where the most negative weight is the largest by more than (qmax+1)/qmax, only -2^(b-1) holds it;
        # below (qmax+0.5)/qmax it rounds to -qmax
        neg = -flat.amin(1) * qmax > flat.amax(1) * (qmax + 1) * (1 + 1e-6)
        near = -flat.amin(1) * qmax > flat.amax(1) * (qmax + 0.5) * (1 - 1e-6)
        steps = {}
        for rng, net in nets.items():
            wq = net.get_submodule(name).weight_quantizer
            step = wq.amax.detach().reshape(-1, *([1] * (w.dim() - 1))) / qmax
            with torch.no_grad():
                q = wq(w)
            codes = (q / step).reshape(flat.shape)
            assert torch.allclose(codes, codes.round(), atol=1e-3), name  # on the grid
            assert codes.min() >= -qmax - 1 - 1e-3 and codes.max() <= qmax + 1e-3, name
            assert ((q - w).abs() <= step / 2 * (1 + 1e-4) + 1e-12).all(), f"{name}: a weight was clipped"
            steps[rng] = step
            lowest = codes.round().amin(1) == -qmax - 1
            if rng == "full":
                assert lowest[neg].all() and not lowest[~near].any(), name
            else:
                assert not lowest.any(), name
        assert (steps["full"] <= steps["absmax"] * (1 + 1e-6)).all(), name
        finer += int((steps["full"] < steps["absmax"] * 0.999).any())
        dominated += int(neg.sum())
    assert finer > 0 and (dominated > 0 or not per_channel), (finer, dominated)


def _input_gram(net: torch.nn.Module, name: str, images: torch.Tensor) -> torch.Tensor:
    """Layer `name`'s input-patch Gram matrix per group on `images`, averaged over patches."""
    from lowbit.quantize.refine import InputGram

    gram = InputGram()
    hook = net.get_submodule(name).register_forward_hook(gram)
    with torch.no_grad():
        net(images)
    hook.remove()
    return gram.h / gram.n


@pytest.mark.parametrize("name", ["model.8.m.0.cv2.conv", "model.22.m.0.cv1.2.conv"])  # dense 3x3; depthwise 7x7
def test_gptq_beats_plain_rounding_on_the_layer_output(yolov10n, demo_calib_batches, name):
    """On the layer's real calibration inputs, GPTQ's output error is well below plain rounding's."""
    from lowbit.quantize.gptq import gptq_weight
    from lowbit.quantize.refine import fake_quant

    conv = yolov10n.net.get_submodule(name)
    h = _input_gram(yolov10n.net, name, demo_calib_batches[0].images)
    w = conv.weight.detach()
    wf = w.reshape(w.shape[0], -1)
    amax = wf.abs().amax(1)
    plain = fake_quant(wf, amax[:, None], 4)
    gq = gptq_weight(w, h, amax, 4).reshape(wf.shape)
    gidx = torch.arange(w.shape[0]) // (w.shape[0] // conv.groups)

    def out_err(q):  # sum over channels of d^T H d: the layer's output error on these inputs
        d = q - wf
        return float(torch.einsum("ci,cij,cj->", d, h[gidx], d))

    assert torch.allclose(fake_quant(gq, amax[:, None], 4), gq, atol=1e-6)  # on ModelOpt's grid
    assert out_err(gq) < 0.8 * out_err(plain), (out_err(gq), out_err(plain))


@pytest.fixture(scope="module")
def sequential_w4(assets):
    """YOLOv10n at 96 px, W4A16 by gptq-seq on 4 calibration images: (float detector, its state before, net, batches)."""
    from lowbit.data.datasets import load_dataset
    from lowbit.data.loader import make_batches
    from lowbit.models.ultralytics import load_detector

    det = load_detector(assets["model"], imgsz=96)
    batches = make_batches(load_dataset(assets["calib"]).subset(4), 96, 2)
    before = {k: v.clone() for k, v in det.net.state_dict().items()}
    net = apply_manifest(det, Manifest.uniform(det.source, det.layers(), "W4A16", weights=WeightOptions(rounding="gptq-seq"), imgsz=96),
                         batches)
    return det, before, net, batches


@pytest.mark.parametrize("name", ["model.8.m.0.cv2.conv", "model.23.cv3.2.2"])  # deep in the backbone; the head's last
def test_sequential_gptq_rounds_each_layer_on_the_quantized_networks_own_inputs(sequential_w4, name):
    """gptq-seq: a layer's weights are exactly GPTQ of its float weights on the inputs it receives inside the
    finished quantized network (every layer before it already rounded), not on the float network's inputs;
    they stay on ModelOpt's grid, and the float model is left untouched."""
    from lowbit.quantize.gptq import gptq_weight
    from lowbit.quantize.refine import patches

    det, before, net, batches = sequential_w4
    assert all(torch.equal(v, det.net.state_dict()[k]) for k, v in before.items())

    def gram(model):
        cols: list = []
        hook = model.get_submodule(name).register_forward_hook(lambda m, i, o: cols.append(patches(m, i[0])))
        with torch.no_grad():
            for b in batches:
                model(b.images)
        hook.remove()
        return sum((p @ p.transpose(1, 2)).double() for p in cols) / sum(p.shape[-1] for p in cols)

    mod, w = net.get_submodule(name), det.net.get_submodule(name).weight
    amax = mod.weight_quantizer.amax.reshape(-1)
    assert torch.allclose(mod.weight_quantizer(mod.weight), mod.weight, atol=1e-6)  # on ModelOpt's grid
    assert torch.allclose(gptq_weight(w, gram(net), amax, 4), mod.weight, atol=1e-6)
    assert not torch.allclose(gptq_weight(w, gram(det.net), amax, 4), mod.weight, atol=1e-6)


def test_gptq_on_fp8_weights_stays_on_modelopts_grid_and_beats_rounding(yolov10n, demo_calib_batches):
    """FP8 E4M3 per-channel weights: GPTQ's weights are ones ModelOpt's FP8 fake quantization leaves in place, and
    the layer's output error on its calibration inputs is below plain FP8 rounding's."""
    from lowbit.formats import parse_format
    from lowbit.quantize.apply import quantize_layers
    from lowbit.quantize.gptq import FP8_MAX, gptq_weight
    from lowbit.quantize.manifest import WeightRecipe

    name = "model.8.m.0.cv2.conv"
    conv = yolov10n.net.get_submodule(name)
    h = _input_gram(yolov10n.net, name, demo_calib_batches[0].images)
    w = conv.weight.detach()
    wf = w.reshape(w.shape[0], -1)
    amax = wf.abs().amax(1)
    scale = (amax / FP8_MAX)[:, None]
    plain = (wf / scale).to(torch.float8_e4m3fn).float() * scale
    gq = gptq_weight(w, h, amax, 8, fp8=True).reshape(wf.shape)

    def out_err(q):
        d = (q - wf).double()
        return float(torch.einsum("ci,ij,cj->", d, h[0].double(), d))

    assert out_err(gq) < 0.7 * out_err(plain), (out_err(gq), out_err(plain))
    # the whole path: quantize_layers with GPTQ rounding leaves FP8 weights where ModelOpt's quantizer puts them
    fmt = parse_format("W8A8-FP8:pc")
    net = quantize_layers(yolov10n.net, {name: fmt}, demo_calib_batches[:1], "max", WeightRecipe(rounding="gptq"))
    q = net.get_submodule(name)
    with torch.no_grad():
        assert torch.allclose(q.weight_quantizer(q.weight), q.weight, rtol=1e-5, atol=1e-7)
    assert not torch.equal(q.weight, conv.weight)


def test_a_manifest_written_when_weight_clip_carried_the_rounding_reads_as_it_was_made(tmp_path, tiny):
    """Before `rounding` had its own field, `weight_clip` named both: "gptq" = max clip + GPTQ rounding, "max" =
    ModelOpt alone (nearest), "output+gptq" = output clip + GPTQ. Such files (and configs) keep their meaning."""
    import json

    from lowbit.config import QuantizeConfig

    m = Manifest.uniform("yolov10n.yaml", tiny.layers(), "W8A16", weights=NEAREST)
    for old, clip, rounding in [("gptq", "max", "gptq"), ("max", "max", "nearest"), ("output+gptq", "output", "gptq"),
                                ("gptq-seq", "max", "gptq-seq")]:
        data = json.loads(m.model_dump_json())
        del data["rounding"]
        data["weight_clip"] = old
        (tmp_path / "m.json").write_text(json.dumps(data))
        back = Manifest.load(tmp_path / "m.json")
        assert (back.weight_clip, back.rounding) == (clip, rounding), old
        cfg = QuantizeConfig(model="m.pt", calib={"path": "x"}, weight_clip=old)
        assert (cfg.weight_clip, cfg.rounding) == (clip, rounding)
    assert QuantizeConfig(model="m.pt", calib={"path": "x"}).weight_recipe.rounding == "gptq"  # today's default
    with pytest.raises(Exception):
        QuantizeConfig(model="m.pt", calib={"path": "x"}, weight_clip="gptq", rounding="nearest")
