"""Progress bars for long loops (rich), silent when asked or when output is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as p:
        yield from p.track(items, description=description, total=total)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def step(description: str, enabled: bool = True):
    """A spinner with elapsed time for one long step that has no loop to count (quantizing, exporting)."""
    if not enabled or not sys.stderr.isatty():
        return _Null()
    from rich.console import Console

    return Console(stderr=True).status(description)
