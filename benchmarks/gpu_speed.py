"""Forward latency on the lent H100 through PyTorch/cuDNN: FP32, TF32, FP16, BF16, eager and CUDA graphs
(docs/results.md, section 6). `bash benchmarks/gpu_speed.sh` runs it there.

YOLOv10n (the carried weights) and YOLOv10m (from yaml), 640x640, batch 1 and 16, channels-last, CUDA
events, median and p90 of 100 runs after 20 warm-ups. Eager batch-1 time is mostly Python and kernel
launches; a CUDA graph replays the same kernels without them, which is what a deployed engine pays.
With --fakequant, ModelOpt's fake quant is timed too: it simulates low precision in float, so it is slower, never faster.
The INT8/FP8 kernels a deployment would use need TensorRT or ONNX Runtime's CUDA provider; the script
records which of them it found.
"""

import importlib.util
import json
import os
import shutil

import torch

from lowbit.data.loader import Batch
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest
from lowbit.quantize.manifest import Manifest, WeightOptions


def timed(fn, warmup=20, reps=100):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return {"median_ms": round(times[len(times) // 2], 3), "p90_ms": round(times[int(len(times) * 0.9)], 3)}


def graphed(net, x):
    """The forward captured once as a CUDA graph; replays read the static input buffer."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            net(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        net(x)
    return g.replay


def main():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--fakequant", action="store_true", help="also time ModelOpt's W8A8 fake quant (builds its CUDA extension)")
    fakequant = ap.parse_args().fakequant
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(),
           "runtimes_present": {"tensorrt": bool(importlib.util.find_spec("tensorrt") or shutil.which("trtexec")),
                                "onnxruntime-gpu": "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()},
           "results": {}}
    torch.backends.cudnn.benchmark = True
    g = torch.Generator(device="cuda").manual_seed(0)
    for model in ("lowbit/assets/yolov10n.pt", "yolov10m.yaml"):
        tag = "yolov10n" if model.endswith(".pt") else "yolov10m"
        det = load_detector(model)
        for prec, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                                  ("fp16", torch.float16, False), ("bf16", torch.bfloat16, False)):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
            net = det.net.to("cuda", dtype).to(memory_format=torch.channels_last).eval()
            for bs in (1, 16):
                x = torch.rand(bs, 3, 640, 640, device="cuda", generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    row = {"eager": timed(lambda: net(x))}
                    try:
                        row["cuda_graph"] = timed(graphed(net, x))
                    except RuntimeError as e:
                        row["cuda_graph"] = {"error": str(e).splitlines()[0][:200]}
                row["images_per_s_graph"] = round(bs * 1e3 / row["cuda_graph"]["median_ms"], 1) if "median_ms" in row["cuda_graph"] else None
                out["results"][f"{tag} {prec} b{bs}"] = row
                print(tag, prec, f"b{bs}", json.dumps(row), flush=True)
        det.net.float()
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        if not fakequant:
            continue
        calib = [Batch(torch.rand(8, 3, 640, 640, device="cuda", generator=g), [])]
        m = Manifest.uniform(model, det.layers(), "W8A8", weights=WeightOptions(rounding="nearest"))
        q = apply_manifest(det, m, calib)
        x = torch.rand(16, 3, 640, 640, device="cuda", generator=g)
        with torch.no_grad():
            out["results"][f"{tag} modelopt-fakequant-W8A8 b16"] = {"eager": timed(lambda: q(x), 5, 30)}
        print(tag, "fakequant W8A8 b16", out["results"][f"{tag} modelopt-fakequant-W8A8 b16"], flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu-speed.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
