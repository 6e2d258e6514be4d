import json

import pytest
import yaml

from lowbit.api import DataConfig
from lowbit.errors import LowbitError
from lowbit.study import SensitivitySpec, StudyConfig, run_study


def _write(tmp_path, assets, budgets):
    cfg = {"name": "t", "model": assets["model"], "imgsz": 256, "eval_batch": 4, "export_onnx": False,
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
    cfg = {"name": "ft", "model": assets["model"], "imgsz": 128, "eval_batch": 4, "export_onnx": True,
           "calib": {"path": assets["calib"], "max_images": 8}, "eval": {"path": assets["val"], "max_images": 4},
           "search": [], "uniform": ["W4A16"], "max_drop_points": [100],
           "finetune": {"schemes": ["W4A16"], "config": {"epochs": 1, "lr": 1e-4, "batch": 4}}, "speed": True}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    first = run_study(StudyConfig.load(p), out, progress=False)
    rows = {r["scheme"]: r for r in first["rows"]}
    assert rows["W4A16+ft"]["kind"] == "finetune" and rows["W4A16+ft"]["int4_share"] == 1.0
    report = (out / "study-report.md").read_text()
    assert "## Fine-tuning" in report and "| W4A16 |" in report
    # the recommended scheme (fewest bits: W4A16 or its tuned twin) ships as ONNX, timed beside FP32
    assert (out / "recommended.onnx").is_file() and "| ort-cpu |" in report and "| openvino-cpu |" in report
    assert first["work"] == {"evaluated": 3, "cached": 0}
    # every scheme timed on every runtime; the tuned twin shares its base's graph, so its timing too
    speed = {r["scheme"]: {b["runtime"]: b for b in r["bench"]} for r in first["speed"]["rows"]}
    assert set(speed) == {"FP32", "W4A16", "W4A16+ft"} and first["speed"]["timed"] == 2
    assert speed["FP32"]["ort-cpu"]["median_ms"] > 0 and speed["W4A16"] == speed["W4A16+ft"]
    section = report.split("## Deployed speed of every scheme")[1]
    assert "| W4A16+ft | " in section and "Within 100 point(s) of FP32, fastest on ort-cpu:" in section
    again = run_study(StudyConfig.load(p), out, progress=False)
    assert again["work"] == {"evaluated": 0, "cached": 3} and again["speed"]["timed"] == 0
    cfg["calib"] = cfg["eval"]  # training on the evaluation images is refused
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(LowbitError, match="share 4 image"):
        run_study(StudyConfig.load(p), tmp_path / "run2", progress=False)
