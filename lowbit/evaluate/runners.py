"""One interface over PyTorch modules and ONNX files: `runner(batch) -> raw model output`."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError


class TorchRunner:
    kind = "torch"

    def __init__(self, net: torch.nn.Module, device: str = "cpu", half: bool = False):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.half = half
        if half:
            self.net = self.net.half()
        self.name = f"torch-{self.device.type}{'-fp16' if half else ''}"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        out = self.net(x.half() if self.half else x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class OrtRunner:
    kind = "onnx"

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"{path}: ONNX file not found")
        if "CUDAExecutionProvider" in (providers or []) and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA and cuDNN in the nvidia-* pip packages (PyTorch's) only when asked;
            # otherwise the session quietly falls back to the CPU
            ort.preload_dlls()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        suffix = ""
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:
            if "float8" not in str(e):
                raise LowbitError(f"{path}: ONNX Runtime cannot load this model ({e})") from None
            # ORT's CPU QDQ fusion turns FP8 Q/DQ + Conv into QLinearConv, which has no FP8 kernel;
            # basic optimization keeps the Q/DQ pairs and runs them as simulation.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
            suffix = "-basicopt"
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = self.session.get_inputs()[0].shape
        self.name = f"ort-{self.session.get_providers()[0].replace('ExecutionProvider', '').lower()}{suffix}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.numpy().astype(np.float32)})
        return torch.from_numpy(out[0])

    def sync(self) -> None:
        pass


def make_runner(model, device: str = "cpu", providers: list[str] | None = None, threads: int | None = None):
    """A runner for a Detector, a torch module, or a path to an .onnx file."""
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        return OrtRunner(model, providers, threads)
    net = getattr(model, "net", model)
    if not isinstance(net, torch.nn.Module):
        raise LowbitError(f"cannot run {model!r}: expected a detector, a torch module or an .onnx path")
    return TorchRunner(net, device)


def timed(runner, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    runner.sync()
    t = time.perf_counter()
    out = runner(x)
    runner.sync()
    return out, time.perf_counter() - t
