"""lowbit: sensitivity-guided mixed-precision quantization for vision detectors."""

from lowbit import _env  # noqa: F401  (must run before anything imports ultralytics)
from lowbit.errors import LowbitError

__version__ = "0.1.0"
__all__ = ["LowbitError", "__version__"]
