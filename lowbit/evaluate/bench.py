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


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def runtimes() -> dict[str, tuple[bool, str]]:
    """What can run here, honestly: (present, note)."""
    providers = _ort_providers()
    return {
        "ort-cpu": ("CPUExecutionProvider" in providers, "onnxruntime CPUExecutionProvider"),
        "ort-cuda": ("CUDAExecutionProvider" in providers, "needs onnxruntime-gpu"),
        "openvino": (importlib.util.find_spec("openvino") is not None, "needs the openvino package; lowbit has no runner for it yet"),
        "tensorrt": (importlib.util.find_spec("tensorrt") is not None or shutil.which("trtexec") is not None,
                     "needs TensorRT (python package or trtexec); lowbit has no runner for it yet"),
    }


def _time_ort(path: Path, provider: str, threads: int | None, warmup: int, reps: int) -> BenchResult:
    from lowbit.evaluate.runners import OrtRunner

    runner = OrtRunner(path, [provider], threads)  # same session options (and FP8 fallback) as evaluation
    inp = runner.session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(warmup):
        runner.session.run(None, {inp.name: x})
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        runner.session.run(None, {inp.name: x})
        times.append((time.perf_counter() - t) * 1e3)
    med = float(np.median(times))
    return BenchResult(runtime=runner.name, present=True, batch=shape[0], threads=threads, median_ms=med,
                       p90_ms=float(np.percentile(times, 90)), throughput_ips=shape[0] * 1e3 / med)


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
        else:
            out.append(BenchResult(runtime=name, present=True, note=note))
    return out
