"""The lock of a run directory on an object store: a lease object (see :mod:`flows.storage`).

The lease ``<url>/.lock`` is created with an exclusive conditional write (S3
``If-None-Match: *``) and renewed by a heartbeat thread with ``If-Match`` on its own ETag,
so a holder that lost its lease never overwrites its successor's. A lease not renewed
within its TTL (its holder died) is deleted (``If-Match``: only the expired version read)
and the create retried. Stores with no exclusive create that fsspec exposes are refused
with a :class:`StorageError` saying so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from flows.rundir import LOCK_FILE, RunDirectoryBusy

if TYPE_CHECKING:
    from flows.storage import RunStore

log = logging.getLogger(__name__)
LEASE_TTL_S = 120.0  # a lease not renewed for this long belongs to a dead holder


class StorageError(RuntimeError):
    """An object of a run directory on a store is missing, corrupted, or the store cannot do what is needed."""


def holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


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
                "holder": f"{holder_text()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.since))}",
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


def check_lease_kept(url: str) -> None:
    """Raise if this process holds ``url``'s lease but lost it (a worker that holds none is not asked)."""
    with _leases_guard:
        entry = _leases.get(url)
    if entry is not None and entry[0].lost is not None:
        raise StorageError(
            f"not publishing into {url}: this run lost its lease {url}/{LOCK_FILE} ({entry[0].lost}), so another run may be "
            f"writing there; rerun when no other run uses {url}"
        )


@contextmanager
def lease(store: RunStore, ttl_s: float) -> Iterator[None]:
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
