"""How many threads the compute loops should use, and a scope that sets them.

PyTorch starts one thread per core and splits every large operation among them, with a barrier at
its end. When other processes keep the cores busy, a thread that was preempted holds up the barrier
for a whole scheduler time slice, once per operation: the k-means engine, which runs thousands of
operations of a few hundred microseconds, then ran 10 to 200 times slower with two threads than
with one on a busy two-core machine. Fewer threads than cores cost at most the idle cores; more threads than
free cores can cost an order of magnitude. So the choice leans towards fewer threads:

* the cores this process may run on (``os.sched_getaffinity``, else ``os.cpu_count()``),
* less the cores other processes keep busy *now*: the machine's busy CPU time over a short sample
  of ``/proc/stat`` (0.2 s) minus this process's own; where that is not available, the 1-minute
  load average minus this process's own share of it. The load average lags by a minute: a second
  command started right after a first would see the first's load and take half the cores of an
  idle machine,
* rounded to the nearest whole core, and at least 1.

:func:`choose_threads` is the rule as a pure function; :func:`auto_threads` feeds it what the
operating system reports; :func:`using_threads` sets ``torch.set_num_threads`` for a block and
restores the previous value on exit. No state is kept outside torch's own thread setting.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from legonet.errors import ConfigError

# The load average is an exponential moving average of the number of runnable threads with this
# time constant (the "1-minute" load).
_LOAD_WINDOW_S = 60.0


def choose_threads(cores: int, load: float, own_threads: float) -> int:
    """Threads for a compute-bound job: the cores not kept busy by other processes.

    Args:
        cores: cores this process may run on (>= 1).
        load: the cores the machine keeps busy (a short CPU-time sample, or the 1-minute load
            average: runnable threads, averaged).
        own_threads: this process's own share of ``load``.
    Returns:
        ``round(cores - max(0, load - own_threads))``, clipped to ``[1, cores]``.
    """
    if cores < 1:
        raise ConfigError(f"cores must be >= 1, got {cores}")
    others = max(0.0, load - own_threads)
    # A core counts as free when other processes use less than half of it.
    free = math.floor(cores - others + 0.5)
    return max(1, min(cores, free))


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity where the OS reports it, else every core."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def load_share(cpu_seconds: float, age_seconds: float) -> float:
    """A process's share of the 1-minute load average, had it used its CPU time evenly over its age.

    A process that started ``a`` seconds ago and used ``u = cpu / a`` cores on average adds
    ``u * (1 - exp(-a / 60))`` to the average: a young process (a CLI call that has just imported
    torch) counts for almost nothing, a long-running busy one for the threads it keeps running.
    """
    age = max(age_seconds, 1e-3)
    return cpu_seconds / age * (1.0 - math.exp(-age / _LOAD_WINDOW_S))


def own_load() -> float:
    """This process's share of the 1-minute load average (:func:`load_share` of its CPU time and
    age). Where its age is unknown (no ``/proc``), its calling thread is counted: ``1.0``."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 1.0
    # fields[0] is field 3 of proc(5) (state); the start time, in clock ticks after boot, is field 22.
    return load_share(time.process_time(), uptime - int(fields[19]) / ticks)


def _busy_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return (total - idle) / os.sysconf("SC_CLK_TCK")


def busy_now(sample_s: float = 0.2) -> tuple[float, float] | None:
    """``(cores busy, of which this process)`` over the next ``sample_s`` seconds, or None where
    ``/proc/stat`` cannot be read."""
    try:
        busy0 = _busy_cpu_seconds()
        own0, t0 = time.process_time(), time.perf_counter()
        time.sleep(sample_s)
        busy1 = _busy_cpu_seconds()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = max(time.perf_counter() - t0, 1e-3)
    return (busy1 - busy0) / elapsed, (time.process_time() - own0) / elapsed


def auto_threads() -> int:
    """:func:`choose_threads` for this process, from what the operating system reports now.

    Without ``/proc/stat`` the 1-minute load average stands in; without either (platforms that
    have none), no other process is assumed to be busy.
    """
    cores = usable_cores()
    now = busy_now()
    if now is not None:
        return choose_threads(cores, *now)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores
    return choose_threads(cores, load, own_load())


@contextmanager
def using_threads(n: int | None = None) -> Iterator[int]:
    """Run a block with ``n`` torch threads (``None``: :func:`auto_threads`), then restore the
    previous count, also when the block raises.

    ``torch.set_num_threads`` is process-wide: blocks running at the same time in several Python
    threads see each other's setting.

    Yields:
        the number of threads in effect inside the block.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"threads must be a positive integer or None (automatic), got {n!r}")
    chosen = auto_threads() if n is None else n
    previous = torch.get_num_threads()
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(previous)
