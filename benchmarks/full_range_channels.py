"""How much full-range scales refine YOLOv10n's INT4 weight grids (docs/results.md, section 7, "Full-range
INT4 scales"; CPU, seconds, no images):

    .venv/bin/python benchmarks/full_range_channels.py [--model lowbit/assets/yolov10n.pt] [--bits 4]

Per quantizable conv channel, the step with full-range scales over ModelOpt's absmax step.
"""

import argparse

import torch

from lowbit.models.ultralytics import load_detector
from lowbit.quantize.refine import full_range_amax


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lowbit/assets/yolov10n.pt")
    ap.add_argument("--bits", type=int, default=4)
    a = ap.parse_args()
    det = load_detector(a.model)
    ratios = []
    for layer in det.quantizable_layers():
        w = det.net.get_submodule(layer.name).weight.detach()
        ratios.append(full_range_amax(w, a.bits, True) / w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-12))
    r = torch.cat(ratios)
    qmax = 2 ** (a.bits - 1) - 1
    print(f"{len(r)} channels; step finer in {(r < 0.999).float().mean():.1%}, by the full 1/{qmax + 1} in "
          f"{(r < qmax / (qmax + 1) + 1e-3).float().mean():.1%}; rounding-noise power {(r ** 2).mean():.3f} of absmax's")


if __name__ == "__main__":
    main()
