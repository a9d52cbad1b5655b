"""What a compression run did, step by step: progress as it goes, then the time of every step and
one line for everything a step did or left undone.

The library never prints. A run reports through a :class:`RunLog`: long steps call
``log.advance(done, total)`` inside ``with log.step(name):``, which reaches the caller's
``progress(task, done, total)`` callback (the command line draws bars with an ETA from it), and
notes (a pass that could not cover a layer, and why) are kept for the report.
:func:`legonet.compress` attaches the log to the model it returns (``cm.log``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# ``progress(task, done, total)``: ``task`` names the step, ``done`` of ``total`` units are done
# (``total`` 0: unknown). Called often; it must be cheap.
Progress = Callable[[str, int, int], None]


@dataclass
class RunLog:
    """Steps (name, seconds) in the order they ran, and notes for the user."""

    progress: Progress | None = None
    steps: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _current: list[str] = field(default_factory=list, repr=False)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block as step ``name`` (nested steps are timed too, each under its own name)."""
        self._current.append(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._current.pop()
            self.steps.append((name, time.perf_counter() - start))

    def advance(self, done: int, total: int) -> None:
        """Report progress of the current step."""
        self.report(self._current[-1] if self._current else "working", done, total)

    def report(self, task: str, done: int, total: int) -> None:
        """Report progress of ``task`` (a :data:`Progress` callback, e.g. for k-means stages)."""
        if self.progress is not None:
            self.progress(task, done, total)

    def note(self, line: str) -> None:
        """Keep one line for the user (what a step did, or left undone and why)."""
        self.notes.append(line)

    @property
    def say(self) -> Callable[[str], None]:
        """A ``say(line)`` callback that keeps the line as a note."""
        return self.note

    def seconds(self, name: str) -> float:
        """Total time of the steps called ``name``."""
        return sum(s for n, s in self.steps if n == name)

    def timing_lines(self) -> list[str]:
        """``"name: 12.3 s"`` per step name, in the order the steps first finished."""
        order = list(dict.fromkeys(n for n, _ in self.steps))
        return [f"{n}: {self.seconds(n):.1f} s" for n in order]

