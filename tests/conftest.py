import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("LOWBIT_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "lowbit"))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets"
SHARED = Path(os.environ.get("LOWBIT_SHARED_ASSETS", SHARED))
needs_shared = pytest.mark.skipif(not (SHARED / "models" / "yolov10n" / "yolov10n.pt").is_file(),
                                  reason=f"needs the shared assets at {SHARED} (set LOWBIT_SHARED_ASSETS)")


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test starts with the process's own torch thread count: Ultralytics' predict sets it to cores - 1 for
    the rest of the process, which changed float rounding (and so a short fine-tune's outcome) in later tests."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def assets():
    from lowbit.api import demo_assets

    return demo_assets()


@pytest.fixture(scope="session")
def yolov10n(assets):
    from lowbit.models.ultralytics import load_detector

    return load_detector(assets["model"])


@pytest.fixture(scope="session")
def tiny():
    """A real YOLOv10n architecture from yaml (random weights) at a small image size: fast."""
    from lowbit.models.ultralytics import load_detector

    return load_detector("yolov10n.yaml", imgsz=64)


@pytest.fixture(scope="session")
def demo_val(assets):
    from lowbit.data.datasets import load_dataset

    return load_dataset(assets["val"])


@pytest.fixture(scope="session")
def demo_calib_batches(assets):
    from lowbit.data.datasets import load_dataset
    from lowbit.data.loader import make_batches

    return make_batches(load_dataset(assets["calib"]).subset(8), 640, 4)


@pytest.fixture()
def shared_copy(tmp_path):
    """coco-val200 laid out in tmp (labels copied, images linked) so Ultralytics writes its cache there."""
    dst = tmp_path / "coco-val200"
    (dst / "images").mkdir(parents=True)
    shutil.copytree(SHARED / "coco-val200" / "labels", dst / "labels")
    shutil.copytree(SHARED / "coco-val200" / "annotations", dst / "annotations")
    for f in (SHARED / "coco-val200" / "images").iterdir():
        (dst / "images" / f.name).symlink_to(f)
    shutil.copy(SHARED / "coco-val200" / "coco-val200.yaml", dst)
    return dst
