import json
from pathlib import Path

import numpy as np
import pytest

from lowbit.data.datasets import load_dataset
from lowbit.data.loader import letterbox_geometry, make_batches
from lowbit.errors import LowbitError


def test_coco_json_dataset(demo_val):
    assert len(demo_val) == 32 and demo_val.has_labels
    assert demo_val.names[0] == "person" and len(demo_val.names) == 80
    # crowd regions are kept for COCOeval but never become training targets
    crowd = sum(a.get("iscrowd", 0) for a in demo_val.coco["annotations"])
    assert sum(len(im.boxes) for im in demo_val.images) == len(demo_val.coco["annotations"]) - crowd


def test_subset_is_deterministic_and_trims_annotations(demo_val):
    a, b = demo_val.subset(5, seed=1), demo_val.subset(5, seed=1)
    assert [i.path for i in a.images] == [i.path for i in b.images]
    assert [i.path for i in a.images] != [i.path for i in demo_val.subset(5, seed=2).images]
    ids = {im.image_id for im in a.images}
    assert {x["image_id"] for x in a.coco["annotations"]} <= ids and len(a.coco["images"]) == 5


def test_folder_and_list_file(tmp_path, assets):
    folder = load_dataset(assets["calib"])
    assert len(folder) == 16 and not folder.has_labels
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(i.path) for i in folder.images[:3]))
    assert len(load_dataset(lst)) == 3


def test_yolo_labels_become_coco_ground_truth(tmp_path, demo_val, monkeypatch):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    im = demo_val.images[0]
    (root / "images" / im.path.name).write_bytes(im.path.read_bytes())
    (root / "labels" / im.path.with_suffix(".txt").name).write_text("0 0.5 0.5 0.2 0.4\n")
    (root / "d.yaml").write_text("train: images\nval: images\nnames: {0: person}\n")
    ds = load_dataset(root / "d.yaml")
    ann = ds.coco["annotations"][0]
    assert ann["bbox"][2] == pytest.approx(0.2 * im.width) and ds.images[0].boxes.shape == (1, 5)
    # named by a relative path (as on a command line), and with a "path" key relative to the yaml
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset(Path("ds") / "d.yaml")) == 1
    (root / "sub").mkdir()
    (root / "sub" / "e.yaml").write_text("path: ..\nval: images\nnames: {0: person}\n")
    assert len(load_dataset(Path("ds") / "sub" / "e.yaml")) == 1


@pytest.mark.parametrize("content,msg", [("{not json", "malformed COCO json"), ('{"images": []}', "not a COCO instances")])
def test_malformed_json(tmp_path, content, msg):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(LowbitError, match=msg):
        load_dataset(p)


def test_empty_folder_and_missing_images(tmp_path):
    with pytest.raises(LowbitError, match="no images"):
        load_dataset(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [],
                                                  "categories": [{"id": 1, "name": "person"}]}))
    (tmp_path / "images").mkdir()
    with pytest.raises(LowbitError, match="x.jpg not found"):
        load_dataset(tmp_path / "a.json", images=tmp_path / "images")


def test_letterbox_and_targets_match_ultralytics_geometry(demo_val):
    from ultralytics.utils.ops import scale_boxes
    import torch

    batch = make_batches(demo_val.subset(2), 640, 2)[0]
    assert batch.images.shape == (2, 3, 640, 640) and 0 <= batch.images.min() and batch.images.max() <= 1
    t = batch.targets(640)
    first = t["batch_idx"] == 0
    xywh = t["bboxes"][first] * 640
    xyxy = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    back = scale_boxes((640, 640), xyxy, batch.items[0].orig_shape)
    np.testing.assert_allclose(back.numpy(), batch.items[0].record.boxes[:, 1:], atol=0.6)
    gain, px, py = letterbox_geometry(batch.items[0].orig_shape, 640)
    assert gain > 0 and (px == 0 or py == 0)


def test_bad_boxes_and_truncated_images_are_refused_by_name(tmp_path, assets):
    """A box of negative size would silently lower mAP; a truncated JPEG would calibrate (and score) on a half-grey
    image with only libjpeg's stderr line: both are refused, naming the file."""
    src = Path(assets["val"])
    coco = json.loads(src.read_text())
    coco["annotations"][3]["bbox"][2] = -5.0
    (tmp_path / "annotations").mkdir()
    bad = tmp_path / "annotations" / "bad.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(LowbitError, match=r"bad.json: annotation .* negative size -5.0"):
        load_dataset(bad, src.parent.parent / "images")
    images = tmp_path / "images"
    images.mkdir()
    whole = sorted(Path(assets["calib"]).glob("*.jpg"))[0].read_bytes()
    (images / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(LowbitError, match="cut.jpg: truncated JPEG"):
        make_batches(load_dataset(images), 64, 1)
    (images / "cut.jpg").write_bytes(whole)  # the same file whole loads
    assert make_batches(load_dataset(images), 64, 1)[0].images.shape == (1, 3, 64, 64)
