"""Block-wise AdaRound fine-tuning on the real YOLOv10n at a small image size (CPU)."""

import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.finetune.blockwise import RECIPES, AdaRoundConfig, finetune, head_loss
from lowbit.models.ultralytics import head_maps as _head
from lowbit.quantize.apply import apply_manifest, load_quantized, save_quantized, verify
from lowbit.quantize.manifest import Manifest, WeightOptions

NEAREST = WeightOptions(rounding="nearest")  # ModelOpt's max calibration alone

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
    m = Manifest.uniform(small.source, small.layers(), "W4A16", weights=NEAREST, imgsz=IMGSZ)
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


@pytest.mark.parametrize("recipe", ["mixed", "w4"])
def test_each_recipe_brings_the_quantized_model_closer_to_its_teacher(small, batches, w4, recipe):
    manifest, base = w4
    net = copy.deepcopy(base)
    before = _distance(net, small.net, batches)
    # the recipe at a smoke-test size: 16 steps, so faster rates (from a start that is not round-to-nearest, a
    # rounding needs ~90 steps at the recipe's 1e-2 to flip)
    cfg = RECIPES[recipe].model_copy(update={"block_steps": 16, "batch": 8, "fisher_samples": 2, "round_lr": 0.3,
                                             "step_lr": 3e-3})
    res = finetune(net, small.net, batches, cfg, progress=False)
    assert res.steps > 0
    assert _distance(net, small.net, batches) < before
    verify(net, manifest.layers)  # still exactly the manifest's formats
    assert not any(p.requires_grad for p in net.parameters())


def test_zero_learning_rates_change_nothing_and_the_result_restores(tmp_path, small, batches, w4):
    manifest, base = w4
    x = batches[0].images
    with torch.no_grad():
        ref = base(x)[0]
    net = copy.deepcopy(base)
    still = AdaRoundConfig(block_steps=4, batch=8, round_lr=0.0, round_weight=0.0, learn_steps=True, step_lr=0.0,
                           block_loss="mse")
    finetune(net, small.net, batches, still, progress=False)
    with torch.no_grad():
        out = net(x)[0]
    assert torch.allclose(out, ref, atol=1e-3 * float(ref.abs().max()))  # the twins start at the checkpoint's rounding
    finetune(net, small.net, batches, AdaRoundConfig(block_steps=8, batch=8, round_lr=0.3, block_loss="mse"), progress=False)
    save_quantized(net, manifest, tmp_path / "ckpt")
    restored, _ = load_quantized(tmp_path / "ckpt", small)
    with torch.no_grad():
        assert torch.equal(restored(x)[0], net(x)[0])
        assert not torch.equal(restored(x)[0], ref)


def test_a_float_model_has_nothing_to_round(small, batches):
    with pytest.raises(LowbitError, match="no calibrated integer weight quantizer"):
        finetune(copy.deepcopy(small.net), small.net, batches, AdaRoundConfig(), progress=False)


def test_run_finetune_refuses_to_train_on_evaluation_images(tmp_path, small, batches, w4, assets):
    from lowbit.api import DataConfig, FinetuneRunConfig, run_finetune

    manifest, base = w4
    save_quantized(base, manifest, tmp_path / "ckpt")
    val = DataConfig(path=assets["val"])
    cfg = FinetuneRunConfig(checkpoint=str(tmp_path / "ckpt"), train=val, eval=val)
    with pytest.raises(LowbitError, match="share 32 image"):
        run_finetune(cfg, tmp_path / "run", progress=False)
    cfg = FinetuneRunConfig(checkpoint=str(tmp_path / "ckpt"), train=DataConfig(path=assets["calib"]), recipe="w8")
    with pytest.raises(LowbitError, match="unknown fine-tuning recipe 'w8'"):
        run_finetune(cfg, tmp_path / "run2", progress=False)


def test_cli_finetune_writes_a_checkpoint_and_before_after(tmp_path, small, batches, w4, assets):
    from typer.testing import CliRunner

    from lowbit.cli import app

    manifest, base = w4
    save_quantized(base, manifest, tmp_path / "ckpt")
    r = CliRunner().invoke(app, ["finetune", "-c", str(tmp_path / "ckpt"), "--train", assets["calib"], "-d", assets["val"],
                                 "--max-images", "8", "--recipe", "w4", "--block-steps", "2", "--seed", "3",
                                 "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "mAP50-95" in r.output and (tmp_path / "run" / "checkpoint" / "modelopt.pth").is_file()
    net, m = load_quantized(tmp_path / "run" / "checkpoint")
    ft = m.origin["finetune"]
    assert ft["recipe"] == "w4" and ft["learn_steps"] and ft["seed"] == 3 and ft["block_steps"] == 2 and m.imgsz == IMGSZ
    # the help stays short: the measured recipes, not every knob ever tried
    help_text = CliRunner().invoke(app, ["finetune", "--help"]).output
    options = [line for line in help_text.splitlines() if line.strip("│ *").startswith("--")]
    assert 5 <= len(options) <= 11  # ten options and --help


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("loss", ["mse", "mse+fisher"])
def test_adaround_learns_rounding_only_and_leaves_weights_on_modelopt_grid(small, batches, w4, loss, threads):
    manifest, base = w4
    torch.set_num_threads(threads)  # the suite's conftest puts the thread count back after each test
    net = copy.deepcopy(base)
    before = _distance(net, small.net, batches)
    biases = {n: p.clone() for n, p in net.named_parameters() if n.endswith("bias")}
    res = finetune(net, small.net, batches, AdaRoundConfig(block_steps=24, batch=8, round_lr=0.3, block_loss=loss,
                                                           fisher_samples=2), progress=False)
    assert res.steps > 0
    assert all(torch.equal(p, biases[n]) for n, p in net.named_parameters() if n in biases)  # biases never learn
    after = _distance(net, small.net, batches)
    # what each block loss promises: its own blocks' error falls as the rounding learns. The unweighted head
    # distance follows for plain MSE; the Fisher-weighted loss trades it for the outputs the head reads, and on
    # a 24-step run which way it moves depends on the float rounding of the thread count, so it is not asserted
    assert res.last_loss < 0.9 * res.first_loss, (res.first_loss, res.last_loss)
    if loss == "mse":
        assert after < before, (after, before)
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
    finetune(net, small.net, batches, AdaRoundConfig(block_steps=16, batch=8, round_lr=0.3, block_loss="mse"),
             progress=False)
    with torch.no_grad():
        tuned = net(x)[0]
        assert not torch.allclose(tuned, ref, atol=1e-4 * float(ref.abs().max()))
        AdaRoundBlock(net, small.net, "current").finish()  # the tuned rounding, kept as it is
        assert torch.equal(net(x)[0], tuned)


def test_adaround_learned_steps_land_in_modelopt_quantizers(small, batches, w4):
    manifest, base = w4
    net = copy.deepcopy(base)
    amax = {n: m.weight_quantizer.amax.clone() for n, m in net.named_modules()
            if getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.is_enabled}
    before = _distance(net, small.net, batches)
    finetune(net, small.net, batches, AdaRoundConfig(block_steps=16, batch=8, learn_steps=True, step_lr=3e-3,
                                                     block_loss="mse"), progress=False)
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


@pytest.mark.parametrize("k", [16, 19])
def test_fisher_weights_predict_the_head_loss_of_a_perturbed_block_output(small, batches, k):
    """Gaussian noise of variance s^2 on block k's output raises head_loss by s^2/2 times the sum of the
    Fisher weights (its second-order expansion; head_loss is 0 with zero gradient at the teacher)."""
    from lowbit.finetune.blockwise import run_from
    from lowbit.finetune.fisher import block_fisher
    from lowbit.models.ultralytics import block_input

    blocks, reg_max = list(small.net.model), small.net.model[-1].reg_max
    x, ys = batches[0].images[:2], []
    with torch.no_grad():
        for m in blocks[:k + 1]:
            x = m(block_input(m, x, ys))
            ys.append(x)
        t = _head(run_from(blocks, k, x, ys[:k]))
    gen = torch.Generator().manual_seed(0)
    w = block_fisher(lambda y: _head(run_from(blocks, k, y, ys[:k])), x, reg_max, 256, gen)
    assert w.shape == x.shape and bool((w >= 0).all())
    sigma = 3e-2 * float(x.std())  # small enough to be quadratic, large enough for float32's cancellation
    with torch.no_grad():
        rise = [float(head_loss(_head(run_from(blocks, k, x + sigma * torch.randn(x.shape, generator=gen), ys[:k])),
                                t, reg_max)) for _ in range(64)]
    predicted = 0.5 * sigma ** 2 * float(w.sum())
    assert sum(rise) / len(rise) == pytest.approx(predicted, rel=0.3)
