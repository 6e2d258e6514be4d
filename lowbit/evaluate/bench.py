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


def _timed(run, x, warmup: int, reps: int) -> tuple[float, float]:
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 90))


def _time_openvino(path: Path, threads: int | None, warmup: int, reps: int) -> BenchResult:
    """OpenVINO on the CPU, latency hint; which precision each convolution really ran in comes from the
    compiled model's runtime graph (`runtimePrecision`), so an INT8 claim is checked, not assumed."""
    from collections import Counter

    import openvino as ov

    core = ov.Core()
    cfg = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    try:
        compiled = core.compile_model(str(path), "CPU", cfg)
    except RuntimeError as e:  # OpenVINO nests its reason under several "Exception from <file>" lines
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("Exception from")]
        why = next((line for line in lines if "THROWN" in line), lines[-1] if lines else str(e))
        return BenchResult(runtime="openvino-cpu", present=True, note=f"cannot compile: {why[:300]}")
    shape = [d.get_length() if d.is_static else 1 for d in compiled.input(0).partial_shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    req = compiled.create_infer_request()
    med, p90 = _timed(lambda v: req.infer({0: v}), x, warmup, reps)
    executed = Counter(op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
                       if op.get_rt_info()["layerType"].astype(str) == "Convolution")
    hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return BenchResult(runtime="openvino-cpu", present=True, batch=shape[0], threads=threads, median_ms=med, p90_ms=p90,
                       throughput_ips=shape[0] * 1e3 / med, executed=dict(executed),
                       note=f"convs ran as {', '.join(f'{n} {p}' for p, n in executed.most_common())}; float ops as {hint}")


def _time_ort(path: Path, provider: str, threads: int | None, warmup: int, reps: int) -> BenchResult:
    from lowbit.evaluate.runners import OrtRunner

    runner = OrtRunner(path, [provider], threads)  # same session options (and FP8 fallback) as evaluation
    inp = runner.session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    med, p90 = _timed(lambda v: runner.session.run(None, {inp.name: v}), x, warmup, reps)
    return BenchResult(runtime=runner.name, present=True, batch=shape[0], threads=threads, median_ms=med,
                       p90_ms=p90, throughput_ips=shape[0] * 1e3 / med)


def bench(path: str | Path, threads: int | None = None, warmup: int = 5, reps: int = 30) -> list[BenchResult]:
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: ONNX file not found")
    out = []
    for name, (present, note) in runtimes().items():
        if not present:
            out.append(BenchResult(runtime=name, present=False, note=f"absent: {note}"))
        elif name.startswith("ort-"):
            provider = "CPUExecutionProvider" if name == "ort-cpu" else "CUDAExecutionProvider"
            out.append(_time_ort(path, provider, threads, warmup, reps))
        elif name == "openvino-cpu":
            out.append(_time_openvino(path, threads, warmup, reps))
        else:
            out.append(BenchResult(runtime=name, present=True, note=note))
    return out
