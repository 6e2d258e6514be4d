"""An OpenVINO IR folder (model.xml + model.bin + metadata.yaml) from an exported ONNX, laid out as Ultralytics'
own OpenVINO exports are, so `YOLO("<name>_openvino_model")` loads it and OpenVINO reads it without the ONNX
frontend."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from lowbit.errors import LowbitError


def save_openvino_ir(onnx_path: str | Path, folder: str | Path) -> Path:
    """Convert `onnx_path` (float or Q/DQ) to an IR folder; its name should end in `_openvino_model` for
    Ultralytics to recognise it. Written to a temporary folder first, so a failure leaves nothing behind."""
    import onnx
    import openvino as ov
    import yaml

    onnx_path, folder = Path(onnx_path), Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
        for k in ("names", "imgsz", "end2end"):
            if k in meta:
                meta[k] = ast.literal_eval(meta[k])
        for k in ("stride", "batch", "channels"):
            if k in meta:
                meta[k] = int(meta[k])
        (tmp / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LowbitError(f"{onnx_path}: OpenVINO cannot convert it to IR ({str(e).splitlines()[0][:200]})") from None
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
