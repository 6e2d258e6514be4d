"""Latency statistics from per-image timings."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel


class Latency(BaseModel):
    runtime: str
    batch: int
    images_timed: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    throughput_ips: float

    @classmethod
    def from_seconds(cls, runtime: str, batch: int, per_batch_s: list[float]) -> "Latency":
        per_image = np.asarray(per_batch_s) / batch * 1e3
        return cls(runtime=runtime, batch=batch, images_timed=len(per_image) * batch,
                   median_ms=float(np.median(per_image)), p90_ms=float(np.percentile(per_image, 90)),
                   mean_ms=float(per_image.mean()), throughput_ips=float(1e3 / per_image.mean()))
