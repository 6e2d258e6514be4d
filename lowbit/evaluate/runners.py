"""One interface over the runtimes that run a detector: `runner(batch) -> raw model output`.

The same runner serves accuracy (`lowbit eval --runtime`), output parity and latency (`lowbit bench`), so a
speed-up is always reported for the computation whose mAP was measured: OpenVINO can compute a Q/DQ graph
differently from ONNX Runtime (docs/openvino-int8-concat.md), so a graph's accuracy on one runtime says
nothing about another.

Runtimes: `torch` (a PyTorch module), `onnxruntime` (CPU, or CUDA with onnxruntime-gpu), `openvino` (CPU, the
runtime's default inference precision: BF16 on CPUs with AVX512-BF16 or AMX) and `openvino-f32` (float ops
forced to f32). OpenVINO also reads its own IR (`model.xml`, or a folder holding one, as Ultralytics and
NNCF write them).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.models.onnx_detector import extra_feeds, openvino_model_file, quiet_session_options

RUNTIMES = ("torch", "onnxruntime", "openvino", "openvino-f32")


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

    def chunks(self, x: torch.Tensor, items=None) -> list:
        return [self(x)]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _static_batch(shape) -> int | None:
    if len(shape) == 3:  # one image without a batch axis (torchvision's detection exports)
        return 1
    d = shape[0] if len(shape) else None
    return d if isinstance(d, int) and d > 0 else None


class _GraphRunner:
    """A compiled graph with a fixed input batch runs a larger batch image by image."""

    batch: int | None = None
    input_shape: list
    outputs: int = 1
    # inputs beside the image: name -> (shape, dtype name); fed as `card` describes them (lowbit.models.onnx_detector)
    extra_inputs: dict[str, tuple[list, str]] = {}
    card = None

    def _run_all(self, x: np.ndarray, extra: dict | None = None) -> list[np.ndarray]:
        raise NotImplementedError

    def _extra(self, items, n: int) -> dict:
        if not self.extra_inputs:
            return {}
        return extra_feeds(self.card, self.extra_inputs, items, self.input_shape[-1], n, str(self.path))

    def chunks(self, x: torch.Tensor, items=None) -> list:
        """The graph's outputs for each piece of `x` it takes at once: a tensor per piece, or a tuple of tensors for
        a graph of several outputs (boxes, scores and labels without a batch axis cannot be concatenated). `items`
        (the batch's Letterboxed images) feed inputs beside the image that depend on each image."""
        x = x.numpy().astype(np.float32)
        if self.batch is not None and x.shape[0] % self.batch:
            raise LowbitError(f"{self.path}: its input takes batches of {self.batch}; got {x.shape[0]} images")
        step = x.shape[0] if self.batch is None else self.batch
        out = []
        for i in range(0, x.shape[0], step):
            c = x[i:i + step]
            extra = self._extra(items[i:i + step] if items is not None else None, len(c))
            res = [torch.from_numpy(np.asarray(o)) for o in self._run_all(c[0] if len(self.input_shape) == 3 else c,
                                                                         extra)]
            out.append(res[0] if len(res) == 1 else tuple(res))
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The first output for the whole batch (where a graph has several, its first piece's tuple)."""
        parts = self.chunks(x)
        if isinstance(parts[0], tuple):
            if len(parts) > 1:
                raise LowbitError(f"{self.path}: a graph of several outputs runs one batch of {self.batch} at a time")
            return parts[0]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def sync(self) -> None:
        pass

    def random_input(self) -> np.ndarray:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in self.input_shape]
        return np.random.default_rng(0).random(shape, dtype=np.float32)

    def run_raw(self, x: np.ndarray):
        """One inference on an input of the graph's own shape (for timing)."""
        return self._run_all(x, self._extra(None, 1))


class OrtRunner(_GraphRunner):
    kind = "onnx"

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"{path}: ONNX file not found")
        self.path = path
        if "CUDAExecutionProvider" in (providers or []) and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA and cuDNN in the nvidia-* pip packages (PyTorch's) only when asked;
            # otherwise the session quietly falls back to the CPU
            ort.preload_dlls()
        opts = quiet_session_options(threads)
        # ONNX Runtime's idle threads spin on the cores after each run; interleaved with another runtime's
        # inference (lowbit bench) that spinning would be timed as the other runtime's slowness
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
        self.extra_inputs = {i.name: (i.shape, i.type) for i in self.session.get_inputs()[1:]}
        self.batch = _static_batch(self.input_shape)
        self.outputs = len(self.session.get_outputs())
        self.name = f"ort-{self.session.get_providers()[0].replace('ExecutionProvider', '').lower()}{suffix}"

    def _run_all(self, x: np.ndarray, extra: dict | None = None) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: x, **(extra or {})})


def openvino_config(precision: str | None, threads: int | None, hint: str = "LATENCY") -> dict:
    return {"PERFORMANCE_HINT": hint, **({"INFERENCE_NUM_THREADS": threads} if threads else {}),
            **({"INFERENCE_PRECISION_HINT": precision} if precision else {})}


def compile_openvino(path: str | Path, precision: str | None = None, threads: int | None = None,
                     hint: str = "LATENCY"):
    """(compiled model, None), or (None, why it cannot compile) in one line. `hint`: OpenVINO's performance hint,
    LATENCY (one request at a time, batch 1) or THROUGHPUT (as many parallel streams as the CPU serves best)."""
    import openvino as ov

    try:
        return ov.Core().compile_model(str(openvino_model_file(path)), "CPU",
                                       openvino_config(precision, threads, hint)), None
    except RuntimeError as e:  # OpenVINO nests its reason under several "Exception from <file>" lines
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("Exception from")]
        why = next((line for line in lines if "THROWN" in line), lines[-1] if lines else str(e))
        return None, f"cannot compile: {why[:300]}"


class OpenVinoRunner(_GraphRunner):
    """OpenVINO on the CPU with the latency hint. `precision` forces the float ops' precision ("f32");
    None keeps OpenVINO's default, which is BF16 on CPUs with AVX512-BF16 or AMX."""

    kind = "openvino"

    def __init__(self, path: str | Path, precision: str | None = None, threads: int | None = None):
        if importlib.util.find_spec("openvino") is None:
            raise LowbitError("the openvino runtime is not installed")
        self.path = Path(path)
        self.compiled, why = compile_openvino(path, precision, threads)
        if self.compiled is None:
            raise LowbitError(f"{path}: OpenVINO {why}")
        self.request = self.compiled.create_infer_request()
        ps = self.compiled.input(0).partial_shape
        self.input_shape = [d.get_length() if d.is_static else -1 for d in ps]
        self.extra_inputs = {i.get_any_name(): ([d.get_length() if d.is_static else -1 for d in i.partial_shape],
                                                i.get_element_type().get_type_name())
                             for i in self.compiled.inputs[1:]}
        self.batch = _static_batch(self.input_shape)
        self.outputs = len(self.compiled.outputs)
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.name = f"openvino-cpu-{precision}" if precision else "openvino-cpu"

    def _run_all(self, x: np.ndarray, extra: dict | None = None) -> list[np.ndarray]:
        res = self.request.infer({0: x, **(extra or {})})
        return [np.array(res[o]) for o in self.compiled.outputs]

    def executed_precisions(self) -> dict[str, int]:
        """Convolutions per precision OpenVINO really runs them in, read from its runtime graph."""
        from collections import Counter

        return dict(Counter(op.get_rt_info()["runtimePrecision"].astype(str)
                            for op in self.compiled.get_runtime_model().get_ordered_ops()
                            if op.get_rt_info()["layerType"].astype(str) in ("Convolution", "GroupConvolution")))


def default_runtime(model) -> str:
    if isinstance(model, (str, Path)):
        p = Path(model)
        return "openvino" if p.suffix == ".xml" or p.is_dir() and any(p.glob("*.xml")) else "onnxruntime"
    return "torch"


def make_runner(model, runtime: str | None = None, device: str = "cpu", providers: list[str] | None = None,
                threads: int | None = None):
    """A runner for a Detector or torch module (runtime "torch"), or a path to an .onnx / OpenVINO IR."""
    runtime = runtime or default_runtime(model)
    if runtime not in RUNTIMES:
        raise LowbitError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if isinstance(model, (str, Path)):
        if runtime == "onnxruntime":
            if Path(model).suffix != ".onnx":
                raise LowbitError(f"{model}: ONNX Runtime runs .onnx files; an OpenVINO IR needs --runtime openvino")
            if device.startswith("cuda"):
                providers = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
            return OrtRunner(model, providers, threads)
        if runtime.startswith("openvino"):
            return OpenVinoRunner(model, "f32" if runtime == "openvino-f32" else None, threads)
        raise LowbitError(f"{model}: a graph file runs on onnxruntime or openvino, not {runtime}")
    net = getattr(model, "net", model)
    if not isinstance(net, torch.nn.Module):
        raise LowbitError(f"cannot run {model!r}: expected a detector, a torch module or an .onnx path")
    if runtime != "torch":
        raise LowbitError(f"a PyTorch model runs on torch; export it (`lowbit export`) to run it on {runtime}")
    return TorchRunner(net, device)


def timed(runner, x: torch.Tensor, items=None) -> tuple[list, float]:
    """(the runner's outputs piece by piece, as `chunks` returns them, seconds)."""
    runner.sync()
    t = time.perf_counter()
    out = runner.chunks(x, items)
    runner.sync()
    return out, time.perf_counter() - t
