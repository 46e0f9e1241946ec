"""Run directories on object stores (SPEC §9, issue 19): a local mirror, publication manifests, a lease.

Stages read and write a local directory, always. A run directory given as a URL with a
scheme (``s3://bucket/runs/x``, ``gs://…``, ``memory://…``) is worked on in a local
*mirror* (``$SAE_ENSEMBLES_CACHE/mirrors/<sha256(url)[:16]>``); :class:`RunStore` moves
files between the mirror and the store. A plain path or a ``file://`` URL is the directory
itself, and then every method here is a no-op or today's behaviour (``flows.rundir``).

Publication. Object stores cannot rename, so "temp file + rename" becomes "objects first,
manifest last": :meth:`RunStore.push` uploads every file of a path (a file or a directory
prefix such as ``models/bagging/run=0``) to its natural key ``<url>/<rel>``, then writes the
path's *publication manifest* ``<url>/.published/<rel with "/" as %2F>.json`` listing each
file's size and sha256. The manifest is the commit point: :meth:`RunStore.pull` downloads
only what a manifest lists, and verifies size and sha256 of every object against it, so
objects of a push killed before its manifest are never seen, and an object that does not
match its manifest (corrupted, or overwritten by a republish that was killed before its own
commit) is refused with a :class:`StorageError` naming it. One manifest object per published
path: workers publishing disjoint paths (two training units) never write the same object.
A file listed by several manifests (``models`` published whole, later
``models/bagging/run=0`` alone) belongs to the deepest one: publishing a path shadows what
its ancestors' manifests say under it and replaces its descendants' manifests.

The lock. A run directory on an object store is locked by a *lease* object ``<url>/.lock``
created with an exclusive conditional write (S3 ``If-None-Match: *``) and renewed by a
heartbeat thread with ``If-Match`` on its own ETag, so a holder that lost its lease never
overwrites its successor's. A lease not renewed within its TTL (its holder died) is
deleted (``If-Match``: only the expired version read) and the create retried. Stores with
no exclusive create that fsspec exposes are refused with a StorageError saying so.

Credentials and endpoints come from the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` — botocore reads them, so
worker processes inherit them) or from ``storage_options`` (passed to
``fsspec.filesystem(protocol, **storage_options)``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import unquote

from flows.rundir import LOCK_FILE, RunDirectoryBusy, run_directory_lock

PUBLISHED_DIR = ".published"  # under the run directory URL: one manifest object per published path
LEASE_TTL_S = 120.0  # a lease not renewed for this long belongs to a dead holder
MANIFEST_FORMAT = 1
_TEMPORARY = re.compile(r"^(\..+\.(tmp|old)[A-Za-z0-9_]*|checkpoint\.tmp\d+)$")  # as flows.rundir sweeps them
_NOT_PUBLISHED_AT_ROOT = {LOCK_FILE, PUBLISHED_DIR, ".cache"}  # the mirror's flock, manifests, local caches
_BLOCK = 1 << 22
TRANSFER_THREADS = 8  # concurrent downloads, uploads and hashes per pull or push

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """An object of a run directory on a store is missing, corrupted, or the store cannot do what is needed."""


def is_remote(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` is a URL with a scheme other than ``file://`` (s3://, gs://, memory://, …)."""
    text = os.fspath(run_dir)
    if "://" not in text:
        return False
    return text.split("://", 1)[0].lower() not in ("file", "local")


def _normalise(run_dir: str | os.PathLike) -> str:
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


def _clean_rel(rel: str) -> str:
    """A run-dir-relative posix path without ./ or trailing /; '.' is the whole run directory."""
    text = str(rel).replace("\\", "/").strip("/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or str(rel).startswith("/"):
        raise ValueError(f"{rel!r} is not a path inside the run directory (absolute or with '..')")
    return "/".join(parts) or "."


def _under(path: str, prefix: str) -> bool:
    """Whether run-dir-relative ``path`` is ``prefix`` or inside it ('.' contains everything)."""
    return prefix == "." or path == prefix or path.startswith(prefix + "/")


def _manifest_name(rel: str) -> str:
    return rel.replace("%", "%25").replace("/", "%2F") + ".json"


def _manifest_rel(name: str) -> str | None:
    return unquote(name[: -len(".json")]) if name.endswith(".json") else None


def _holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


# ---------------------------------------------------------------------------- hashing
class _MirrorDigests:
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
            while block := f.read(_BLOCK):
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


def _in_parallel(work: Callable[[Any], Any], items: list) -> list:
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


# ---------------------------------------------------------------------------- the store
@dataclass
class RunStore:
    """A run directory: a local path, or a URL on an object store with a local mirror (see the module docstring)."""

    url: str  # what the user gave, normalised (file:// and plain paths: the absolute path)
    local: Path  # where stages read and write: the directory itself, or the mirror of a URL
    remote: bool
    storage_options: dict[str, Any] = field(default_factory=dict)
    _fs: Any = field(default=None, repr=False)
    _root: str = field(default="", repr=False)  # the URL as the filesystem's path (no protocol)

    @classmethod
    def open(cls, run_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, storage_options: dict | None = None) -> "RunStore":
        """The store for ``run_dir``; a URL's mirror is ``<cache_dir>/<sha256(url)[:16]>``.

        cache_dir defaults to ``$SAE_ENSEMBLES_CACHE/mirrors`` (``~/.cache/sae-ensembles/mirrors``).
        storage_options go to ``fsspec.filesystem(protocol, **storage_options)``.
        """
        url = _normalise(run_dir)
        options = dict(storage_options or {})
        if not is_remote(url):
            return cls(url=url, local=Path(url), remote=False, storage_options=options)
        import fsspec

        protocol = url.split("://", 1)[0]
        try:
            fs = fsspec.filesystem(protocol, **options)
        except (ImportError, ValueError) as e:
            raise StorageError(
                f"cannot open run directory {url}: fsspec has no working filesystem for {protocol}:// ({e}); "
                f"install its package (s3fs for s3://, gcsfs for gs://) or use a local path"
            ) from e
        if cache_dir is None:
            cache_dir = Path(os.environ.get("SAE_ENSEMBLES_CACHE", Path.home() / ".cache" / "sae-ensembles")) / "mirrors"
        local = Path(cache_dir).expanduser().resolve() / hashlib.sha256(url.encode()).hexdigest()[:16]
        local.mkdir(parents=True, exist_ok=True)
        return cls(url=url, local=local, remote=True, storage_options=options, _fs=fs, _root=fs._strip_protocol(url).rstrip("/"))

    # ------------------------------------------------------------------ object paths
    def _key(self, rel: str) -> str:
        return f"{self._root}/{rel}"

    def _object_url(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def _published_index(self) -> set[str]:
        """The paths that have a publication manifest now (listed afresh, no cached listing)."""
        where = self._key(PUBLISHED_DIR)
        self._fs.invalidate_cache(where)
        try:
            names = self._fs.ls(where, detail=False)
        except FileNotFoundError:
            return set()
        found = set()
        for name in names:
            rel = _manifest_rel(str(name).rstrip("/").rsplit("/", 1)[-1])
            if rel is not None:
                found.add(rel)
        return found

    def _read_manifests(self, rels: list[str]) -> dict[str, dict[str, PublishedFile]]:
        """The files each of these paths' manifests lists (read concurrently; a vanished manifest lists nothing)."""
        keys = {self._key(f"{PUBLISHED_DIR}/{_manifest_name(rel)}"): rel for rel in rels}
        found = self._fs.cat(list(keys), on_error="omit") if keys else {}
        manifests: dict[str, dict[str, PublishedFile]] = {rel: {} for rel in rels}
        for key, data in found.items():
            rel = keys.get(key) or keys.get(self._fs._strip_protocol(key))
            if rel is None:
                continue
            try:
                listed = json.loads(data)["files"]
                manifests[rel] = {f: PublishedFile(f, int(e["size"]), str(e["sha256"])) for f, e in listed.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise StorageError(
                    f"publication manifest {self.url}/{PUBLISHED_DIR}/{_manifest_name(rel)} (of {rel}) is unreadable ({e}); "
                    f"republish {rel} (rerun the stage that writes it) or delete that manifest"
                ) from e
        return manifests

    def _governed(self, rel: str, index: set[str] | None = None) -> dict[str, PublishedFile]:
        """The published files at or under ``rel``, each as its owning (deepest) manifest lists it."""
        index = self._published_index() if index is None else index
        relevant = sorted(p for p in index if _under(rel, p) or _under(p, rel))
        files: dict[str, PublishedFile] = {}
        for p, entries in self._read_manifests(relevant).items():
            for f, entry in entries.items():
                if not _under(f, rel):
                    continue
                owner = max((q for q in relevant if _under(f, q)), key=lambda q: (q != ".", q.count("/"), len(q)))
                if owner == p:
                    files[f] = entry
        return files

    # --------------------------------------------------------------------- pull / push
    def pull(self, paths: Iterable[str]) -> list[str]:
        """Bring each published path (a file or a directory prefix) into the mirror; returns the files downloaded.

        Only what a publication manifest lists is downloaded, and only where the mirror's copy
        is missing or differs (sha256): a mirror file that differs from the publication is
        replaced. Every download is checked against the manifest (size, sha256) before it is
        renamed into place. A path never published yields nothing (the caller decides whether
        that is an error). Files in the mirror that no publication lists are left alone. A
        local store: nothing to do, [].
        """
        if not self.remote:
            return []
        index = self._published_index()
        wanted: dict[str, PublishedFile] = {}
        for rel in paths:
            wanted.update(self._governed(_clean_rel(rel), index))
        digests = _MirrorDigests(self.local)

        def fetch(entry: PublishedFile) -> bool:
            target = self.local / entry.rel
            if target.is_file() and target.stat().st_size == entry.size and digests.sha256(entry.rel) == entry.sha256:
                return False
            self._download(entry, target)
            digests.record(entry.rel, entry.sha256)
            return True

        try:
            entries = [wanted[f] for f in sorted(wanted)]
            fetched = _in_parallel(fetch, entries)
        finally:
            digests.save()
        return [e.rel for e, got in zip(entries, fetched) if got]

    def _download(self, entry: PublishedFile, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}_{threading.get_ident()}")
        h = hashlib.sha256()
        size = 0
        try:
            try:
                with self._fs.open(self._key(entry.rel), "rb") as src, open(tmp, "wb") as dst:
                    while block := src.read(_BLOCK):
                        h.update(block)
                        size += len(block)
                        dst.write(block)
            except FileNotFoundError:
                raise StorageError(
                    f"{self._object_url(entry.rel)} is published (its manifest lists {entry.size} bytes, sha256 {entry.sha256[:12]}…) "
                    f"but the object is missing; republish it (rerun the stage that writes it)"
                ) from None
            if size != entry.size or h.hexdigest() != entry.sha256:
                raise StorageError(
                    f"{self._object_url(entry.rel)} does not match its publication manifest: {size} bytes, sha256 {h.hexdigest()[:12]}… "
                    f"where the manifest says {entry.size} bytes, sha256 {entry.sha256[:12]}… (corrupted, or overwritten by a "
                    f"publication that did not finish); republish it (rerun the stage that writes it, with --force)"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def _local_files(self, rel: str) -> list[str]:
        """The mirror's files at or under ``rel`` that are publishable (no temporaries, lock, manifests or caches)."""
        base = self.local if rel == "." else self.local / rel
        if base.is_file():
            candidates = [base]
        elif base.is_dir():
            candidates = sorted(p for p in base.rglob("*") if p.is_file())
        else:
            return []
        found = []
        for p in candidates:
            parts = p.relative_to(self.local).parts
            if parts[0] in _NOT_PUBLISHED_AT_ROOT or any(_TEMPORARY.match(part) for part in parts):
                continue
            found.append("/".join(parts))
        return found

    def push(self, paths: Iterable[str]) -> list[str]:
        """Publish each path (a file or a directory prefix) as the mirror holds it now; returns the files uploaded.

        Files are uploaded first (skipped where the published object already has the same
        size and sha256), then the path's publication manifest is written — the commit point —,
        then the objects that the path's earlier publication listed but this one does not are
        deleted, and its descendants' manifests (which this one replaces). A path with no files
        in the mirror is published empty (what was published there disappears). Nothing is
        renamed on the store. Refused when this process held the run directory's lease and lost
        it. A local store: nothing to do, [].
        """
        if not self.remote:
            return []
        _check_lease_kept(self.url)
        digests = _MirrorDigests(self.local)
        uploaded: list[str] = []
        try:
            for rel in (_clean_rel(p) for p in paths):
                uploaded += self._push_one(rel, digests)
        finally:
            digests.save()
        return uploaded

    def _push_one(self, rel: str, digests: _MirrorDigests) -> list[str]:
        index = self._published_index()
        before = self._governed(rel, index)
        names = self._local_files(rel)
        files = dict(zip(names, _in_parallel(lambda f: PublishedFile(f, (self.local / f).stat().st_size, digests.sha256(f)), names)))
        self._fs.invalidate_cache(self._root)

        def upload(entry: PublishedFile) -> bool:
            if before.get(entry.rel) == entry and self._object_size(entry.rel) == entry.size:
                return False
            self._fs.put_file(str(self.local / entry.rel), self._key(entry.rel))
            return True

        entries = [files[f] for f in sorted(files)]
        uploaded = [e.rel for e, done in zip(entries, _in_parallel(upload, entries)) if done]
        manifest = {
            "format": MANIFEST_FORMAT,
            "path": rel,
            "files": {e.rel: {"size": e.size, "sha256": e.sha256} for e in entries},
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "publisher": _holder_text(),
        }
        _check_lease_kept(self.url)
        self._fs.pipe_file(self._key(f"{PUBLISHED_DIR}/{_manifest_name(rel)}"), (json.dumps(manifest, indent=1) + "\n").encode())
        replaced = [f"{PUBLISHED_DIR}/{_manifest_name(p)}" for p in sorted(index) if p != rel and _under(p, rel)]
        _in_parallel(self._remove, replaced + sorted(set(before) - set(files)))
        return uploaded

    def _object_size(self, rel: str) -> int | None:
        try:
            return int(self._fs.info(self._key(rel))["size"])
        except FileNotFoundError:
            return None

    def _remove(self, rel: str) -> None:
        try:
            self._fs.rm_file(self._key(rel))
        except FileNotFoundError:
            pass

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` (a file or a directory prefix) is published (remote) or on disk (local)."""
        rel = _clean_rel(rel)
        if not self.remote:
            return (self.local / rel).exists()
        return bool(self._governed(rel))

    # --------------------------------------------------------------------------- lock
    @contextmanager
    def lock(self, *, ttl_s: float = LEASE_TTL_S) -> Iterator[list[str]]:
        """Hold the run directory's lock for the block; raises RunDirectoryBusy at once if another run holds it.

        A local directory: :func:`flows.rundir.run_directory_lock`. A URL: the lease
        ``<url>/.lock`` (renewed every ttl_s/4 while held), then the mirror's own flock, which
        sweeps the mirror's stale temporaries. Re-entrant within a process. Yields the swept
        temporaries (none when re-entered).
        """
        if not self.remote:
            with run_directory_lock(self.local) as swept:
                yield swept
            return
        with _lease(self, ttl_s):
            with run_directory_lock(self.local) as swept:
                yield swept

    def result_storage(self) -> Any:
        """What a Prefect task's ``result_storage=`` should be: under ``.prefect/results`` of the run directory.

        A local path for a local store; for a URL a ``prefect.filesystems.RemoteFileSystem`` every
        worker reaches (a task retried on another worker finds its results).
        """
        from tasks.stage_state import STATE_DIR  # here: importing tasks costs ~2 s, which a worker that only moves files need not pay

        if not self.remote:
            return self.local / STATE_DIR / "results"
        from prefect.filesystems import RemoteFileSystem

        return RemoteFileSystem(basepath=f"{self.url}/{STATE_DIR}/results", settings=dict(self.storage_options))


# ------------------------------------------------------------------------------ leases
class _LeaseLost(Exception):
    """The lease object is no longer the version this holder wrote."""


class _ConditionalStore:
    """Exclusive create, compare-and-swap and compare-and-delete of one small object."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def create(self, path: str, data: bytes) -> str:  # FileExistsError if it exists
        raise NotImplementedError

    def read(self, path: str) -> tuple[bytes, str, float | None]:  # data, version token, store's modification time
        raise NotImplementedError

    def replace(self, path: str, data: bytes, token: str) -> str:  # _LeaseLost if not at version token
        raise NotImplementedError

    def delete(self, path: str, token: str) -> bool:  # False if not at version token (or gone)
        raise NotImplementedError


class _S3Conditional(_ConditionalStore):
    """S3's conditional writes: If-None-Match: * on create, If-Match: <ETag> on overwrite and delete."""

    def create(self, path: str, data: bytes) -> str:
        out = self.fs.pipe_file(path, data, mode="create")
        return out["ETag"]

    def read(self, path: str) -> tuple[bytes, str, float | None]:
        self.fs.invalidate_cache(path)
        info = self.fs.info(path)  # the version first: data read after it is this version or a later one
        data = self.fs.cat_file(path)
        modified = info.get("LastModified")
        return data, info["ETag"], modified.timestamp() if modified is not None else None

    def replace(self, path: str, data: bytes, token: str) -> str:
        try:
            out = self.fs.pipe_file(path, data, IfMatch=token)
        except FileNotFoundError:
            raise _LeaseLost("the lease object was deleted") from None
        except OSError as e:
            if e.errno == errno.EINVAL and "condition" in str(e).lower():
                raise _LeaseLost(str(e)) from None
            raise
        return out["ETag"]

    def delete(self, path: str, token: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=token)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.EINVAL and "condition" in str(e).lower():
                return False
            raise
        finally:
            self.fs.invalidate_cache(path)
        return True


_memory_guard = threading.Lock()


class _MemoryConditional(_ConditionalStore):
    """memory:// lives in one process: a lock makes check-and-write atomic; the version is the content's hash."""

    def create(self, path: str, data: bytes) -> str:
        with _memory_guard:
            if self.fs.exists(path):
                raise FileExistsError(path)
            self.fs.pipe_file(path, data)
        return hashlib.sha256(data).hexdigest()

    def read(self, path: str) -> tuple[bytes, str, float | None]:
        with _memory_guard:
            data = self.fs.cat_file(path)
        return data, hashlib.sha256(data).hexdigest(), None

    def replace(self, path: str, data: bytes, token: str) -> str:
        with _memory_guard:
            try:
                current = self.fs.cat_file(path)
            except FileNotFoundError:
                raise _LeaseLost("the lease object was deleted") from None
            if hashlib.sha256(current).hexdigest() != token:
                raise _LeaseLost("the lease object was replaced")
            self.fs.pipe_file(path, data)
        return hashlib.sha256(data).hexdigest()

    def delete(self, path: str, token: str) -> bool:
        with _memory_guard:
            try:
                current = self.fs.cat_file(path)
            except FileNotFoundError:
                return False
            if hashlib.sha256(current).hexdigest() != token:
                return False
            self.fs.rm_file(path)
        return True


def _conditional_store(store: RunStore) -> _ConditionalStore:
    protocols = store._fs.protocol if isinstance(store._fs.protocol, (tuple, list)) else (store._fs.protocol,)
    if {"s3", "s3a"} & set(protocols):
        return _S3Conditional(store._fs)
    if "memory" in protocols:
        return _MemoryConditional(store._fs)
    raise StorageError(
        f"cannot lock run directory {store.url}: {store.url.split('://')[0]}:// has no exclusive conditional create that "
        f"this code knows to be atomic (fsspec's generic create checks, then writes), so two runs could both take the lock. "
        f"Supported: s3:// (S3 and S3-compatible stores with If-None-Match), memory://, and local or shared-filesystem paths"
    )


class _Lease:
    """This process's lease on one run directory URL: created, renewed by a heartbeat thread, released."""

    def __init__(self, store: RunStore, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, got {ttl_s}")
        self.store = store
        self.ttl_s = float(ttl_s)
        self.path = store._key(LOCK_FILE)
        self.cond = _conditional_store(store)
        self.nonce = uuid.uuid4().hex
        self.since = time.time()
        self.token = ""
        self.lost: str | None = None  # why, once the heartbeat found the lease taken
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "holder": f"{_holder_text()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.since))}",
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "nonce": self.nonce,
                "acquired_at": self.since,
                "renewed_at": now,
                "ttl_s": self.ttl_s,
                "expires_at": now + self.ttl_s,
            }
        ).encode()

    def acquire(self) -> None:
        for _ in range(20):  # each round either takes the lease, refuses, or saw it change under it
            try:
                self.token = self.cond.create(self.path, self._payload())
                break
            except FileExistsError:
                pass
            try:
                data, token, modified = self.cond.read(self.path)
            except FileNotFoundError:
                continue  # released between our create and read: try again
            try:
                lease = json.loads(data)
                ttl = float(lease.get("ttl_s", LEASE_TTL_S))
                # the later of the store's clock and the holder's: a clock skew never hands over a live lease early
                expires = max(float(lease["expires_at"]), modified + ttl if modified is not None else 0.0)
                holder = str(lease.get("holder", "unknown"))
            except (ValueError, KeyError, TypeError):
                ttl, holder = LEASE_TTL_S, f"unreadable lease {data[:80]!r}"
                expires = (modified or 0.0) + ttl
            left = expires - time.time()
            if left > 0:
                raise RunDirectoryBusy(
                    f"run directory {self.store.url} is in use by another run (holder: {holder}; its lease "
                    f"{self.store.url}/{LOCK_FILE} expires in {left:.0f} s unless renewed); wait for it to finish or choose "
                    f"another --out. A holder that dies leaves its lease, which expires {ttl:.0f} s after its last renewal."
                )
            log.warning("taking over the expired lease on %s (holder: %s, expired %.0f s ago)", self.store.url, holder, -left)
            self.cond.delete(self.path, token)  # only that expired version; a renewed one stays
        else:
            raise StorageError(f"could not take the lease {self.store.url}/{LOCK_FILE}: it kept changing under 20 attempts")
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.store.url}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.token = self.cond.replace(self.path, self._payload(), self.token)
                renewed = time.monotonic()
            except _LeaseLost as e:
                self._lose(f"it was taken or deleted ({e})")
                return
            except Exception as e:  # a network hiccup: the next beat retries while the lease has time left
                if time.monotonic() - renewed >= self.ttl_s:
                    self._lose(f"it could not be renewed for {self.ttl_s:.0f} s, its TTL (last error: {e})")
                    return
                log.warning("could not renew the lease on %s: %s", self.store.url, e)

    def _lose(self, why: str) -> None:
        self.lost = why
        log.error("lost the lease on %s: %s; another run may write into it, and this run publishes nothing more", self.store.url, why)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None:
            self.cond.delete(self.path, self.token)


_leases: dict[str, list] = {}  # url -> [_Lease, depth] held by this process
_leases_guard = threading.Lock()


def _check_lease_kept(url: str) -> None:
    """Raise if this process holds ``url``'s lease but lost it (a worker that holds none is not asked)."""
    with _leases_guard:
        entry = _leases.get(url)
    if entry is not None and entry[0].lost is not None:
        raise StorageError(
            f"not publishing into {url}: this run lost its lease {url}/{LOCK_FILE} ({entry[0].lost}), so another run may be "
            f"writing there; rerun when no other run uses {url}"
        )


@contextmanager
def _lease(store: RunStore, ttl_s: float) -> Iterator[None]:
    with _leases_guard:
        entry = _leases.get(store.url)
        if entry is not None:
            entry[1] += 1
        else:
            lease = _Lease(store, ttl_s)
            lease.acquire()
            _leases[store.url] = [lease, 1]
    try:
        yield
    finally:
        with _leases_guard:
            entry = _leases[store.url]
            entry[1] -= 1
            if entry[1] == 0:
                del _leases[store.url]
                entry[0].release()
