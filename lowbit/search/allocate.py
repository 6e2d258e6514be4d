"""From a sensitivity report to per-layer formats: top-K, exact budget, Pareto sweep, random baseline.

Predicted damage of a scheme is the sum of its layers' single-layer scores (FP16 costs nothing).
The budget policy is a multiple-choice knapsack, solved exactly as an integer program with PuLP's
bundled CBC solver (already a ModelOpt dependency).
"""

from __future__ import annotations

import random
import warnings

from lowbit.errors import LowbitError
from lowbit.evaluate.layer_latency import switches
from lowbit.formats import Format, parse_format
from lowbit.models.layers import LayerInfo
from lowbit.quantize.manifest import Manifest, WeightOptions, image_input_rule, scheme_stats
from lowbit.sensitivity.report import SensitivityReport

FP16 = Format(name="FP16")
COSTS = ("weight_bits", "bitops", "latency")


class Problem:
    """Layers, their candidate formats, predicted damage and cost of every choice."""

    def __init__(self, report: SensitivityReport, formats: list[str], allow_fp16: bool = True,
                 cost: str = "weight_bits", latency_table: dict[str, dict[str, float]] | None = None,
                 weights: WeightOptions = WeightOptions(), switch_ms: dict[str, float] | None = None,
                 edges: list[tuple[str, str]] | None = None, target: str | None = None,
                 groups: dict[str, int] | None = None):
        """`switch_ms` and `edges` (from `lowbit latency-table`): with the latency cost, each edge between two
        convs of which exactly one runs in format F also costs switch_ms[F]. `target` (lowbit.targets) with
        `groups` (layer -> conv groups; default: depthwise read off the weight shape) drops, per layer, formats
        the target would run in float there."""
        self.report = report
        self.weights = weights
        self.formats = [parse_format(f) for f in formats]
        missing = [f.name for f in self.formats if f.name not in report.formats]
        if missing:
            raise LowbitError(f"sensitivity report ({report.method}) has no scores for {missing}; it scored {report.formats}")
        if cost not in COSTS:
            raise LowbitError(f"unknown cost {cost!r}; use one of {COSTS}")
        if cost == "latency" and not latency_table:
            raise LowbitError("cost 'latency' needs a per-layer latency table")
        self.cost_kind = cost
        self.latency = latency_table or {}
        self.switch_ms = {f: ms for f, ms in (switch_ms or {}).items() if ms > 0} if cost == "latency" else {}
        self.edges = [tuple(e) for e in edges or []]
        self.layers: list[LayerInfo] = [LayerInfo(**r.model_dump(include=set(LayerInfo.model_fields))) for r in report.rows]
        if target is not None:
            from lowbit.targets import get_target

            get_target(target)
        self.options = {layer.name: ([FP16] if allow_fp16 else []) + self._runnable(layer, target, groups)
                        for layer in self.layers}
        stuck = [n for n, opts in self.options.items() if not opts]
        if stuck:
            raise LowbitError(f"layer {stuck[0]}: {target} runs none of {[f.name for f in self.formats]} on it in low "
                              "precision, and FP16 is not allowed")
        self.total_params = sum(layer.params for layer in self.layers) or 1
        self.total_bitops = sum(layer.macs * 16 * 16 for layer in self.layers) or 1
        self._scores = {r.name: r.scores for r in report.rows}

    def _runnable(self, layer: LayerInfo, target: str | None, groups: dict[str, int] | None) -> list[Format]:
        """The candidate formats, less those `target` runs in low precision on ordinary convs but not on this one
        (FP8 on a depthwise conv for TensorRT): a deploy target's search never picks a format the runtime would
        quietly run in float. Formats the target runs nowhere stay (a storage result, marked as such)."""
        if target is None:
            return list(self.formats)
        from lowbit.targets import layer_verdict

        g = (groups or {}).get(layer.name)
        if g is None:  # a depthwise conv reads one input channel per output channel
            g = 2 if len(layer.weight_shape) == 4 and layer.weight_shape[1] == 1 and layer.weight_shape[0] > 1 else 1
        return [f for f in self.formats if layer_verdict(target, f, g)[0] or not layer_verdict(target, f, 1)[0]]

    def damage(self, layer: str, fmt: Format) -> float:
        if fmt.is_float:
            return 0.0
        return max(self._scores[layer].get(fmt.name, 0.0), 0.0)  # negative = measurement noise

    def cost(self, layer: LayerInfo, fmt: Format) -> float:
        """In budget units: effective weight bits, share of FP16 bit-ops, or milliseconds."""
        if self.cost_kind == "weight_bits":
            return layer.params * fmt.w_bits / self.total_params
        if self.cost_kind == "bitops":
            return layer.macs * fmt.w_bits * fmt.a_bits / self.total_bitops
        try:
            return self.latency[layer.name][fmt.name]
        except KeyError:
            raise LowbitError(f"latency table has no entry for layer {layer.name} in {fmt.name}") from None

    def switch_cost(self, assign: dict[str, Format]) -> float:
        return sum(ms * switches(self.edges, {n for n, f in assign.items() if f.name == fmt})
                   for fmt, ms in self.switch_ms.items())

    def total(self, assign: dict[str, Format]) -> tuple[float, float]:
        by = {layer.name: layer for layer in self.layers}
        return (sum(self.damage(n, f) for n, f in assign.items()),
                sum(self.cost(by[n], f) for n, f in assign.items()) + self.switch_cost(assign))

    def bounds(self) -> tuple[float, float]:
        lo = sum(min(self.cost(layer, f) for f in self.options[layer.name]) for layer in self.layers)
        hi = sum(max(self.cost(layer, f) for f in self.options[layer.name]) for layer in self.layers)
        return lo, hi

    def manifest(self, name: str, assign: dict[str, Format], origin: dict) -> Manifest:
        damage, cost = self.total(assign)
        quantized, image = image_input_rule({n: f for n, f in assign.items() if not f.is_float},
                                            {layer.name for layer in self.layers if layer.reads_image})
        m = Manifest(name=name, model=self.report.model, imgsz=self.report.imgsz, layers=quantized,
                     **self.weights.weight_options(),
                     origin={**origin, "sensitivity": self.report.method, "predicted_damage": damage,
                             "cost": self.cost_kind, "predicted_cost": cost, **image})
        m.stats = scheme_stats(quantized, self.layers)
        return m


def top_k(p: Problem, k: int, low: str, high: str) -> Manifest:
    """The K layers most sensitive under `low` get `high`; every other layer gets `low`."""
    lo, hi = parse_format(low), parse_format(high)
    if not 0 <= k <= len(p.layers):
        raise LowbitError(f"top-K needs 0 <= K <= {len(p.layers)}, got {k}")
    order = sorted(p.layers, key=lambda layer: -p.damage(layer.name, lo))
    keep = {layer.name for layer in order[:k]}
    # a layer whose candidates lack `low` (the target would run it in float there) takes `high`
    assign = {layer.name: hi if layer.name in keep or lo.name not in {f.name for f in p.options[layer.name]} else lo
              for layer in p.layers}
    return p.manifest(f"top{k}-{high}-rest-{low}", assign, {"kind": "topk", "k": k, "low": low, "high": high})


def budget(p: Problem, limit: float, name: str | None = None) -> Manifest:
    """Least predicted damage with total cost <= limit (exact multiple-choice knapsack)."""
    import pulp

    lo, hi = p.bounds()
    if limit < lo - 1e-9:
        raise LowbitError(f"budget {limit:g} ({p.cost_kind}) is infeasible: the cheapest choice costs {lo:.4g}")
    prob = pulp.LpProblem("lowbit", pulp.LpMinimize)
    x = {(layer.name, i): prob.add_variable(f"x_{j}_{i}", cat="Binary")
         for j, layer in enumerate(p.layers) for i in range(len(p.options[layer.name]))}
    prob += pulp.lpSum(p.damage(n, p.options[n][i]) * v for (n, i), v in x.items())
    spent = [p.cost(layer, f) * x[(layer.name, i)] for layer in p.layers for i, f in enumerate(p.options[layer.name])]

    def runs_as(layer: str, fmt: str):  # 1 where the layer takes `fmt`; layers outside the search stay float
        return pulp.lpSum(x[(layer, i)] for i, f in enumerate(p.options.get(layer, [])) if f.name == fmt)

    for k, (fmt, ms) in enumerate(p.switch_ms.items()):
        for j, (a, b) in enumerate(p.edges):
            if a not in p.options and b not in p.options:
                continue
            s = prob.add_variable(f"s_{k}_{j}", lowBound=0)  # >= |difference|; only the budget reads it
            prob += s >= runs_as(a, fmt) - runs_as(b, fmt)
            prob += s >= runs_as(b, fmt) - runs_as(a, fmt)
            spent.append(ms * s)
    prob += pulp.lpSum(spent) <= limit
    for layer in p.layers:
        prob += pulp.lpSum(x[(layer.name, i)] for i in range(len(p.options[layer.name]))) == 1
    with warnings.catch_warnings():
        # PuLP 3.3 deprecates the CBC binary it bundles; COIN_CMD would need a system CBC we cannot assume
        warnings.simplefilter("ignore", DeprecationWarning)
        status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        raise LowbitError(f"budget {limit:g} ({p.cost_kind}): solver says {pulp.LpStatus[status]}")
    assign = {n: p.options[n][i] for (n, i), v in x.items() if v.value() > 0.5}
    tag = "+".join(f.name for f in p.formats)
    return p.manifest(name or f"budget-{limit:g}{'' if p.cost_kind == 'weight_bits' else p.cost_kind}-{tag}", assign,
                      {"kind": "budget", "limit": limit, "bounds": [lo, hi]})


def pareto(p: Problem, points: int = 8) -> list[Manifest]:
    """The damage/cost front: budgets spread between the cheapest and the dearest scheme."""
    lo, hi = p.bounds()
    out, seen = [], set()
    for i in range(points):
        m = budget(p, lo + (hi - lo) * i / max(points - 1, 1))
        key = tuple(sorted((n, f.name) for n, f in m.layers.items()))
        if key not in seen:
            seen.add(key)
            out.append(m)
    return out


def random_like(p: Problem, target: Manifest, low: str, high: str, seed: int) -> Manifest:
    """Random allocation with (about) the same share of weights at `low` as `target`, the rest at `high` (FP16
    keeps a layer float): the baseline a sensitivity-guided scheme must beat."""
    lo, hi = parse_format(low), parse_format(high)
    want = sum(layer.params for layer in p.layers if (f := target.layers.get(layer.name)) is not None and f.name == lo.name)
    order = list(p.layers)
    random.Random(seed).shuffle(order)
    assign, got = {}, 0
    for layer in order:
        if got + layer.params / 2 <= want:
            assign[layer.name] = lo
            got += layer.params
        else:
            assign[layer.name] = hi
    return p.manifest(f"random-{seed}-like-{target.name}", assign, {"kind": "random", "seed": seed, "like": target.name})


