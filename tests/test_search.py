import pytest

from lowbit.errors import LowbitError
from lowbit.formats import PRESETS
from lowbit.search import allocate
from lowbit.sensitivity.report import build_report


@pytest.fixture(scope="module")
def problem(yolov10n):
    layers = yolov10n.quantizable_layers()
    # damage falls with network depth; W8 is 100x more benign than W4
    table = {x.name: {"W4A16": 1.0 / (i + 1), "W8A16": 0.01 / (i + 1)} for i, x in enumerate(layers)}
    rep = build_report("yolov10n.pt", "synthetic", ["W4A16", "W8A16"], layers, table, 4, 640, "cpu", 0.0)
    return allocate.Problem(rep, ["W4A16", "W8A16"])


def test_top_k_keeps_the_most_sensitive(problem):
    m = allocate.top_k(problem, 3, "W4A16", "W8A16")
    names = [x.name for x in problem.layers]
    assert all(m.layers[n].name == "W8A16" for n in names[:3])
    assert all(m.layers[n].name == "W4A16" for n in names[3:])


def test_budget_is_exact_and_respects_the_limit(problem):
    m = allocate.budget(problem, 5.0)
    assert m.stats.effective_weight_bits <= 5.0 + 1e-9
    assert m.origin["predicted_cost"] == pytest.approx(m.stats.effective_weight_bits)
    # exactness: no single swap to a cheaper-damage option fits the budget and lowers the damage
    damage, cost = problem.total({**{x.name: allocate.FP16 for x in problem.layers}, **m.layers})
    by = {x.name: x for x in problem.layers}
    for name, f in m.layers.items():
        for alt in problem.options[name]:
            d_alt = problem.damage(name, alt) - problem.damage(name, f)
            c_alt = problem.cost(by[name], alt) - problem.cost(by[name], f)
            assert not (d_alt < -1e-12 and cost + c_alt <= 5.0 + 1e-9)


def test_more_budget_never_predicts_more_damage(problem):
    front = allocate.pareto(problem, 6)
    damage = [m.origin["predicted_damage"] for m in front]
    bits = [m.origin["predicted_cost"] for m in front]
    assert damage == sorted(damage, reverse=True) and bits == sorted(bits)
    assert front[0].stats.int4_share == pytest.approx(1.0)


def test_infeasible_budget_and_missing_scores(problem):
    with pytest.raises(LowbitError, match="budget 3 .* infeasible: the cheapest choice costs 4"):
        allocate.budget(problem, 3.0)
    with pytest.raises(LowbitError, match=r"no scores for \['W8A8'\]"):
        allocate.Problem(problem.report, ["W8A8"])
    with pytest.raises(LowbitError, match="unknown cost"):
        allocate.Problem(problem.report, ["W4A16"], cost="joules")


def test_bitops_cost_counts_activation_bits(problem):
    p = allocate.Problem(problem.report, ["W4A16", "W8A16"], cost="bitops")
    m = allocate.budget(p, 0.3)  # 30% of FP16 bit-ops: A16 formats cannot go below 25%
    assert m.origin["predicted_cost"] <= 0.3 and m.stats.int4_share > 0.5


def test_random_baseline_matches_int4_share(problem):
    target = allocate.budget(problem, 5.0)
    r = allocate.random_like(problem, target, "W4A16", "W8A16", seed=1)
    assert abs(r.stats.int4_share - target.stats.int4_share) < 0.1
    assert r.layers != target.layers


def test_manifest_round_trip(tmp_path, problem):
    from lowbit.quantize.manifest import Manifest

    m = allocate.budget(problem, 6.0)
    m.save(tmp_path / "m.json")
    back = Manifest.load(tmp_path / "m.json")
    name, fmt = next(iter(back.layers.items()))
    assert back == m and fmt == PRESETS[fmt.name] and name in m.layers


def test_a_target_search_never_picks_a_format_the_target_runs_in_float_there(yolov10n):
    """YOLOv10n's depthwise convs: TensorRT has no FP8 kernel for them, so a tensorrt search gives them INT8 or
    FP16; without a target (or for openvino-cpu, where FP8 runs nowhere and stays a candidate) they may take FP8."""
    from lowbit import targets

    layers = yolov10n.quantizable_layers()
    depthwise = {x.name for x in layers if x.weight_shape[1] == 1}
    assert len(depthwise) >= 5
    table = {x.name: {"W8A8-FP8:pc": 0.001, "W8A8": 0.01} for x in layers}  # FP8 looks best everywhere
    rep = build_report("yolov10n.pt", "synthetic", ["W8A8-FP8:pc", "W8A8"], layers, table, 4, 640, "cpu", 0.0)
    groups = {x.name: (2 if x.name in depthwise else 1) for x in layers}
    free_p = allocate.Problem(rep, ["W8A8-FP8:pc", "W8A8"], cost="bitops")
    free = allocate.budget(free_p, free_p.bounds()[0] + 1e-9)  # every layer quantized
    assert any(free.layers[n].name == "W8A8-FP8:pc" for n in depthwise if n in free.layers)
    assert not targets.check("tensorrt", free, groups).deployable
    for g in (groups, None):  # None: depthwise read off the weight shape
        p = allocate.Problem(rep, ["W8A8-FP8:pc", "W8A8"], cost="bitops", target="tensorrt", groups=g)
        m = allocate.budget(p, p.bounds()[0] + 1e-9)
        assert len(m.layers) == len(layers) and all(m.layers[n].name == "W8A8" for n in depthwise)
        assert targets.check("tensorrt", m, groups).deployable
        k = allocate.top_k(p, 2, "W8A8-FP8:pc", "FP16")
        assert all(k.layers[n].name != "W8A8-FP8:pc" for n in depthwise if n in k.layers)
    with pytest.raises(LowbitError, match="unknown target 'trt'"):
        allocate.Problem(rep, ["W8A8"], target="trt")
