"""`lowbit bench`: latency of detector graphs on every runtime present, each runtime's outputs checked first.

Two rules, both because a number that looks like a speed-up can be something else:
- A runtime whose detections diverge from the reference runtime's on real images (lowbit.evaluate.parity) is
  reported as failing, with no timing: OpenVINO once ran lowbit's INT8 graphs 2x faster while computing garbage.
- Graphs are timed interleaved (one inference of each in turn, the order rotating every round), so a shared
  machine's drift (other tenants, clocks) falls on all of them alike; timed one after another, the same graph's
  median moved by 20% or more between blocks. Speed-ups are ratios within one interleaved run.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from lowbit.errors import LowbitError
from lowbit.evaluate.parity import Parity


class BenchResult(BaseModel):
    model: str = ""
    runtime: str
    present: bool
    note: str = ""
    batch: int = 1
    threads: int | None = None
    median_ms: float | None = None
    p90_ms: float | None = None
    # images per second under OpenVINO's THROUGHPUT hint (parallel infer requests), timed interleaved with the
    # other graphs (`throughput_openvino`); None where not measured. Batch-1 latency is `median_ms`.
    throughput_ips: float | None = None
    throughput_speedup: float | None = None  # over the first model's throughput, same run
    executed: dict[str, int] | None = None  # convolutions per precision the runtime actually ran them in
    parity: Parity | None = None  # outputs against the reference runtime; None for the reference itself
    speedup: float | None = None  # the first model's median over this one's, same runtime, same interleaved run
    speedup_vs_f32: float | None = None  # OpenVINO rows: over the first model forced to f32 (the true FP32 baseline)

    @property
    def failed(self) -> bool:
        return self.parity is not None and not self.parity.ok


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def runtimes() -> dict[str, tuple[bool, str]]:
    """What can run here, honestly: (present, note)."""
    providers = _ort_providers()
    return {
        "ort-cpu": ("CPUExecutionProvider" in providers, "onnxruntime CPUExecutionProvider"),
        "ort-cuda": ("CUDAExecutionProvider" in providers, "needs onnxruntime-gpu"),
        "openvino-cpu": (importlib.util.find_spec("openvino") is not None, "needs the openvino package"),
        "tensorrt": (importlib.util.find_spec("tensorrt") is not None or shutil.which("trtexec") is not None,
                     "needs TensorRT (python package or trtexec); lowbit has no runner for it yet"),
    }


def host_cpu(threads: int | None = None) -> dict:
    """The CPU's name, the instruction sets that decide whether low precision is faster on it (VNNI and AMX
    run INT8 and BF16 convolutions natively; AVX2 alone emulates INT8 dot products), its cores and the threads
    timed with, and OpenVINO's default float precision there, so every CPU timing can say what it ran on."""
    import os
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    out = {"cpu": name, "isa": isa, "cores": os.cpu_count(), "threads": threads}
    if importlib.util.find_spec("openvino") is not None:
        out["openvino_float"] = openvino_default_precision()
    return out


def describe_host(host: dict) -> str:
    """One line naming the host of a timing: CPU, the ISA that matters, cores and threads, OpenVINO's float."""
    isa = ", ".join(host.get("isa", [])) or "no AVX2"
    threads = host.get("threads") or "runtime default"
    flt = f"; OpenVINO runs float models in {host['openvino_float']}" if host.get("openvino_float") else ""
    return f"{host.get('cpu', 'unknown CPU')} ({isa}; {host.get('cores', '?')} cores, threads: {threads}{flt})"


def openvino_default_precision() -> str:
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


def interleaved(runs: dict[str, tuple], warmup: int = 5, reps: int = 30) -> dict[str, list[float]]:
    """Milliseconds of each `runs` entry ({label: (callable, input)}), one call of each in turn per round, the
    order rotating every round."""
    for fn, x in runs.values():
        for _ in range(warmup):
            fn(x)
    times: dict[str, list[float]] = {label: [] for label in runs}
    order = list(runs)
    for r in range(reps):
        for label in order[r % len(order):] + order[:r % len(order)]:
            fn, x = runs[label]
            t = time.perf_counter()
            fn(x)
            times[label].append((time.perf_counter() - t) * 1e3)
    return times


def throughput_openvino(models: list[str | Path], threads: int | None = None, rounds: int = 8,
                        warmup: int = 1) -> dict[str, float]:
    """Images per second of each graph on OpenVINO at its default precision under the THROUGHPUT hint: as many
    parallel infer requests as OpenVINO asks for, fed bursts of batch-1 inputs. Interleaved as `interleaved`
    is: one burst of each graph in turn per round, the order rotating; the median over rounds."""
    import openvino as ov

    from lowbit.evaluate.runners import compile_openvino

    queues = {}
    for m in models:
        compiled, why = compile_openvino(m, None, threads, "THROUGHPUT")
        if compiled is None:
            raise LowbitError(f"{m}: OpenVINO {why}")
        n = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        shape = [d.get_length() if d.is_static else 1 for d in compiled.input(0).partial_shape]
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        queues[str(m)] = (ov.AsyncInferQueue(compiled, n), x, 4 * n)

    def burst(q, x, k) -> float:
        t = time.perf_counter()
        for _ in range(k):
            q.start_async({0: x})
        q.wait_all()
        return k / (time.perf_counter() - t)

    for q, x, k in queues.values():
        for _ in range(warmup):
            burst(q, x, k)
    order, per = list(queues), {m: [] for m in queues}
    for r in range(rounds):
        for m in order[r % len(order):] + order[:r % len(order)]:
            per[m].append(burst(*queues[m]))
    return {m: float(np.median(v)) for m, v in per.items()}


def _runners_for(path: Path, threads: int | None, present: dict[str, tuple[bool, str]]) -> list[tuple[str, object]]:
    """(runtime row name, runner or why not) for every runtime row that applies to this graph."""
    from lowbit.evaluate.runners import OpenVinoRunner, OrtRunner

    rows: list[tuple[str, object]] = []
    is_onnx = path.suffix == ".onnx"
    for name, (ok, note) in present.items():
        if not ok:
            rows.append((name, f"absent: {note}"))
            continue
        try:
            if name.startswith("ort-") and is_onnx:
                rows.append((name, OrtRunner(path, ["CPUExecutionProvider" if name == "ort-cpu" else "CUDAExecutionProvider"],
                                             threads)))
            elif name == "openvino-cpu":
                rows.append((name, OpenVinoRunner(path, None, threads)))
                if openvino_default_precision() != "f32":  # also the true FP32 baseline, beside the default bf16
                    rows.append(("openvino-cpu-f32", OpenVinoRunner(path, "f32", threads)))
            elif name == "tensorrt":
                rows.append((name, note))
        except LowbitError as e:
            rows.append((name, str(e).removeprefix(f"{path}: ")))
    return rows


def bench_models(models: list[str | Path], threads: int | None = None, warmup: int = 5, reps: int = 30,
                 verify=None, nc: int = 80, progress: bool = False, preprocess: str | None = None,
                 decoder: str | None = None, throughput_rounds: int = 0) -> list[BenchResult]:
    """Every graph (.onnx, or an OpenVINO IR) on every runtime present, timed together, interleaved.

    `verify`: batches of real images (lowbit.data.loader) on which each runtime's detections are first checked
    against ONNX Runtime's on the same graph; a runtime that diverges gets no timing. The first model is the
    baseline of each row's speed-up. `throughput_rounds`: also each graph's throughput on OpenVINO (its
    default-precision rows), that many interleaved rounds after the latency timing (0: latency only)."""
    from lowbit.evaluate import parity
    from lowbit.evaluate.runners import OpenVinoRunner
    from lowbit.models.onnx_detector import openvino_model_file
    from lowbit.models.onnx_detector import load_card

    present = runtimes()
    results: list[BenchResult] = []
    runs: dict[str, tuple] = {}
    live: dict[str, tuple[BenchResult, object]] = {}
    fitted: dict = {}
    for m in models:
        path = Path(m)
        if not path.exists():
            raise LowbitError(f"{path}: model file not found")
        if path.suffix != ".onnx":
            path = openvino_model_file(path)
        card = load_card(path, preprocess, decoder)
        rows = _runners_for(path, threads, present)
        for _, r in rows:
            if not isinstance(r, str):
                r.card = card  # it says what inputs beside the image take
        ref = next((r for name, r in rows if name == "ort-cpu" and not isinstance(r, str)), None)
        for name, r in rows:
            res = BenchResult(model=str(m), runtime=name, present=present.get(name, (True,))[0], threads=threads)
            results.append(res)
            if isinstance(r, str):
                res.note = r
                continue
            res.batch = r.batch or 1
            if verify is not None and ref is not None and r is not ref:
                res.parity = parity.check(ref, r, _fit(verify, r, card.preprocess, fitted), nc, r.input_shape[-1],
                                          None if card.decoder == "auto" and card.preprocess.is_default else card)
                res.note = res.parity.note
                if res.failed:
                    continue
            elif verify is not None and ref is None:
                res.note = "no reference runtime reads this graph: check its mAP with `lowbit eval --runtime openvino`"
            x = r.random_input()
            runs[f"{len(results)}"] = ((lambda v, r=r: r.run_raw(v)), x)
            live[f"{len(results)}"] = (res, r)
    times = interleaved(runs, warmup, reps) if runs else {}
    for label, (res, r) in live.items():
        t = times[label]
        med = float(np.median(t))
        res.median_ms, res.p90_ms = med, float(np.percentile(t, 90))
        if isinstance(r, OpenVinoRunner):
            res.executed = r.executed_precisions()
            ran = ", ".join(f"{n} {p}" for p, n in sorted(res.executed.items(), key=lambda kv: -kv[1]))
            res.note = "; ".join(x for x in (res.note, f"convs ran as {ran}; float ops as {r.precision}") if x)
    ov_rows = [r for r in results if r.runtime == "openvino-cpu" and r.median_ms]
    if throughput_rounds and ov_rows:
        ips = throughput_openvino([r.model for r in ov_rows], threads, throughput_rounds)
        for r in ov_rows:
            r.throughput_ips = ips[r.model]
    first = {r.runtime: r for r in results if r.model == str(models[0]) and r.median_ms}
    f32 = first.get("openvino-cpu-f32") or (first.get("openvino-cpu") if present["openvino-cpu"][0]
                                            and openvino_default_precision() == "f32" else None)
    for r in results:
        if r.median_ms and r.runtime in first:
            r.speedup = first[r.runtime].median_ms / r.median_ms
            if r.throughput_ips and first[r.runtime].throughput_ips:
                r.throughput_speedup = r.throughput_ips / first[r.runtime].throughput_ips
        if r.median_ms and r.runtime.startswith("openvino") and f32:
            r.speedup_vs_f32 = f32.median_ms / r.median_ms
    return results


def _fit(batches, runner, preprocess, cache: dict):
    """The verify images as the graph takes them: its input size and preprocessing (prepared again where they
    differ from the batches'; a runner takes any batch)."""
    from lowbit.data.datasets import Dataset
    from lowbit.data.loader import make_batches

    size = runner.input_shape[-1]
    if batches[0].images.shape[-1] == size and preprocess.is_default:
        return batches
    key = (size, preprocess.model_dump_json())
    if key not in cache:
        cache[key] = make_batches(Dataset("verify", [it.record for b in batches for it in b.items]), size, 1,
                                  preprocess=preprocess)
    return cache[key]


def bench(path: str | Path, threads: int | None = None, warmup: int = 5, reps: int = 30,
          verify=None) -> list[BenchResult]:
    """One graph on every runtime present (`bench_models` with one model)."""
    return bench_models([path], threads, warmup, reps, verify)


def compare_openvino(graphs: dict[str, tuple[str | Path, str | None]], threads: int | None = None, warmup: int = 5,
                     reps: int = 50) -> dict[str, BenchResult]:
    """Several graphs ({label: (graph path, float precision or None)}) on OpenVINO, timed interleaved."""
    from lowbit.evaluate.runners import OpenVinoRunner

    out, runs, runners = {}, {}, {}
    for label, (path, precision) in graphs.items():
        runtime = f"openvino-cpu-{precision}" if precision else "openvino-cpu"
        try:
            r = OpenVinoRunner(path, precision, threads)
        except LowbitError as e:
            out[label] = BenchResult(model=str(path), runtime=runtime, present=True, note=str(e))
            continue
        runners[label] = r
        runs[label] = ((lambda v, r=r: r.run_raw(v)), r.random_input())
    times = interleaved(runs, warmup, reps)
    for label, r in runners.items():
        t = times[label]
        med = float(np.median(t))
        executed = r.executed_precisions()
        out[label] = BenchResult(model=str(graphs[label][0]), runtime=r.name, present=True, threads=threads,
                                 batch=r.batch or 1, median_ms=med, p90_ms=float(np.percentile(t, 90)),
                                 executed=executed,
                                 note=f"convs ran as {', '.join(f'{n} {p}' for p, n in executed.items())}; "
                                      f"float ops as {r.precision}")
    return {label: out[label] for label in graphs}
