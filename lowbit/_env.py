"""Process-wide settings that must be in place before Ultralytics is imported.

Ultralytics downloads fonts, weights and settings on first use and writes a settings file under the
user's config dir. lowbit must never reach the network at run time, so it pins Ultralytics offline
and keeps its config dir under lowbit's own cache (overridable with LOWBIT_CACHE).
"""

import logging
import os
from pathlib import Path

CACHE_DIR = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", str(CACHE_DIR / "ultralytics"))
Path(os.environ["YOLO_CONFIG_DIR"]).mkdir(parents=True, exist_ok=True)

# torch logs "No CUDA runtime is found" whenever ModelOpt is imported on a CPU-only machine.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
# ModelOpt's and Ultralytics' own tqdm bars would interleave with lowbit's progress display (rich, on stderr)
os.environ.setdefault("TQDM_DISABLE", "1")
