"""The head-map error `lowbit quantize-onnx` reports (and warns past 0.05), for Q/DQ graphs already written, against
their float graph: 8 coco-calib-train images (the seed-0 subset), each graph fed as its preprocessing says.

    .venv/bin/python benchmarks/head_map_error.py FLOAT.onnx Q.onnx [Q.onnx ...] --imgsz 640 --preprocess ultralytics \
        --calib ../shared/assets/coco-calib-train/coco-calib-train.yaml

The figures beside docs/results.md section 7 (and the notebook of 2026-12-07, "A warning where accuracy may have
collapsed") come from it, on the artifacts of benchmarks/onnx_family.sh and benchmarks/onnx_gptq.sh.
"""

import argparse

import onnx

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import image_array, parse_preprocess
from lowbit.quantize.onnx_ptq import head_map_error
from lowbit.quantize.qdq import load_graph


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("float")
    ap.add_argument("quantized", nargs="+")
    ap.add_argument("--imgsz", type=int, required=True)
    ap.add_argument("--preprocess", default="ultralytics")
    ap.add_argument("--calib", required=True)
    a = ap.parse_args()
    x = image_array(load_dataset(a.calib).subset(8), a.imgsz, parse_preprocess(a.preprocess))
    ref = load_graph(a.float)
    for q in a.quantized:
        print(f"{q}: {head_map_error(ref, onnx.load(q), x):.4f}")


if __name__ == "__main__":
    main()
