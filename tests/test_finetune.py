"""Distillation fine-tuning and block reconstruction on the real YOLOv10n at a small image size (CPU)."""

import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.finetune.distill import FinetuneConfig, _head, finetune, head_loss
from lowbit.quantize.apply import apply_manifest, load_quantized, save_quantized, verify
from lowbit.quantize.manifest import Manifest

IMGSZ = 128


@pytest.fixture(scope="module")
def small(assets):
    from lowbit.models.ultralytics import load_detector

    return load_detector(assets["model"], imgsz=IMGSZ)


@pytest.fixture(scope="module")
def batches(assets):
    from lowbit.data.datasets import load_dataset
    from lowbit.data.loader import make_batches

    return make_batches(load_dataset(assets["calib"]), IMGSZ, 8)


@pytest.fixture(scope="module")
def w4(small, batches):
    m = Manifest.uniform(small.source, small.layers(), "W4A16", weight_clip="max", imgsz=IMGSZ)
    return m, apply_manifest(small, m, batches)


def _distance(net, teacher, batches):
    reg_max = teacher.model[-1].reg_max
    with torch.no_grad():
        return sum(float(head_loss(_head(net(b.images)), _head(teacher(b.images)), reg_max)) for b in batches)


def test_head_loss_is_zero_only_at_agreement(small, batches):
    with torch.no_grad():
        t = _head(small.net(batches[0].images))
    assert abs(float(head_loss(t, t, 16))) < 1e-5
    s = {k: v + 0.5 * torch.randn_like(v) if k != "feats" else v for k, v in t.items()}
    assert float(head_loss(s, t, 16)) > 0.01


@pytest.mark.parametrize("cfg", [FinetuneConfig(epochs=4, lr=1e-4, flip=False),
                                 FinetuneConfig(epochs=4, lr=1e-4, learn_scales=True),
                                 FinetuneConfig(mode="blocks", block_steps=8, lr=1e-4),
                                 FinetuneConfig(mode="blocks", block_steps=8, lr=1e-4, flip_copies=True),
                                 FinetuneConfig(mode="blocks", block_steps=8, lr=1e-4, mosaic=8)],
                         ids=["distill", "distill-lsq", "blocks", "blocks-flip-copies", "blocks-mosaic"])
def test_finetune_brings_the_quantized_model_closer_to_its_teacher(small, batches, w4, cfg):
    manifest, base = w4
    net = copy.deepcopy(base)
    before = _distance(net, small.net, batches)
    res = finetune(net, small.net, batches, cfg, progress=False)
    assert res.steps > 0
    assert _distance(net, small.net, batches) < 0.9 * before
    verify(net, manifest.layers)  # still exactly the manifest's formats
    assert not any(p.requires_grad for p in net.parameters())


def test_zero_learning_rate_changes_nothing_and_the_result_restores(tmp_path, small, batches, w4):
    manifest, base = w4
    x = batches[0].images
    with torch.no_grad():
        ref = base(x)[0]
    net = copy.deepcopy(base)
    finetune(net, small.net, batches, FinetuneConfig(epochs=1, lr=0.0, learn_scales=True), progress=False)
    with torch.no_grad():
        out = net(x)[0]
    assert torch.allclose(out, ref, atol=1e-3 * float(ref.abs().max()))  # the LSQ twin is ModelOpt's quantizer
    finetune(net, small.net, batches, FinetuneConfig(epochs=2, lr=1e-4), progress=False)
    save_quantized(net, manifest, tmp_path / "ckpt")
    restored, _ = load_quantized(tmp_path / "ckpt", small)
    with torch.no_grad():
        assert torch.equal(restored(x)[0], net(x)[0])
        assert not torch.equal(restored(x)[0], ref)


def test_mosaic_quadrants_are_crops_of_training_images():
    from lowbit.data.loader import Batch
    from lowbit.finetune.distill import mosaic_batches

    colours = torch.linspace(0.1, 0.9, 6)
    pool = [Batch(colours[s:s + 3, None, None, None].expand(3, 3, 64, 64).clone(), []) for s in (0, 3)]
    out = mosaic_batches(pool, 10, 4, seed=1)
    assert [b.images.shape[0] for b in out] == [4, 4, 2] and out[0].images.shape[1:] == (3, 64, 64)
    used = set()
    for img in torch.cat([b.images for b in out]):
        for quad in (img[:, :32, :32], img[:, :32, 32:], img[:, 32:, :32], img[:, 32:, 32:]):
            v = quad.flatten()
            assert torch.allclose(v, v[0].expand_as(v)), "a quadrant mixes images"
            k = int(torch.argmin((colours - v[0]).abs()))
            assert abs(float(colours[k] - v[0])) < 1e-6
            used.add(k)
    assert len(used) == 6  # drawn from the whole pool, not one batch


def test_fisher_block_loss_is_refused_outside_block_modes(small, batches, w4):
    with pytest.raises(LowbitError, match="block_loss 'fisher'.*needs mode blocks or adaround"):
        finetune(copy.deepcopy(w4[1]), small.net, batches, FinetuneConfig(block_loss="fisher"), progress=False)


def test_mosaic_adds_training_steps_and_refuses_labels(small, batches, w4):
    _, base = w4
    net = copy.deepcopy(base)
    res = finetune(net, small.net, batches, FinetuneConfig(epochs=1, lr=1e-5, mosaic=12, batch=8), progress=False)
    assert res.steps == len(batches) + 2
    with pytest.raises(LowbitError, match="mosaic images have no labels"):
        finetune(net, small.net, batches, FinetuneConfig(mosaic=4, label_weight=1.0), progress=False)


def test_run_finetune_refuses_to_train_on_evaluation_images(tmp_path, small, batches, w4, assets):
    from lowbit.api import DataConfig, FinetuneRunConfig, run_finetune

    manifest, base = w4
    save_quantized(base, manifest, tmp_path / "ckpt")
    val = DataConfig(path=assets["val"])
    cfg = FinetuneRunConfig(checkpoint=str(tmp_path / "ckpt"), calib=val, eval=val)
    with pytest.raises(LowbitError, match="share 32 image"):
        run_finetune(cfg, tmp_path / "run", progress=False)
    cfg = FinetuneRunConfig(checkpoint=str(tmp_path / "ckpt"), calib=DataConfig(path=assets["calib"]),
                            finetune=FinetuneConfig(label_weight=1.0))
    with pytest.raises(LowbitError, match="needs labelled images"):
        run_finetune(cfg, tmp_path / "run2", progress=False)


def test_cli_finetune_writes_a_checkpoint_and_before_after(tmp_path, small, batches, w4, assets):
    from typer.testing import CliRunner

    from lowbit.cli import app

    manifest, base = w4
    save_quantized(base, manifest, tmp_path / "ckpt")
    r = CliRunner().invoke(app, ["finetune", "-c", str(tmp_path / "ckpt"), "--calib", assets["calib"], "-d", assets["val"],
                                 "--max-images", "8", "--epochs", "1", "--lr", "1e-4", "--seed", "3", "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "mAP50-95" in r.output and (tmp_path / "run" / "checkpoint" / "modelopt.pth").is_file()
    net, m = load_quantized(tmp_path / "run" / "checkpoint")
    assert m.origin["finetune"]["mode"] == "distill" and m.origin["finetune"]["seed"] == 3 and m.imgsz == IMGSZ


@pytest.mark.parametrize("cfg", [FinetuneConfig(mode="adaround", block_steps=24, round_lr=1e-2, round_start="nearest"),
                                 FinetuneConfig(mode="adaround", block_steps=24, round_lr=1e-2, round_start="nearest",
                                                block_loss="fisher", fisher_samples=2),
                                 FinetuneConfig(mode="adaround-global", epochs=3, round_lr=1e-2, round_start="nearest",
                                                scale_jitter=0.2)],
                         ids=["block-wise", "block-wise-fisher", "global"])
def test_adaround_learns_rounding_only_and_leaves_weights_on_modelopt_grid(small, batches, w4, cfg):
    manifest, base = w4
    net = copy.deepcopy(base)
    before = _distance(net, small.net, batches)
    biases = {n: p.clone() for n, p in net.named_parameters() if n.endswith("bias")}
    res = finetune(net, small.net, batches, cfg, progress=False)
    assert res.steps > 0 and res.mode == cfg.mode
    assert all(torch.equal(p, biases[n]) for n, p in net.named_parameters() if n in biases)  # round_bias is off
    assert _distance(net, small.net, batches) < before
    verify(net, manifest.layers)
    teacher = dict(small.net.named_modules())
    flips = 0
    for name, mod in net.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is None or not wq.is_enabled or not isinstance(wq.num_bits, int):
            continue
        with torch.no_grad():
            assert torch.equal(wq(mod.weight), mod.weight), f"{name}: weight off ModelOpt's grid"
        step = wq.amax.reshape(-1, *[1] * (mod.weight.dim() - 1)) / 7
        dist = (mod.weight - teacher[name].weight).abs() / step
        assert float(dist.max()) <= 1.0 + 1e-4, f"{name}: a weight moved more than one grid step"
        flips += int((dist > 0.5 + 1e-4).sum())  # rounded away from the nearest grid point
    assert flips > 0


def test_adaround_without_steps_starts_where_it_says(small, batches, w4):
    from lowbit.finetune.adaround import AdaRoundBlock

    _, base = w4  # ModelOpt's round-to-nearest
    net = copy.deepcopy(base)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        ref = net(x)[0]
        AdaRoundBlock(net, small.net, "nearest").finish()
        assert torch.allclose(net(x)[0], ref, atol=1e-4 * float(ref.abs().max()))
    finetune(net, small.net, batches, FinetuneConfig(mode="adaround", block_steps=16, round_lr=1e-2, round_start="nearest"), progress=False)
    with torch.no_grad():
        tuned = net(x)[0]
        assert not torch.allclose(tuned, ref, atol=1e-4 * float(ref.abs().max()))
        AdaRoundBlock(net, small.net, "current").finish()  # the tuned rounding, kept as it is
        assert torch.equal(net(x)[0], tuned)


@pytest.mark.parametrize("mode", ["adaround", "adaround-global"])
def test_adaround_with_round_bias_moves_biases_and_keeps_weights_on_grid(small, batches, w4, mode):
    manifest, base = w4
    net = copy.deepcopy(base)
    biases = {n: p.clone() for n, p in net.named_parameters() if n.endswith("bias")}
    cfg = FinetuneConfig(mode=mode, block_steps=8, epochs=1, round_lr=1e-2, lr=1e-3, round_bias=True)
    finetune(net, small.net, batches, cfg, progress=False)
    moved = [n for n, p in net.named_parameters() if n in biases and not torch.equal(p, biases[n])]
    assert moved and not any(".dfl." in n for n in moved)  # the DFL decoder stays fixed
    verify(net, manifest.layers)
    for name, mod in net.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is not None and wq.is_enabled and isinstance(wq.num_bits, int):
            with torch.no_grad():
                assert torch.equal(wq(mod.weight), mod.weight), f"{name}: weight off ModelOpt's grid"


@pytest.mark.parametrize("mode", ["adaround", "adaround-global"])
def test_adaround_learned_steps_land_in_modelopt_quantizers(small, batches, w4, mode):
    manifest, base = w4
    net = copy.deepcopy(base)
    amax = {n: m.weight_quantizer.amax.clone() for n, m in net.named_modules()
            if getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.is_enabled}
    before = _distance(net, small.net, batches)
    # step lr 3e-3: from full-range scales 1e-2 overshoots in the 16 end-to-end steps (19.3 -> 21.0; 3e-3: -> 18.6)
    finetune(net, small.net, batches, FinetuneConfig(mode=mode, block_steps=16, epochs=2, round_lr=1e-2, lr=3e-3,
                                                     learn_scales=True), progress=False)
    assert _distance(net, small.net, batches) < before
    verify(net, manifest.layers)
    changed = 0
    for name, mod in net.named_modules():
        if name in amax:
            wq = mod.weight_quantizer
            changed += not torch.equal(wq.amax, amax[name])
            with torch.no_grad():  # the rounded integers times the learned step: exactly ModelOpt's grid
                assert torch.allclose(wq(mod.weight), mod.weight, rtol=0, atol=1e-6 * float(wq.amax.max())), name
    assert changed > len(amax) // 2


def test_global_adaround_needs_integer_weights(small, batches):
    with pytest.raises(LowbitError, match="no calibrated integer weight quantizer"):
        finetune(copy.deepcopy(small.net), small.net, batches, FinetuneConfig(mode="adaround-global"), progress=False)


@pytest.mark.parametrize("k", [16, 19])
def test_fisher_weights_predict_the_head_loss_of_a_perturbed_block_output(small, batches, k):
    """Gaussian noise of variance s^2 on block k's output raises head_loss by s^2/2 times the sum of the
    Fisher weights (its second-order expansion; head_loss is 0 with zero gradient at the teacher)."""
    from lowbit.finetune.distill import _run_from
    from lowbit.finetune.fisher import block_fisher
    from lowbit.models.ultralytics import block_input

    blocks, reg_max = list(small.net.model), small.net.model[-1].reg_max
    x, ys = batches[0].images[:2], []
    with torch.no_grad():
        for m in blocks[:k + 1]:
            x = m(block_input(m, x, ys))
            ys.append(x)
        t = _head(_run_from(blocks, k, x, ys[:k]))
    gen = torch.Generator().manual_seed(0)
    w = block_fisher(lambda y: _head(_run_from(blocks, k, y, ys[:k])), x, reg_max, 256, gen)
    assert w.shape == x.shape and bool((w >= 0).all())
    sigma = 3e-2 * float(x.std())  # small enough to be quadratic, large enough for float32's cancellation
    with torch.no_grad():
        rise = [float(head_loss(_head(_run_from(blocks, k, x + sigma * torch.randn(x.shape, generator=gen), ys[:k])),
                                t, reg_max)) for _ in range(64)]
    predicted = 0.5 * sigma ** 2 * float(w.sum())
    assert sum(rise) / len(rise) == pytest.approx(predicted, rel=0.3)
