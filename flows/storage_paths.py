"""The pieces of :mod:`flows.storage` that know no store: which run-dir paths are published
and under what manifest name, the mirror's remembered digests, parallel transfers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote

from flows.rundir import LOCK_FILE

PUBLISHED_DIR = ".published"  # under the run directory URL: one manifest object per published path
MANIFEST_FORMAT = 1
TEMPORARY = re.compile(r"^(\..+\.(tmp|old)[A-Za-z0-9_]*|checkpoint\.tmp\d+)$")  # as flows.rundir sweeps them
NOT_PUBLISHED_AT_ROOT = {LOCK_FILE, PUBLISHED_DIR, ".cache"}  # the mirror's flock, manifests, local caches
BLOCK = 1 << 22
TRANSFER_THREADS = 8  # concurrent downloads, uploads and hashes per pull or push


def is_remote(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` is a URL with a scheme other than ``file://`` (s3://, gs://, memory://, …)."""
    text = os.fspath(run_dir)
    if "://" not in text:
        return False
    return text.split("://", 1)[0].lower() not in ("file", "local")


def normalise(run_dir: str | os.PathLike) -> str:
    text = os.fspath(run_dir)
    if is_remote(text):
        protocol, rest = text.split("://", 1)
        rest = rest.rstrip("/")
        if not rest:
            raise ValueError(f"run directory {text!r} names no bucket or path after {protocol}://")
        return f"{protocol.lower()}://{rest}"
    if "://" in text:
        text = text.split("://", 1)[1]
    return str(Path(text).expanduser().resolve())


def clean_rel(rel: str) -> str:
    """A run-dir-relative posix path without ./ or trailing /; '.' is the whole run directory."""
    text = str(rel).replace("\\", "/").strip("/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or str(rel).startswith("/"):
        raise ValueError(f"{rel!r} is not a path inside the run directory (absolute or with '..')")
    return "/".join(parts) or "."


def under(path: str, prefix: str) -> bool:
    """Whether run-dir-relative ``path`` is ``prefix`` or inside it ('.' contains everything)."""
    return prefix == "." or path == prefix or path.startswith(prefix + "/")


def manifest_name(rel: str) -> str:
    return rel.replace("%", "%25").replace("/", "%2F") + ".json"


def manifest_rel(name: str) -> str | None:
    return unquote(name[: -len(".json")]) if name.endswith(".json") else None


# ---------------------------------------------------------------------------- hashing
class MirrorDigests:
    """sha256 of the mirror's files, remembered by (size, mtime) in ``<mirror>/.published/digests.json``.

    So a pull in a fresh worker process does not re-hash a mirror of terabytes to find it current.
    Several processes may save it at once: the last one wins, and a forgotten entry only costs a re-hash.
    """

    def __init__(self, mirror: Path) -> None:
        self.mirror = mirror
        self.path = mirror / PUBLISHED_DIR / "digests.json"
        try:
            self.known: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.dirty = False
        self.guard = threading.Lock()

    def sha256(self, rel: str) -> str:
        st = (self.mirror / rel).stat()
        with self.guard:
            entry = self.known.get(rel)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        h = hashlib.sha256()
        with open(self.mirror / rel, "rb") as f:
            while block := f.read(BLOCK):
                h.update(block)
        self.record(rel, h.hexdigest(), st)
        return h.hexdigest()

    def record(self, rel: str, sha256: str, st: os.stat_result | None = None) -> None:
        st = st or (self.mirror / rel).stat()
        with self.guard:
            self.known[rel] = [st.st_size, st.st_mtime_ns, sha256]
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}_{threading.get_ident()}")
        tmp.write_text(json.dumps(self.known, sort_keys=True))
        os.replace(tmp, self.path)
        self.dirty = False


def in_parallel(work: Callable[[Any], Any], items: list) -> list:
    """work(item) for each item on up to TRANSFER_THREADS threads, results in order; the first error is raised."""
    if len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(TRANSFER_THREADS, len(items))) as pool:
        return list(pool.map(work, items))


# ------------------------------------------------------------------------ manifests
@dataclass(frozen=True)
class PublishedFile:
    """One file as its publication manifest describes it."""

    rel: str
    size: int
    sha256: str
