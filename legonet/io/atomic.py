"""Atomic file output: write to a temporary file beside the target, then rename over it.

An interrupted or failed write leaves the target as it was (absent, or the previous version).

* The temporary file is ``.NAME.<pid>.<random>.partial`` in the target's folder (same filesystem,
  so the final ``os.replace`` is atomic). It is fsynced before the rename, and the folder after it.
* SIGTERM and SIGHUP are turned into an exception while the write is under way (main thread only),
  so the temporary file is removed on those too, as it is on any exception or Ctrl-C.
* Only SIGKILL (or a power cut) can leave a temporary file behind. The next write to the same
  target sweeps it: a ``.NAME.<pid>.*.partial`` whose ``pid`` is no longer a live process on this
  machine is deleted. Temporary files of a live writer are never touched.
* The result gets the permissions a plain ``open(path, "w")`` would give (``0o666`` less the
  umask), or the previous target's mode when replacing a file, not ``mkstemp``'s ``0o600``.

Failures to create, write or rename raise :class:`legonet.errors.OutputError` naming the target.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from legonet.errors import OutputError


class _Interrupted(BaseException):
    pass


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise _Interrupted(signum)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, handler)
    try:
        yield
    except _Interrupted as exc:
        raise SystemExit(128 + exc.args[0]) from None
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we can judge: leave the file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def stale_partials(target: str | os.PathLike) -> list[Path]:
    """Temporary files of ``target`` left by writers that no longer run (e.g. killed by SIGKILL)."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    pattern = re.compile(re.escape(f".{target.name}.") + r"(\d+)\.[^.]+\.partial")
    out = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = pattern.fullmatch(entry.name)
            if m and not _pid_alive(int(m.group(1))) and entry.is_file(follow_symlinks=False):
                out.append(Path(entry.path))
    return sorted(out)


def _umask() -> int:
    # Reading the umask through os.umask() would briefly change it for every thread.
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def check_writable(target: str | os.PathLike) -> Path:
    """Raise :class:`OutputError` unless ``target`` can be created; returns its folder.

    Commands call this before long work, so that a typo in the output path fails at once.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"cannot write {target}: folder {folder} does not exist")
    if target.is_dir():
        raise OutputError(f"cannot write {target}: it is a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: folder {folder} is not writable")
    return folder


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (also through ``./``, ``..``, symbolic or hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): then they can only be one path spelt twice
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting(target: str | os.PathLike, inputs, what: str = "input") -> None:
    """Raise :class:`OutputError` if ``target`` is one of ``inputs`` (a file the command reads).

    Commands call this before any work: writing the output over its own input would replace the
    user's file by something else (a compressed model over the checkpoint it came from).
    """
    target = Path(target)
    for src in inputs:
        if _same_file(target, Path(src)):
            same = "" if os.path.normpath(target) == os.path.normpath(src) else f" (the same file as {src})"
            raise OutputError(f"refusing to write {target}: it is the {what}{same}; choose another output path")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``target`` atomically.

    Raises:
        OutputError: the folder is missing or not writable, or writing/renaming failed.
    """
    target = Path(target)
    folder = check_writable(target)
    for old in stale_partials(target):
        with contextlib.suppress(OSError):
            old.unlink()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _signals_raise():
            yield tmp_path
            try:
                mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else 0o666 & ~_umask()
                os.chmod(tmp_path, mode)
                with open(tmp_path, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp_path, target)
            except OSError as exc:
                raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
            with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
                dfd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
    except OSError as exc:  # raised by the caller's own writing into the temporary file
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):  # gone already (renamed), or the caller put a folder there
            tmp_path.unlink()
