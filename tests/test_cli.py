import json

from typer.testing import CliRunner

from lowbit.cli import app

runner = CliRunner()


def test_demo_prints_a_real_table(tmp_path):
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    for word in ("FP32", "W8A8", "W4A16", "mAP50-95"):
        assert word in r.output
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    maps = {row["scheme"]: row["result"]["map50_95"] for row in rows}
    # with GPTQ rounding uniform INT4 survives (ModelOpt's max calibration alone collapses to ~0.02)
    assert maps["FP32"] > 0.3 and maps["W8A8"] > maps["FP32"] - 0.05 and 0.25 < maps["W4A16"] < maps["FP32"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["formats"] == ["W8A8", "W4A16"]
    assert (tmp_path / "run" / "run.log").stat().st_size > 0


def test_layers_and_formats(tmp_path):
    r = runner.invoke(app, ["layers", "-m", "yolov10n.yaml", "--imgsz", "64", "--json", str(tmp_path / "l.json")])
    assert r.exit_code == 0 and "model.23.dfl.conv" in r.output and "never" in r.output
    assert len(json.loads((tmp_path / "l.json").read_text())) == 83
    assert "W4A8-FP8" in runner.invoke(app, ["formats"]).output


def test_quantize_saves_a_checkpoint_that_eval_reads(tmp_path, assets):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", "-m", assets["model"], "-f", "W8A16", "--calib", assets["calib"],
                            "--calib-images", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", "-m", str(out / "W8A16"), "-d", assets["val"], "--max-images", "4",
                            "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e" / "results.json").read_text())["map50_95"] > 0.1
    assert "8.00" in r.output and "nan" not in r.output  # the checkpoint's scheme: 8-bit weights


def test_bad_inputs_exit_2_with_the_culprit_named(tmp_path, assets, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a refused run still logs to runs/<verb>-<time> under the working directory
    cases = [
        (["eval", "-m", str(tmp_path / "none.pt"), "-d", assets["val"]], "none.pt: model file not found"),
        (["eval", "-m", assets["model"], "-d", str(tmp_path)], "no images"),
        (["quantize", "-m", assets["model"], "-f", "W5A5", "--calib", assets["calib"]], "unknown format 'W5A5'"),
        (["eval", "-m", str(tmp_path / "x.onnx"), "-d", assets["val"]], "x.onnx: ONNX file not found"),
        (["check-qdq", str(tmp_path / "x.onnx")], "x.onnx: ONNX file not found"),
        (["check-qdq", str(tmp_path / "junk.onnx")], "junk.onnx: not a readable ONNX model"),
        (["finetune", "-c", str(tmp_path), "--calib", assets["calib"], "--mode", "adaround", "--block-loss", "fishr"],
         "block_loss: Input should be 'mse', 'fisher' or 'mse+fisher'"),
    ]
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    from lowbit.cli import main
    import sys
    import pytest

    for args, msg in cases:
        sys.argv = ["lowbit", *args]
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 2
        printed = "".join(capsys.readouterr().out.split())  # rich wraps long paths anywhere
        assert "".join(msg.split()) in printed, (args, printed)


def test_compare_pairs_the_runs_and_names_a_bad_one(tmp_path, assets, capsys):
    """Two evaluations of one model differ by exactly 0 on every half of the images (the halves are shared); the
    gap of collapsed INT4 (ModelOpt's max calibration alone) is resolved; runs that cannot be paired are
    refused, naming the run."""
    r = runner.invoke(app, ["quantize", "-m", assets["model"], "-f", "W4A16", "--clip", "max", "--range", "absmax",
                            "--calib", assets["calib"],
                            "--calib-images", "4", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    runs = {}
    for name, model, n in (("a", assets["model"], "8"), ("b", assets["model"], "8"), ("c", str(tmp_path / "q" / "W4A16"), "8"),
                           ("d", assets["model"], "6")):
        runs[name] = tmp_path / name
        r = runner.invoke(app, ["eval", "-m", model, "-d", assets["val"], "--max-images", n, "--batch", "4",
                                "--out", str(runs[name])])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["compare", str(runs["a"]), str(runs["b"]), str(runs["c"]), "--replicates", "100",
                            "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    ref, same, collapsed = json.loads((tmp_path / "cmp" / "results.json").read_text())["rows"]
    assert ref["map50_95"] > 0.2 and 0.005 < ref["se"] < 0.2 and ref["se"] == same["se"]
    assert same["delta"] == 0 and same["delta_ci95"] == [0, 0] and same["delta_se"] == 0
    assert collapsed["delta"] < -0.15 and collapsed["delta_ci95"][1] < 0 < collapsed["delta_se"]
    assert "95% interval of Δ" in r.output

    (runs["b"] / "detections.json.gz").unlink()
    from lowbit.cli import main
    import sys
    import pytest

    for args, msg in ((["compare", str(runs["a"]), str(runs["b"])], f"{runs['b']}: no detections.json.gz"),
                      (["compare", str(runs["a"]), str(runs["d"])], "a paired comparison needs the same images")):
        sys.argv = ["lowbit", *args]
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 2
        printed = "".join(capsys.readouterr().out.split())
        assert "".join(msg.split()) in printed, (args, printed)
