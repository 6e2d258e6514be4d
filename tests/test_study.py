import json

import pytest
import yaml

from lowbit.config import DataConfig
from lowbit.errors import LowbitError
from lowbit.config import SensitivitySpec, StudyConfig
from lowbit.study import run_study


def _write(tmp_path, assets, budgets):
    cfg = {"name": "t", "model": assets["model"], "imgsz": 256, "eval_batch": 4, "target": "size",
           "calib": {"path": assets["val"], "max_images": 4}, "eval": {"path": assets["val"], "max_images": 4, "seed": 1},
           "sensitivity": {"methods": ["gradient-selfsup"], "formats": ["W4A16", "W8A16"], "batch": 4,
                           "layers": ["model.2.*", "model.23.cv3.0.*"], "images": 3},
           "search": {"method": "gradient-selfsup", "budgets": budgets, "random_seeds": []}, "uniform": ["W8A16"]}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return StudyConfig.load(p)


def test_study_runs_caches_and_redoes_only_what_changed(tmp_path, assets):
    out = tmp_path / "run"
    first = run_study(_write(tmp_path, assets, [8.0]), out, progress=False)
    assert first["work"] == {"evaluated": 3, "cached": 0}  # FP32, W8A16, one budget scheme
    for f in ("study-report.md", "schemes.csv", "pareto.png", "summary.json", "config.json"):
        assert (out / f).stat().st_size > 0
    assert "Which scheme to pick" in (out / "study-report.md").read_text()
    # the layers are scored on the first 3 of the 4 calibration images, the same 3 that `max_images: 3` takes
    report, = (out / "cache").glob("sensitivity-*/gradient-selfsup/layer-sensitivity-report.json")
    assert json.loads(report.read_text())["images"] == 3
    # each scheme's Δ carries its standard error over the choice of images, from the detections each
    # evaluation keeps, so a cached re-run reports the same errors
    se = {r["scheme"]: r["delta_se_points"] for r in first["rows"]}
    assert se["FP32"] is None and all(0 < v < 50 for k, v in se.items() if k != "FP32")
    assert "SE of Δ" in (out / "study-report.md").read_text()
    again = run_study(_write(tmp_path, assets, [8.0]), out, progress=False)
    assert again["work"] == {"evaluated": 0, "cached": 3}
    assert {r["scheme"]: r["delta_se_points"] for r in again["rows"]} == se
    assert len(list((out / "cache").glob("errors-*/delta-se.json"))) == 1
    changed = run_study(_write(tmp_path, assets, [8.0, 6.0]), out, progress=False)
    assert changed["work"] == {"evaluated": 1, "cached": 3}
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["fp32", "uniform", "budget", "budget"]


def test_sensitivity_images_take_the_calibration_subset_of_that_size():
    calib = DataConfig(path="calib", max_images=None, seed=0)
    assert SensitivitySpec().scoring_data(calib) is calib
    assert SensitivitySpec(images=64).scoring_data(calib) == DataConfig(path="calib", max_images=64, seed=0)
    small = calib.model_copy(update={"max_images": 16})
    assert SensitivitySpec(images=64).scoring_data(small) is small  # never more than the study calibrates on


def test_bad_study_config_names_the_field(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("model: x.pt\ncalib: {path: a}\n")
    with pytest.raises(LowbitError, match="eval: Field required"):
        StudyConfig.load(p)
    p.write_text("- just a list\n")
    with pytest.raises(LowbitError, match="yaml mapping"):
        StudyConfig.load(p)


def test_study_finetune_stage_adds_tuned_rows_and_caches_them(tmp_path, assets):
    cfg = {"name": "ft", "model": assets["model"], "imgsz": 128, "eval_batch": 4, "target": "size",
           "calib": {"path": assets["calib"], "max_images": 8}, "eval": {"path": assets["val"], "max_images": 4},
           "search": [], "uniform": ["W4A16"], "max_drop_points": [100],
           "finetune": {"schemes": ["W4A16"], "config": {"block_steps": 2, "batch": 4, "block_loss": "mse"}}}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    first = run_study(StudyConfig.load(p), out, progress=False)
    rows = {r["scheme"]: r for r in first["rows"]}
    assert rows["W4A16+ft"]["kind"] == "finetune" and rows["W4A16+ft"]["int4_share"] == 1.0
    report = (out / "study-report.md").read_text()
    assert "## Fine-tuning" in report and "| W4A16 |" in report
    # a size study's pick (fewest bits: W4A16 or its tuned twin) ships as a Q/DQ ONNX, labelled a storage result
    assert (out / "recommended.onnx").is_file() and "## Storage artifact" in report and "storage result" in report
    assert "TensorRT:" in report and "INT4" in report
    assert first["work"] == {"evaluated": 3, "cached": 0} and first["speed"] is None
    again = run_study(StudyConfig.load(p), out, progress=False)
    assert again["work"] == {"evaluated": 0, "cached": 3}
    cfg["calib"] = cfg["eval"]  # training on the evaluation images is refused
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(LowbitError, match="share 4 image"):
        run_study(StudyConfig.load(p), tmp_path / "run2", progress=False)


def test_openvino_study_scores_artifacts_on_openvino_and_recommends_a_deployable_one(tmp_path, assets):
    cfg = {"name": "ov", "model": assets["model"], "imgsz": 160, "eval_batch": 4, "target": "openvino-cpu",
           "rounding": "nearest", "calib": {"path": assets["calib"], "max_images": 8},
           "eval": {"path": assets["val"], "max_images": 6}, "search": [], "uniform": ["W8A8", "W4A16"],
           "max_drop_points": [100], "speed_reps": 3, "speed_threads": 1, "throughput_rounds": 2}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    first = run_study(StudyConfig.load(p), out, progress=False)
    rows = {r["scheme"]: r for r in first["rows"]}
    # the float model and the INT8 scheme are scored as graphs on OpenVINO, and timed there beside each other
    assert rows["FP32"]["runtime"] == rows["W8A8"]["runtime"] == "openvino-cpu"
    assert rows["W8A8"]["deployable"] and rows["W8A8"]["latency_ms"] > 0 and rows["FP32"]["speedup"] == 1.0
    assert rows["W8A8"]["parity"]["agreement"] >= 0 and not rows["W8A8"]["speed_failed"]
    # INT4 convolutions run faster nowhere: scored in PyTorch, marked, never recommended for a speed target
    assert not rows["W4A16"]["deployable"] and rows["W4A16"]["runtime"].startswith("torch")
    assert rows["W4A16"]["latency_ms"] is None
    # the pick is whichever of the float model and W8A8 ran faster here (on an AMX Xeon BF16 can win), and ships
    timed = [rows[n] for n in ("FP32", "W8A8")]
    fastest = min(timed, key=lambda r: r["latency_ms"])
    assert first["recommended"] == fastest["scheme"] and (out / "recommended.onnx").is_file()
    assert (first["why"] is not None) == (fastest["scheme"] == "FP32")
    assert all(r["throughput_ips"] > 0 for r in timed) and rows["FP32"]["throughput_speedup"] == 1.0
    report = (out / "study-report.md").read_text()
    assert "Not deployable on openvino-cpu" in report and (out / "pareto-latency.png").stat().st_size > 0
    again = run_study(StudyConfig.load(p), out, progress=False)
    assert again["work"]["evaluated"] == 0 and again["rows"] == first["rows"]


def _row(scheme, kind, drop, ms, ips=None, deployable=True):
    return {"scheme": scheme, "kind": kind, "drop_points": drop, "deployable": deployable, "latency_ms": ms,
            "throughput_ips": ips, "effective_weight_bits": 32.0 if kind == "fp32" else 8.0, "bit_ops_g": 1.0}


XEON = {"cpu": "Intel(R) Xeon(R) Processor", "openvino_float": "bf16"}


def test_the_float_model_wins_where_every_quantized_scheme_is_slower():
    """The AMX host's numbers: BF16 float 22.2 ms, lowbit INT8 23.3 ms, a mixed scheme 24.5 ms."""
    from lowbit.report.study_report import decide, why_float

    rows = [_row("FP32", "fp32", 0.0, 22.2, 65.7), _row("W8A8", "uniform", 0.3, 23.3, 65.0),
            _row("mixed", "budget", 0.1, 24.5, 59.8), _row("rnd", "random", 0.2, 10.0, 99.0)]
    for by in ("latency", "throughput"):
        assert decide(rows, 0.5, "openvino-cpu", by)["scheme"] == "FP32"
    why = why_float(rows, 0.5, "latency", XEON)
    assert "BF16 is faster at batch 1" in why and "W8A8, runs at 0.95x" in why
    # a size or TensorRT decision is about bits, never the float model
    assert decide(rows, 0.5, "size")["scheme"] != "FP32" and decide(rows, 0.5, "tensorrt")["scheme"] != "FP32"


def test_a_faster_quantized_scheme_wins_and_the_metric_decides_which():
    from lowbit.report.study_report import decide

    rows = [_row("FP32", "fp32", 0.0, 22.9, 60.0), _row("W8A8", "uniform", 0.22, 16.7, 70.0),
            _row("mixed", "budget", 0.08, 17.4, 85.0), _row("lossy", "budget", 1.5, 12.0, 120.0),
            _row("W4A16", "uniform", 0.1, 5.0, 500.0, deployable=False)]
    assert decide(rows, 0.5, "openvino-cpu")["scheme"] == "W8A8"
    assert decide(rows, 0.5, "openvino-cpu", "throughput")["scheme"] == "mixed"
    assert decide(rows, 2.0, "openvino-cpu")["scheme"] == "lossy"
    assert decide(rows, 0.1, "openvino-cpu")["scheme"] == "mixed"


def _worker(rank: int, world: int, port: int, cfg_path: str, out: str, q) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    q.put((rank, run_study(StudyConfig.load(cfg_path), out, progress=False)))


def test_a_study_on_two_workers_matches_one(tmp_path, assets):
    """torch.distributed (gloo, two processes on this CPU) deals the schemes and fine-tunes out to the workers;
    rank 0 reports the same schemes, manifests and mAPs as one process, each scheme scored exactly once."""
    import socket

    import torch.multiprocessing as mp

    cfg = {"name": "dist", "model": assets["model"], "imgsz": 128, "eval_batch": 4, "target": "size",
           "calib": {"path": assets["calib"], "max_images": 4}, "eval": {"path": assets["val"], "max_images": 4},
           "sensitivity": {"methods": ["distortion"], "formats": ["W4A16", "W8A16"], "batch": 4,
                           "layers": ["model.2.*"], "images": 2},
           "search": {"method": "distortion", "budgets": [8.0], "random_seeds": [0]},
           "uniform": ["W8A16", "W4A16"], "max_drop_points": [100], "error_halves": 10,
           "finetune": {"schemes": ["W4A16"], "seeds": [0, 1],
                        "config": {"block_steps": 1, "batch": 4, "block_loss": "mse"}}}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    import torch

    torch.set_num_threads(1)  # as each worker runs: the same float rounding, so the same numbers to the bit
    one = run_study(StudyConfig.load(p), tmp_path / "one", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(p), str(tmp_path / "two"), q)) for r in range(2)]
    for proc in procs:
        proc.start()
    got = dict(q.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    two = got[0]
    assert got[1] == {"rank": 1} and two["workers"] == 2 and one["workers"] == 1
    assert [(r["scheme"], r["map50_95"]) for r in two["rows"]] == [(r["scheme"], r["map50_95"]) for r in one["rows"]]
    assert len(one["rows"]) == 7  # FP32, two uniform, budget, random, two fine-tuning seeds
    assert [r["scheme"] for r in one["rows"][-2:]] == ["W4A16+ft-s0", "W4A16+ft-s1"]
    # each distinct scheme scored (or tuned) once, by one of the workers; none twice
    assert two["work"]["evaluated"] == one["work"]["evaluated"] and two["work"]["cached"] == 0
    picked = [json.loads((tmp_path / run / "recommended-manifest.json").read_text()) for run in ("one", "two")]
    assert picked[0]["name"] == picked[1]["name"] == one["recommended"] and picked[0]["layers"] == picked[1]["layers"]
