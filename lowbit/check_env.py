"""Fail fast if the installed stack is not the pinned one (an extra can silently swap torch or onnxruntime)."""

import sys
from importlib.metadata import version
from pathlib import Path


def main() -> int:
    pins = {}
    for line in (Path(__file__).resolve().parent.parent / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==")
            pins[name.strip()] = ver.strip()
    bad = [f"{n}: want {v}, have {version(n)}" for n, v in pins.items() if not version(n).startswith(v)]
    import torch
    import torchvision

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
    if keep != [0, 2]:
        bad.append(f"torchvision NMS gave {keep}, expected [0, 2]")
    if bad:
        print("lowbit environment check FAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    print(f"lowbit environment OK: torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"modelopt {version('nvidia-modelopt')}, ultralytics {version('ultralytics')}, "
          f"onnxruntime {version('onnxruntime')}; torchvision NMS works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
