"""What lowbit knows of one quantizable layer, whatever model it comes from (a PyTorch module or an ONNX Conv)."""

from __future__ import annotations

from pydantic import BaseModel


class LayerInfo(BaseModel):
    name: str
    type: str
    weight_shape: list[int]
    params: int
    macs: int
    role: str
    quantizable: bool = True
    reads_image: bool = False  # its input is the network's input (lowbit.formats.for_image_input)
