"""`lowbit bench`: latency of an ONNX model on every runtime present; absent runtimes say so."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from lowbit.errors import LowbitError


class BenchResult(BaseModel):
    runtime: str
    present: bool
    note: str = ""
    batch: int = 1
    threads: int | None = None
    median_ms: float | None = None
    p90_ms: float | None = None
    throughput_ips: float | None = None
    executed: dict[str, int] | None = None  # convolutions per precision the runtime actually ran them in


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


def _timed(run, x, warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of `reps` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def host_cpu() -> dict:
    """The CPU's name and the instruction sets that decide whether low precision is faster on it (VNNI and AMX
    run INT8 and BF16 convolutions natively; AVX2 alone emulates INT8 dot products), so every CPU timing can
    say what it ran on."""
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
    return {"cpu": name, "isa": isa}


def _openvino_default_precision() -> str:
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


def _compile_openvino(path: Path, threads: int | None, precision: str | None):
    """(compiled model, None) or (None, why it cannot compile)."""
    import openvino as ov

    cfg = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": threads} if threads else {}),
           **({"INFERENCE_PRECISION_HINT": precision} if precision else {})}
    try:
        return ov.Core().compile_model(str(path), "CPU", cfg), None
    except RuntimeError as e:  # OpenVINO nests its reason under several "Exception from <file>" lines
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("Exception from")]
        why = next((line for line in lines if "THROWN" in line), lines[-1] if lines else str(e))
        return None, f"cannot compile: {why[:300]}"


def _openvino_result(compiled, runtime: str, threads: int | None, times: list[float]) -> BenchResult:
    """Which precision each convolution really ran in comes from the compiled model's runtime graph
    (`runtimePrecision`), so an INT8 claim is checked, not assumed."""
    from collections import Counter

    executed = Counter(op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
                       if op.get_rt_info()["layerType"].astype(str) == "Convolution")
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    batch = compiled.input(0).partial_shape[0]
    batch = batch.get_length() if batch.is_static else 1
    med = float(np.median(times))
    return BenchResult(runtime=runtime, present=True, batch=batch, threads=threads, median_ms=med,
                       p90_ms=float(np.percentile(times, 90)), throughput_ips=batch * 1e3 / med, executed=dict(executed),
                       note=f"convs ran as {', '.join(f'{n} {p}' for p, n in executed.most_common())}; float ops as {hint}")


def _input_for(compiled) -> np.ndarray:
    shape = [d.get_length() if d.is_static else 1 for d in compiled.input(0).partial_shape]
    return np.random.default_rng(0).random(shape, dtype=np.float32)


def _time_openvino(path: Path, threads: int | None, warmup: int, reps: int, precision: str | None = None) -> BenchResult:
    """OpenVINO on the CPU, latency hint. `precision` forces the float ops' precision (OpenVINO's default is
    bf16 on CPUs with AMX or AVX512-BF16, which silently makes an "FP32" timing a BF16 one); the row is then
    named `openvino-cpu-<precision>`."""
    runtime = f"openvino-cpu-{precision}" if precision else "openvino-cpu"
    compiled, why = _compile_openvino(path, threads, precision)
    if compiled is None:
        return BenchResult(runtime=runtime, present=True, note=why)
    req = compiled.create_infer_request()
    return _openvino_result(compiled, runtime, threads, _timed(lambda v: req.infer({0: v}), _input_for(compiled), warmup, reps))


def compare_openvino(graphs: dict[str, tuple[str | Path, str | None]], threads: int | None = None, warmup: int = 5,
                     reps: int = 50) -> dict[str, BenchResult]:
    """Several graphs ({label: (ONNX path, float precision or None)}) timed one inference each in turn, the
    order rotating every round, so a shared machine's drift (other tenants, clocks) falls on all of them
    alike; timing each graph in its own block let such drift pass for a speed-up of 20% or more."""
    compiled = {}
    out = {}
    for label, (path, precision) in graphs.items():
        c, why = _compile_openvino(Path(path), threads, precision)
        if c is None:
            out[label] = BenchResult(runtime="openvino-cpu", present=True, note=why)
        else:
            compiled[label] = (c, c.create_infer_request(), _input_for(c))
    for _, req, x in compiled.values():
        for _ in range(warmup):
            req.infer({0: x})
    times: dict[str, list[float]] = {label: [] for label in compiled}
    order = list(compiled)
    for r in range(reps):
        for label in order[r % len(order):] + order[:r % len(order)]:
            _, req, x = compiled[label]
            t = time.perf_counter()
            req.infer({0: x})
            times[label].append((time.perf_counter() - t) * 1e3)
    for label, (c, _, _) in compiled.items():
        precision = graphs[label][1]
        out[label] = _openvino_result(c, f"openvino-cpu-{precision}" if precision else "openvino-cpu", threads, times[label])
    return {label: out[label] for label in graphs}


def _time_ort(path: Path, provider: str, threads: int | None, warmup: int, reps: int) -> BenchResult:
    from lowbit.evaluate.runners import OrtRunner

    runner = OrtRunner(path, [provider], threads)  # same session options (and FP8 fallback) as evaluation
    inp = runner.session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    times = _timed(lambda v: runner.session.run(None, {inp.name: v}), x, warmup, reps)
    med, p90 = float(np.median(times)), float(np.percentile(times, 90))
    return BenchResult(runtime=runner.name, present=True, batch=shape[0], threads=threads, median_ms=med,
                       p90_ms=p90, throughput_ips=shape[0] * 1e3 / med)


def bench(path: str | Path, threads: int | None = None, warmup: int = 5, reps: int = 30,
          skip: tuple[str, ...] = ()) -> list[BenchResult]:
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: ONNX file not found")
    out = []
    for name, (present, note) in runtimes().items():
        if name in skip:
            continue
        if not present:
            out.append(BenchResult(runtime=name, present=False, note=f"absent: {note}"))
        elif name.startswith("ort-"):
            provider = "CPUExecutionProvider" if name == "ort-cpu" else "CUDAExecutionProvider"
            out.append(_time_ort(path, provider, threads, warmup, reps))
        elif name == "openvino-cpu":
            out.append(_time_openvino(path, threads, warmup, reps))
            if _openvino_default_precision() != "f32":  # also the true FP32 baseline, beside the default bf16
                out.append(_time_openvino(path, threads, warmup, reps, precision="f32"))
        else:
            out.append(BenchResult(runtime=name, present=True, note=note))
    return out
