"""Atomic file output and run folders: a crash never leaves a half-written result behind."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def _default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_default) + "\n")


def read_json(path: str | Path) -> Any:
    from lowbit.errors import LowbitError

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path}: not valid JSON ({e})") from None


class RunDir:
    """One run's folder: the resolved config, results JSON and a log, all written atomically. A run that ends in
    an error gets a FAILED file (and the error in its log), so a folder never passes for a finished result; a
    folder this run created that holds no more than its config and log when the input is refused is removed, so
    bad input leaves nothing behind in any verb."""

    opened: list["RunDir"] = []  # this process's runs, for the CLI to mark the failed ones

    def __init__(self, root: str | Path | None, kind: str, log_name: str = "run.log"):
        from lowbit.errors import LowbitError

        self.path = Path(root or RunDir.default_root(kind))
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise LowbitError(f"{self.path}: the run folder (--out) is a file or lies under one") from None
        self.log = logging.getLogger(f"lowbit.{kind}")
        self.log.setLevel(logging.INFO)
        handler = logging.FileHandler(self.path / log_name)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.log.handlers = [handler]
        self.log.propagate = False
        # third-party warnings (once `logging.captureWarnings` is on, as the CLI has it) go to the run's log
        logging.getLogger("py.warnings").handlers = [logging.NullHandler(), handler]
        (self.path / "FAILED").unlink(missing_ok=True)  # a re-run (resuming a study) starts clean
        RunDir.opened.append(self)

    @staticmethod
    def default_root(kind: str) -> Path:
        return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"

    def fail(self, error: BaseException, bad_input: bool = False) -> None:
        for h in self.log.handlers:
            h.close()
        if not self.path.is_dir():
            return
        if bad_input and self.created and {p.name for p in self.path.iterdir()} <= {"config.json", "run.log"}:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        self.log.error("failed: %s", error)
        atomic_write_text(self.path / "FAILED", f"{type(error).__name__}: {error}\n")

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        return write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, text)
