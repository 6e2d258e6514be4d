import json

import pytest
import torch

from conftest import needs_shared
from lowbit.data.loader import make_batches
from lowbit.errors import LowbitError
from lowbit.evaluate.coco import coco_map, evaluate
from lowbit.models.decode import decode, layout_of


def test_layouts_decode_to_the_same_boxes(yolov10n, demo_val):
    batch = make_batches(demo_val.subset(1), 640, 1)[0]
    head = yolov10n.net.model[-1]
    with torch.no_grad():
        decoded, raw = yolov10n.net(batch.images)
    dfl = torch.cat([raw["boxes"], raw["scores"]], 1)  # [1, 64+80, 8400] before decoding
    assert layout_of(decoded, 80) == "decoded" and layout_of(dfl, 80) == "dfl"
    a, b = decode(decoded, 80, 640)[0], decode(dfl, 80, 640)[0]
    assert len(a) > 0 and torch.allclose(a[:20], b[:20], atol=1e-2)
    e2e = a[:300].unsqueeze(0)  # [1, N, 6] is the end-to-end layout: taken as is
    assert layout_of(e2e, 80) == "end2end" and torch.allclose(decode(e2e, 80, 640)[0], a[:300])
    assert head.nc == 80


def test_unknown_layout_is_a_clear_error():
    with pytest.raises(LowbitError, match=r"cannot decode a model output of shape \[1, 7, 100\]"):
        decode(torch.zeros(1, 7, 100), 80, 640)


def test_coco_map_perfect_detections(demo_val):
    gt = demo_val.coco
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"] if not a.get("iscrowd")]
    assert coco_map(gt, dets)["map50_95"] > 0.99
    assert coco_map(gt, [])["map50_95"] == 0.0


def test_torch_and_onnx_share_one_path(tmp_path, yolov10n, demo_val):
    ds = demo_val.subset(6)
    pt = evaluate(yolov10n.net, ds, yolov10n.names, progress=False, warmup=1)
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(yolov10n.net, torch.zeros(1, 3, 640, 640), onnx_path, opset_version=17, dynamo=False,
                      input_names=["images"], output_names=["output0"])
    ort = evaluate(str(onnx_path), ds, yolov10n.names, progress=False, warmup=1)
    assert pt.map50_95 > 0.2
    assert abs(pt.map50_95 - ort.map50_95) < 0.002
    assert ort.runtime == "ort-cpu" and ort.latency.images_timed == 6 and ort.latency.p90_ms >= ort.latency.median_ms


@needs_shared
@pytest.mark.slow
def test_matches_ultralytics_val(shared_copy, yolov10n):
    """Same 200 images, same model: Ultralytics' detections scored by pycocotools vs ours.

    Ultralytics' own AP (0.411) uses its own interpolation; scored by pycocotools, its detections give
    0.416. Ours must agree with that within 0.005 and with Ultralytics' own number within 0.01.
    """
    from ultralytics import YOLO

    from lowbit.data.datasets import load_dataset

    res = YOLO(yolov10n.source).val(data=str(shared_copy / "coco-val200.yaml"), imgsz=640, batch=8, device="cpu",
                                    plots=False, save_json=True, project=str(shared_copy / "runs"), verbose=False)
    ds = load_dataset(shared_copy / "coco-val200.yaml")
    cats = ds.category_ids(yolov10n.names)
    preds = json.loads(next((shared_copy / "runs").rglob("predictions.json")).read_text())
    theirs = coco_map(ds.coco, [{**p, "category_id": cats[p["category_id"] - 1]} for p in preds])["map50_95"]
    ours = evaluate(yolov10n.net, ds, yolov10n.names, batch_size=8, progress=False, warmup=1).map50_95
    assert abs(res.box.map - 0.411) < 0.002
    assert abs(ours - theirs) < 0.005, (ours, theirs)
    assert abs(ours - res.box.map) < 0.01, (ours, res.box.map)
    assert (shared_copy / "labels.cache").exists()  # Ultralytics wrote its cache into the copy, not ../shared


def test_halves_reaccumulate_exactly_like_pycocotools(yolov10n, demo_val):
    """The score of a subset of the images, re-accumulated from one COCO matching, is pycocotools' score on
    that subset; all images give pycocotools' mAP itself."""
    import numpy as np

    from lowbit.evaluate.resampling import image_evals, paired_halves

    ds = demo_val.subset(10)
    dets = evaluate(yolov10n.net, ds, yolov10n.names, batch_size=5, progress=False, warmup=0).detections
    gt = ds.coco
    ev = image_evals(gt, dets)
    full = coco_map(gt, dets)
    assert ev.map() == pytest.approx((full["map50_95"], full["map50"]), abs=1e-12)

    keep = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0], bool)
    ids = {im["id"] for im, k in zip(gt["images"], keep) if k}
    part = coco_map({"images": [im for im in gt["images"] if im["id"] in ids],
                     "annotations": [a for a in gt["annotations"] if a["image_id"] in ids],
                     "categories": gt["categories"]}, [d for d in dets if d["image_id"] in ids])
    assert ev.map(keep) == pytest.approx((part["map50_95"], part["map50"]), abs=1e-12)
    assert abs(part["map50_95"] - full["map50_95"]) > 1e-3  # the subset changes the score

    halves = paired_halves([ev, ev], replicates=100)
    assert np.array_equal(halves[:, 0], halves[:, 1]) and halves[:, 0].std() > 0.005
