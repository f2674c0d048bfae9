"""Progress bars on stderr: the one rich implementation every long loop uses.

Bars are transient and drawn only when stderr is a terminal: in a log file a transient
bar would leave blank lines behind. rich is imported only when a bar is drawn."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Any]:
    """A live ``rich.progress.Progress`` on stderr to add bars to, or None when
    ``enabled`` is false or stderr is not a terminal."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        yield progress


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str, total: int) -> Iterator[Callable[[int], None]]:
    """One bar counting up to ``total``; yields ``advance(n)``, a no-op when no bar is drawn."""
    with progress_bars(enabled and total > 0) as progress:
        if progress is None:
            yield lambda n: None
            return
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
