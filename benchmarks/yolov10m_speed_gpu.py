"""YOLOv10m (from yaml) forward latency on the GPU: FP32, FP16, and ModelOpt fake quant (docs/results.md).

Run on the lent H100 with `bash benchmarks/run_gpu.sh`; fake quantization computes in float, so its time
shows the simulation overhead, not deployed INT8/INT4 speed.
"""

import importlib.util
import json
import os
import shutil

import torch

from lowbit.data.loader import Batch
from lowbit.models.ultralytics import load_detector
from lowbit.quantize.apply import apply_manifest
from lowbit.quantize.manifest import Manifest


def bench(fn, x, warmup=10, reps=50):
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(x)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return {"median_ms": times[len(times) // 2], "p90_ms": times[int(len(times) * 0.9)]}


def main():
    det = load_detector("yolov10m.yaml")
    net = det.net.cuda().eval()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
           "runtimes_present": {"tensorrt": bool(importlib.util.find_spec("tensorrt") or shutil.which("trtexec")),
                                "onnxruntime-gpu": "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                                "openvino": bool(importlib.util.find_spec("openvino"))}}
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for bs in (1, 16):
            x = torch.rand(bs, 3, 640, 640, device="cuda", generator=g)
            out[f"fp32_b{bs}"] = bench(net, x)
            net16 = net.half()
            out[f"fp16_b{bs}"] = bench(net16, x.half())
            net.float()
        calib = [Batch(torch.rand(8, 3, 640, 640, device="cuda", generator=g), [])]
        for fmt in ("W8A8", "W4A16"):
            m = Manifest.uniform("yolov10m.yaml", det.layers(), fmt, weight_clip="max")
            q = apply_manifest(det, m, calib)
            x = torch.rand(16, 3, 640, 640, device="cuda", generator=g)
            out[f"modelopt_fakequant_{fmt}_b16"] = bench(q, x, warmup=3, reps=20)
    print(json.dumps(out, indent=1))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "yolov10m-speed.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
