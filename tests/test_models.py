import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models.ultralytics import load_detector


def test_yolov10n_layers(yolov10n):
    layers = yolov10n.layers()
    assert len(layers) == 83
    dfl = [x for x in layers if x.name.endswith("dfl.conv")]
    assert len(dfl) == 1 and not dfl[0].quantizable
    first = layers[0]
    assert first.name == "model.0.conv" and first.weight_shape == [16, 3, 3, 3]
    assert first.macs == 16 * 320 * 320 * 27  # stride-2 conv at 640 px
    assert {x.role for x in layers} >= {"body", "head-box", "head-cls", "head-dfl"}
    assert 2.2e6 < sum(x.params for x in layers) < 2.4e6


def test_yolov10m_from_yaml_builds_offline():
    det = load_detector("yolov10m.yaml", imgsz=64)
    layers = det.layers()
    # 118 convs as deployed: fusing drops the training-only one-to-many head branch (142 before)
    assert len(layers) == 118 and 15.0e6 < sum(x.params for x in layers) < 15.8e6
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in det.net.modules())  # folded as deployed


def test_missing_and_corrupt_model(tmp_path):
    with pytest.raises(LowbitError, match="not found"):
        load_detector(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(LowbitError, match="bad.pt: not a loadable"):
        load_detector(bad)
    with pytest.raises(LowbitError, match="expected an Ultralytics"):
        load_detector(tmp_path / "model.bin")
