import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from lowbit.cli import app

runner = CliRunner()


def test_demo_runs_the_whole_pipeline_and_prints_it(tmp_path):
    """The demo's stages at a toy size: label-free sensitivity, the four schemes (uniform INT8, the mixed INT8/float
    scheme for OpenVINO, its random twin, the 60%-INT4 storage scheme), each scored on the runtime that runs it,
    the deployable ones timed there, and a report with both plots and the recommended artifacts."""
    from lowbit.evaluate.bench import host_cpu
    from lowbit.study import demo_target

    out = tmp_path / "run"
    r = runner.invoke(app, ["demo", "--out", str(out), "--quick"])
    assert r.exit_code == 0, r.output
    # artifacts for the CPU the demo runs on: symmetric INT8 activations where AMX runs them
    assert demo_target() == ("openvino-amx" if "amx_int8" in host_cpu()["isa"] else "openvino-cpu")
    for text in ("layer sensitivity", "most and the least sensitive", "W8A8 score", "W4A16 score", f"schemes on {demo_target()}",
                 "budget-0.3bitops-W8A8", "random-0-like", "budget-5.6-W4A16+W8A16", "recommended (by latency):",
                 "noisy", "timed on"):
        assert text in r.output, text
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["scheme"]: row for row in summary["rows"]}
    assert {row["kind"] for row in rows.values()} == {"fp32", "uniform", "budget", "random"}
    assert rows["W8A8"]["runtime"] == "openvino-cpu" and rows["W8A8"]["latency_ms"] > 0 and rows["W8A8"]["speedup"]
    assert rows["budget-0.3bitops-W8A8"]["deployable"] and rows["random-0-like-budget-0.3bitops-W8A8"]["deployable"]
    int4 = rows["budget-5.6-W4A16+W8A16"]
    assert not int4["deployable"] and int4["latency_ms"] is None and 0.55 < int4["int4_share"] < 0.65
    # the pick is the fastest of the float model and the deployable schemes within half a point, as timed here
    rivals = [r for r in rows.values() if r["kind"] in ("fp32", "uniform", "budget") and r["deployable"]
              and r["drop_points"] <= 0.5]
    assert summary["recommended"] == min(rivals, key=lambda r: r["latency_ms"])["scheme"]
    assert (summary["why"] is not None) == (summary["recommended"] == "FP32")
    for f in ("study-report.md", "pareto.png", "pareto-latency.png", "recommended.onnx",
              "recommended_openvino_model/model.xml", "recommended_openvino_model/metadata.yaml"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "recommended-bitmap.png").is_file() == (summary["recommended"] != "FP32")
    again = runner.invoke(app, ["demo", "--out", str(out), "--quick"])  # resumes from the study's cache
    assert again.exit_code == 0 and "evaluated 0 schemes" in again.output


def test_lowbit_artifacts_load_back_into_ultralytics(tmp_path, assets):
    """A lowbit Q/DQ ONNX and its OpenVINO IR folder predict in Ultralytics as its own exports do."""
    import onnx
    from ultralytics import YOLO

    from lowbit.export.onnx_qdq import export_float_onnx
    from lowbit.export.openvino_ir import save_openvino_ir
    from lowbit.models.ultralytics import load_detector

    det = load_detector(assets["model"], 320)
    onnx.save(export_float_onnx(det.net, 320), str(tmp_path / "f.onnx"))
    r = runner.invoke(app, ["quantize-onnx", str(tmp_path / "f.onnx"), "-f", "W8A8", "--calib", assets["calib"],
                            "--calib-images", "4", "--imgsz", "320", "--onnx", str(tmp_path / "q.onnx"),
                            "-o", str(tmp_path / "run")])
    assert r.exit_code == 0 and "deployable" in r.output and "rounded by GPTQ" in " ".join(r.output.split()), r.output
    # the CLI calibrates as the library does by default, and --calib-seed draws another subset
    assert json.loads((tmp_path / "run" / "config.json").read_text())["calibration"]["method"] == "mse"
    r2 = runner.invoke(app, ["quantize-onnx", str(tmp_path / "f.onnx"), "-f", "W8A8", "--calib", assets["calib"],
                             "--calib-images", "4", "--calib-seed", "1", "--imgsz", "320",
                             "--onnx", str(tmp_path / "q1.onnx"), "-o", str(tmp_path / "run1")])
    assert r2.exit_code == 0, r2.output
    scales = [{i.name: onnx.numpy_helper.to_array(i).item() for i in onnx.load(str(p)).graph.initializer
               if i.name.endswith("act_scale")} for p in (tmp_path / "q.onnx", tmp_path / "q1.onnx")]
    assert scales[0].keys() == scales[1].keys() and scales[0] != scales[1]
    ir = save_openvino_ir(tmp_path / "q.onnx", tmp_path / "q_openvino_model")
    image = str(sorted((Path(assets["val"]).parent.parent / "images").glob("*.jpg"))[0])
    for path in (tmp_path / "q.onnx", ir):
        res = YOLO(str(path)).predict(image, imgsz=320, verbose=False)[0]
        assert res.names[0] == "person" and len(res.boxes) > 0, path
    # and Ultralytics' validator reads them too (names, stride, imgsz from the metadata lowbit writes)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}
    assert meta["task"] == "detect" and meta["stride"] == "32" and meta["imgsz"] == "[320, 320]"


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
    """Every refusal: exit 2, a line starting "Error:" that names the culprit, and no run folder left behind
    (runs/<verb>-<time> under the working directory) unless it holds work done, marked FAILED."""
    monkeypatch.chdir(tmp_path)
    cases = [
        (["eval", "-m", str(tmp_path / "none.pt"), "-d", assets["val"]], "none.pt: model file not found"),
        (["eval", "-m", assets["model"], "-d", str(tmp_path)], "no images"),
        (["quantize", "-m", assets["model"], "-f", "W5A5", "--calib", assets["calib"]], "unknown format 'W5A5'"),
        (["eval", "-m", str(tmp_path / "x.onnx"), "-d", assets["val"]], "x.onnx: ONNX file not found"),
        (["check-qdq", str(tmp_path / "x.onnx")], "x.onnx: ONNX file not found"),
        (["check-qdq", str(tmp_path / "junk.onnx")], "junk.onnx: not a readable ONNX file"),
        (["finetune", "-c", str(tmp_path), "--train", assets["calib"], "--recipe", "w5"], "unknown recipe 'w5'"),
        (["eval", "-m", assets["model"], "-d", assets["val"], "--imgsz", "100"],
         "image size 100 must be a positive multiple of the model's stride 32"),
        (["eval", "-m", assets["model"], "-d", assets["val"], "--imgsz", "0"], "imgsz: Input should be greater than 0"),
        (["eval", "-m", str(tmp_path / "junk.onnx"), "-d", assets["val"]], "junk.onnx: not a readable ONNX file"),
        (["layers", "-m", str(tmp_path / "junk.onnx")], "junk.onnx: not a readable ONNX file"),
        (["eval", "-m", assets["model"], "-d", assets["val"], "-o", str(tmp_path / "junk.onnx" / "run")],
         "the run folder (--out) is a file or lies under one"),
        (["bench", str(tmp_path / "junk.onnx"), "--verify-images", "0"], "no model could be timed"),
        (["study"], "give the study's yaml"),
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
        assert "Error:" in printed and "".join(msg.split()) in printed.split("Error:", 1)[1], (args, printed)
        for left in (tmp_path / "runs").glob("*"):  # only a run that did work (bench's notes) stays, marked
            assert args[0] == "bench" and (left / "FAILED").is_file() and (left / "results.json").is_file(), left
            shutil.rmtree(left)
    kept = tmp_path / "kept"  # a folder the user named and that existed keeps its files, marked FAILED
    kept.mkdir()
    sys.argv = ["lowbit", "eval", "-m", str(tmp_path / "none.pt"), "-d", assets["val"], "-o", str(kept)]
    with pytest.raises(SystemExit):
        main()
    assert (kept / "FAILED").is_file() and "none.pt" in (kept / "FAILED").read_text()


def test_compare_pairs_the_runs_and_names_a_bad_one(tmp_path, assets, capsys):
    """Two evaluations of one model differ by exactly 0 on every half of the images (the halves are shared); the
    gap of collapsed INT4 (ModelOpt's max calibration alone) is resolved; runs that cannot be paired are
    refused, naming the run."""
    r = runner.invoke(app, ["quantize", "-m", assets["model"], "-f", "W4A16", "--rounding", "nearest", "--range", "absmax",
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


def test_search_quantize_export_bench_chain_on_the_cli(tmp_path, assets):
    """A manifest from `lowbit search` becomes a checkpoint (`quantize --manifest`), a Q/DQ ONNX for OpenVINO
    (`export`), and a timed, output-checked graph (`bench`)."""
    common = ["-m", "yolov10n.yaml", "--imgsz", "64"]
    r = runner.invoke(app, ["sensitivity", *common, "--calib", assets["calib"], "--calib-images", "4", "--method",
                            "distortion", "-f", "W8A8", "--rounding", "nearest", "--layers", "model.2.*,model.4.*",
                            "-o", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", "-s", str(tmp_path / "s" / "distortion"), "-f", "W8A8", "--topk", "3",
                            "--low", "W8A8", "--high", "FP16", "-o", str(tmp_path / "schemes")])
    assert r.exit_code == 0, r.output
    (manifest,) = (tmp_path / "schemes").glob("*.json")
    chosen = json.loads(manifest.read_text())["layers"]
    assert len(chosen) == 7  # the three most sensitive of the ten scored layers stay float
    r = runner.invoke(app, ["quantize", *common, "--manifest", str(manifest), "--calib", assets["calib"],
                            "--calib-images", "4", "-o", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    (ckpt,) = [p for p in (tmp_path / "q").iterdir() if (p / "manifest.json").is_file()]
    assert set(json.loads((ckpt / "manifest.json").read_text())["layers"]) == set(chosen)
    r = runner.invoke(app, ["export", "-c", str(ckpt), "--target", "openvino-cpu", "--calib", assets["calib"],
                            "--calib-images", "4", "--onnx", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "e")])
    assert r.exit_code == 0 and "deployable" in r.output, r.output
    r = runner.invoke(app, ["bench", str(tmp_path / "m.onnx"), "--reps", "2", "--threads", "1", "--verify-images", "2",
                            "--throughput-rounds", "2", "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["results"]
    assert any(x["runtime"] == "openvino-cpu" and x["median_ms"] and x["throughput_ips"] > 0 for x in rows)
    assert "cores,threads:1" in "".join(r.output.split())  # the host every timing ran on


def test_every_flag_means_one_thing_across_verbs_and_targets_share_one_default():
    """One spelling, one parameter and type in every verb that has it (hidden old spellings aside); one --target
    default everywhere a result depends on the target."""
    import typer.main

    from lowbit.targets import DEFAULT_TARGET

    cli = typer.main.get_command(app)
    seen: dict[str, set] = {}
    targets = {}
    for name, cmd in cli.commands.items():
        for p in cmd.params:
            if getattr(p, "hidden", False) or p.param_type_name != "option":
                continue
            for flag in p.opts:
                seen.setdefault(flag, set()).add((p.name, str(p.bare_type())))
            if "--target" in p.opts:
                targets[name] = p.default
    clash = {flag: kinds for flag, kinds in seen.items() if len(kinds) > 1}
    assert not clash, clash
    assert set(targets) >= {"export", "quantize-onnx", "sensitivity", "search"}
    assert set(targets.values()) == {DEFAULT_TARGET}
    # old spellings still work, hidden
    help_text = runner.invoke(app, ["quantize-onnx", "--help"]).output
    assert "--act-range" in help_text and "--method" not in help_text
