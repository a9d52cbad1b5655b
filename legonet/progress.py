"""Progress bars with ETA for the CLI, fed by the library's ``progress(task, done, total)`` callbacks.

The library never prints: :func:`legonet.ops.kmeans.kmeans` and
:func:`legonet.streaming.compress_sharded` only call the callback they are given. This module turns
those calls into rich progress bars on stderr (one bar per task), or into nothing in quiet mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

Callback = Callable[[str, int, int], None]

_LABELS = {
    "sample": "reading shards, sampling blocks",
    "fit": "fitting the codebook (stages)",
    "assign": "assigning blocks",
}


def _quiet(_task: str, _done: int, _total: int) -> None:
    return None


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callback]:
    """Yield a ``callback(task, done, total)`` that draws one rich bar (with ETA) per task.

    A task seen again after it finished (e.g. ``"assign"`` once per tensor in layer scope) reuses
    its bar. With ``enabled=False`` the callback does nothing.
    """
    if not enabled:
        yield _quiet
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bars = Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)
    ids: dict[str, int] = {}

    def callback(task: str, done: int, total: int) -> None:
        if not ids:
            bars.start()  # lazily: a run that fails before any progress leaves stderr clean
        if task not in ids:
            ids[task] = bars.add_task(_LABELS.get(task, task), total=max(total, 1))
        bars.update(ids[task], completed=done, total=max(total, 1))

    try:
        yield callback
    finally:
        if ids:
            bars.stop()
