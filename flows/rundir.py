"""One run at a time per run directory, and no half-written files left from a killed one.

Every flow that works in a run directory holds :func:`run_directory_lock` while it does:
an exclusive ``flock`` on ``<run_dir>/.lock``. A second run into the same directory (another
process, another machine on the same filesystem with working ``flock``) fails at once with
:class:`RunDirectoryBusy`, naming the directory and the pid that holds it. The kernel drops
the lock when its holder exits, however it exits (``kill -9`` included), so a crash never
leaves a stale lock behind; the pid written into the file is for the error message only.

The lock is re-entrant within a process: the ``pipeline`` flow holds it across its stage
subflows, which take it again.

Once the lock is held nothing else writes in the directory, so the temporary files and
directories that the atomic writers leave when their process is killed mid-write
(``.<name>.tmp<pid>``, ``.<name>.old<pid>``, ``checkpoint.tmp<pid>``) are stale and
:func:`sweep_stale_temporaries` removes them.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"

# What the atomic writers name their temporaries (see write_parquet_atomic, atomic_directory,
# the stamps and hashes, write_manifest, the trainer's checkpoints).
_TEMPORARY = re.compile(r"^(\..+\.(tmp|old)[A-Za-z0-9_]*|checkpoint\.tmp\d+)$")
# Caches that manage their own files (Hugging Face datasets' lock and temp files).
_NOT_SWEPT = {".cache"}


class RunDirectoryBusy(RuntimeError):
    """Another run holds the run directory's lock."""


_held: dict[Path, list[int]] = {}  # resolved run dir -> [fd, depth] held by this process
_guard = threading.Lock()


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown (it has not written its pid yet)"


@contextmanager
def run_directory_lock(run_dir: str | Path) -> Iterator[list[str]]:
    """Hold ``run_dir``'s lock for the block (created if missing); raises RunDirectoryBusy at once if taken.

    Yields the stale temporaries swept on taking the lock (none when re-entered).
    """
    run_dir = Path(run_dir).resolve()
    swept: list[str] = []
    with _guard:
        entry = _held.get(run_dir)
        if entry is not None:
            entry[1] += 1
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunDirectoryBusy(
                    f"run directory {run_dir} is in use by another run (holder: {holder}); wait for it to "
                    "finish or choose another --out. The lock is released when its holder exits, even if it is killed."
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
            _held[run_dir] = [fd, 1]
            try:
                swept = sweep_stale_temporaries(run_dir)
            except BaseException:
                _release(run_dir)
                raise
    try:
        yield swept
    finally:
        with _guard:
            _release(run_dir)


def _release(run_dir: Path) -> None:
    entry = _held[run_dir]
    entry[1] -= 1
    if entry[1] == 0:
        del _held[run_dir]
        fd = entry[0]
        try:
            os.ftruncate(fd, 0)  # still locked: nobody reads a half-cleared pid
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def holds_lock(run_dir: str | Path) -> bool:
    """Whether this process holds ``run_dir``'s lock."""
    return Path(run_dir).resolve() in _held


def sweep_stale_temporaries(run_dir: str | Path) -> list[str]:
    """Delete the atomic writers' leftovers under ``run_dir``; returns their relative paths.

    Only call with the directory's lock held (a live writer's temporary looks the same).
    """
    run_dir = Path(run_dir)
    if not holds_lock(run_dir):
        raise RuntimeError(f"sweep_stale_temporaries({run_dir}) needs the run directory's lock")
    removed = []
    for root, dirs, files in os.walk(run_dir):
        here = Path(root)
        if here == run_dir:
            dirs[:] = [d for d in dirs if d not in _NOT_SWEPT]
        for name in list(dirs):
            if _TEMPORARY.match(name):
                shutil.rmtree(here / name, ignore_errors=True)
                dirs.remove(name)
                removed.append((here / name).relative_to(run_dir).as_posix())
        for name in files:
            if _TEMPORARY.match(name):
                (here / name).unlink(missing_ok=True)
                removed.append((here / name).relative_to(run_dir).as_posix())
    return sorted(removed)
