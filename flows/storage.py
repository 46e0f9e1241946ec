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

The lock (:mod:`flows.storage_lease`). A run directory on an object store is locked by a *lease* object ``<url>/.lock``
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

import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from flows.rundir import run_directory_lock
from flows.storage_lease import LEASE_TTL_S, StorageError, check_lease_kept, holder_text, lease
from flows.storage_paths import (
    BLOCK,
    MANIFEST_FORMAT,
    NOT_PUBLISHED_AT_ROOT,
    PUBLISHED_DIR,
    TEMPORARY,
    MirrorDigests,
    PublishedFile,
    clean_rel,
    in_parallel,
    is_remote,
    manifest_name,
    manifest_rel,
    normalise,
    under,
)

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
        url = normalise(run_dir)
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
            rel = manifest_rel(str(name).rstrip("/").rsplit("/", 1)[-1])
            if rel is not None:
                found.add(rel)
        return found

    def _read_manifests(self, rels: list[str]) -> dict[str, dict[str, PublishedFile]]:
        """The files each of these paths' manifests lists (read concurrently; a vanished manifest lists nothing)."""
        keys = {self._key(f"{PUBLISHED_DIR}/{manifest_name(rel)}"): rel for rel in rels}
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
                    f"publication manifest {self.url}/{PUBLISHED_DIR}/{manifest_name(rel)} (of {rel}) is unreadable ({e}); "
                    f"republish {rel} (rerun the stage that writes it) or delete that manifest"
                ) from e
        return manifests

    def _governed(self, rel: str, index: set[str] | None = None) -> dict[str, PublishedFile]:
        """The published files at or under ``rel``, each as its owning (deepest) manifest lists it."""
        index = self._published_index() if index is None else index
        relevant = sorted(p for p in index if under(rel, p) or under(p, rel))
        files: dict[str, PublishedFile] = {}
        for p, entries in self._read_manifests(relevant).items():
            for f, entry in entries.items():
                if not under(f, rel):
                    continue
                owner = max((q for q in relevant if under(f, q)), key=lambda q: (q != ".", q.count("/"), len(q)))
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
            wanted.update(self._governed(clean_rel(rel), index))
        digests = MirrorDigests(self.local)

        def fetch(entry: PublishedFile) -> bool:
            target = self.local / entry.rel
            if target.is_file() and target.stat().st_size == entry.size and digests.sha256(entry.rel) == entry.sha256:
                return False
            self._download(entry, target)
            digests.record(entry.rel, entry.sha256)
            return True

        try:
            entries = [wanted[f] for f in sorted(wanted)]
            fetched = in_parallel(fetch, entries)
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
                    while block := src.read(BLOCK):
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
            if parts[0] in NOT_PUBLISHED_AT_ROOT or any(TEMPORARY.match(part) for part in parts):
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
        check_lease_kept(self.url)
        digests = MirrorDigests(self.local)
        uploaded: list[str] = []
        try:
            for rel in (clean_rel(p) for p in paths):
                uploaded += self._push_one(rel, digests)
        finally:
            digests.save()
        return uploaded

    def _push_one(self, rel: str, digests: MirrorDigests) -> list[str]:
        index = self._published_index()
        before = self._governed(rel, index)
        names = self._local_files(rel)
        files = dict(zip(names, in_parallel(lambda f: PublishedFile(f, (self.local / f).stat().st_size, digests.sha256(f)), names)))
        self._fs.invalidate_cache(self._root)

        def upload(entry: PublishedFile) -> bool:
            if before.get(entry.rel) == entry and self._object_size(entry.rel) == entry.size:
                return False
            self._fs.put_file(str(self.local / entry.rel), self._key(entry.rel))
            return True

        entries = [files[f] for f in sorted(files)]
        uploaded = [e.rel for e, done in zip(entries, in_parallel(upload, entries)) if done]
        manifest = {
            "format": MANIFEST_FORMAT,
            "path": rel,
            "files": {e.rel: {"size": e.size, "sha256": e.sha256} for e in entries},
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "publisher": holder_text(),
        }
        check_lease_kept(self.url)
        self._fs.pipe_file(self._key(f"{PUBLISHED_DIR}/{manifest_name(rel)}"), (json.dumps(manifest, indent=1) + "\n").encode())
        replaced = [f"{PUBLISHED_DIR}/{manifest_name(p)}" for p in sorted(index) if p != rel and under(p, rel)]
        in_parallel(self._remove, replaced + sorted(set(before) - set(files)))
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
        rel = clean_rel(rel)
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
        with lease(self, ttl_s):
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
