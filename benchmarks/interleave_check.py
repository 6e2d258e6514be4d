"""Does timing more graphs interleaved slow each one down? (docs/results.md, section 6.)

The latency table times its two uniform graphs interleaved; `latency_budget_cpu.py` then times six graphs
interleaved. On the Xeon, YOLOv10n's float graph measured 21.7 ms in the first setting and 29.0 ms in the
second. This alternates the two settings on the same graphs, so drift and setting can be told apart:

    python3 benchmarks/cpu_speed.py --export-only --models yolov10n
    taskset -c 0,1 python3 benchmarks/interleave_check.py --out $OUT/interleave-check.json
"""

import argparse
import json
from pathlib import Path

from lowbit.evaluate.bench import compare_openvino, host_cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/cpu-speed")
    ap.add_argument("--model", default="yolov10n")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two settings")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--out", default="interleave-check.json")
    a = ap.parse_args()
    fp32, int8 = Path(a.work) / f"{a.model}-FP32.onnx", Path(a.work) / f"{a.model}-W8A8.onnx"
    two = {"FP32": (fp32, None), "W8A8": (int8, None)}
    # four more graphs, as many as latency_budget_cpu.py adds (the same files again: only the count matters)
    six = {**two, "FP32 (f32)": (fp32, "f32"), "FP32 again": (fp32, None), "W8A8 again": (int8, None),
           "W8A8 third": (int8, None)}
    runs = []
    for i in range(a.rounds):
        for label, graphs in (("2 graphs", two), ("6 graphs", six)):
            timed = compare_openvino(graphs, threads=2, warmup=a.reps // 2, reps=a.reps)
            ms = {g: r.median_ms for g, r in timed.items()}
            runs.append({"setting": label, "round": i, "median_ms": ms})
            print(f"round {i} {label}: " + ", ".join(f"{g} {v:.1f}" for g, v in ms.items()), flush=True)
    Path(a.out).write_text(json.dumps({"host": host_cpu(), "model": a.model, "reps": a.reps, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
