"""Run directories on object stores (flows/storage.py): publication, verified reads, the lease lock.

S3 is moto in server mode on 127.0.0.1 (tests/s3_server.py): the real protocol over HTTP, so
the conditional writes (If-None-Match, If-Match) are the store's, not ours.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import boto3
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from flows.rundir import RunDirectoryBusy, holds_lock
from flows.storage import PUBLISHED_DIR, RunStore, StorageError, is_remote
from tests.s3_server import REGION, moto_server, s3_bucket  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _client():
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=REGION)


def _keys(bucket_url: str) -> list[str]:
    resp = _client().list_objects_v2(Bucket=bucket_url.removeprefix("s3://"))
    return sorted(o["Key"] for o in resp.get("Contents", []))


def _write_artifacts(run: Path) -> dict[str, bytes]:
    """A Parquet shard, a safetensors-like binary, JSON, a documents table and an atomic writer's leftover."""
    rng = np.random.default_rng(0)
    shard = run / "activations" / "train" / "shard-00000.parquet"
    shard.parent.mkdir(parents=True)
    acts = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(64 * 8).astype(np.float32)), 8)
    pq.write_table(pa.table({"doc_id": pa.array(np.arange(64), pa.int64()), "activation": acts}), shard)
    member = run / "models" / "bagging" / "run=0" / "member-0.safetensors"
    member.parent.mkdir(parents=True)
    member.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + rng.bytes(300_000))
    (member.parent / "cfg.json").write_text(json.dumps({"d_in": 8, "d_sae": 32}))
    pq.write_table(pa.table({"doc_id": [0, 1], "text": ["a b", "c"]}), run / "documents.parquet")
    (member.parent / ".member-1.safetensors.tmp4242").write_bytes(b"half written")  # never published
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")}


# ------------------------------------------------------------------------------- S3
def test_push_then_pull_into_a_fresh_mirror_is_byte_identical(s3_bucket, tmp_path):
    url = f"{s3_bucket}/runs/smoke"
    writer = RunStore.open(url, cache_dir=tmp_path / "w")
    assert writer.remote and writer.url == url and writer.local.is_relative_to(tmp_path / "w")
    files = _write_artifacts(writer.local)

    uploaded = writer.push(["activations", "models/bagging/run=0", "documents.parquet"])
    assert sorted(uploaded) == sorted(files)  # every file once, the temporary not at all
    # one manifest object per published path, written beside the natural keys
    keys = _keys(s3_bucket)
    assert [k for k in keys if PUBLISHED_DIR in k] == [
        f"runs/smoke/{PUBLISHED_DIR}/activations.json",
        f"runs/smoke/{PUBLISHED_DIR}/documents.parquet.json",
        f"runs/smoke/{PUBLISHED_DIR}/models%2Fbagging%2Frun=0.json",
    ]
    assert not any("tmp4242" in k for k in keys)
    assert writer.push(["activations", "models/bagging/run=0"]) == []  # unchanged: nothing uploaded again

    reader = RunStore.open(url, cache_dir=tmp_path / "r")
    assert reader.local != writer.local
    pulled = reader.pull(["activations", "models", "documents.parquet", "never/published"])
    assert sorted(pulled) == sorted(files)
    for rel, data in files.items():
        assert (reader.local / rel).read_bytes() == data, rel
    assert pq.read_table(reader.local / "activations/train/shard-00000.parquet").equals(
        pq.read_table(writer.local / "activations/train/shard-00000.parquet")
    )
    assert reader.pull(["activations", "models", "documents.parquet"]) == []  # the mirror is current
    assert reader.exists("models") and reader.exists("models/bagging/run=0/cfg.json") and reader.exists("activations/train")
    assert not reader.exists("models/boosting") and not reader.exists("metrics")


def test_a_corrupted_object_is_refused_naming_it_and_a_damaged_mirror_copy_is_replaced(s3_bucket, tmp_path):
    url = f"{s3_bucket}/run"
    writer = RunStore.open(url, cache_dir=tmp_path / "w")
    files = _write_artifacts(writer.local)
    writer.push(["models/bagging/run=0", "documents.parquet"])

    reader = RunStore.open(url, cache_dir=tmp_path / "r")
    assert sorted(reader.pull(["documents.parquet"])) == ["documents.parquet"]
    (reader.local / "documents.parquet").write_bytes(b"damaged in the mirror")
    assert reader.pull(["documents.parquet"]) == ["documents.parquet"]  # its sha256 differs from the manifest's: fetched again
    assert (reader.local / "documents.parquet").read_bytes() == files["documents.parquet"]

    member = "models/bagging/run=0/member-0.safetensors"
    bucket = s3_bucket.removeprefix("s3://")
    _client().put_object(Bucket=bucket, Key=f"run/{member}", Body=files[member][:-1] + b"\x00")  # same size, one byte off
    with pytest.raises(StorageError, match=rf"{url}/{member} does not match its publication manifest"):
        reader.pull(["models"])
    assert not (reader.local / member).exists()  # nothing unverified is renamed into place
    assert not [p for p in (reader.local / "models/bagging/run=0").iterdir() if ".tmp" in p.name]

    _client().delete_object(Bucket=bucket, Key=f"run/{member}")
    with pytest.raises(StorageError, match=rf"{url}/{member} is published .* but the object is missing"):
        reader.pull([member])


def test_objects_without_their_manifest_are_not_pulled(s3_bucket, tmp_path):
    """A push killed before its commit point: its objects are on the store, its manifest is not."""
    url = f"{s3_bucket}/run"
    writer = RunStore.open(url, cache_dir=tmp_path / "w")
    _write_artifacts(writer.local)
    writer.push(["models/bagging/run=0"])
    _client().put_object(Bucket=s3_bucket.removeprefix("s3://"), Key="run/models/boosting/run=0/stage-0.safetensors", Body=b"uncommitted")

    reader = RunStore.open(url, cache_dir=tmp_path / "r")
    assert sorted(reader.pull(["models"])) == ["models/bagging/run=0/cfg.json", "models/bagging/run=0/member-0.safetensors"]
    assert reader.pull(["models/boosting/run=0"]) == []
    assert not (reader.local / "models/boosting").exists()
    assert not reader.exists("models/boosting/run=0")


def test_a_republish_deletes_stale_objects_and_replaces_narrower_manifests(s3_bucket, tmp_path):
    url = f"{s3_bucket}/run"
    store = RunStore.open(url, cache_dir=tmp_path / "w")
    _write_artifacts(store.local)
    store.push(["models/bagging/run=0"])
    (store.local / "models/bagging/run=0/cfg.json").unlink()
    assert store.push(["models/bagging/run=0"]) == []  # the member is unchanged
    keys = _keys(s3_bucket)
    assert "run/models/bagging/run=0/cfg.json" not in keys and "run/models/bagging/run=0/member-0.safetensors" in keys

    # two units published apart, then their parent whole: the parent's manifest replaces theirs
    boosting = store.local / "models/boosting/run=0/stage-0.safetensors"
    boosting.parent.mkdir(parents=True)
    boosting.write_bytes(b"boost")
    store.push(["models/boosting/run=0"])
    assert sorted(k for k in _keys(s3_bucket) if PUBLISHED_DIR in k) == [
        f"run/{PUBLISHED_DIR}/models%2Fbagging%2Frun=0.json",
        f"run/{PUBLISHED_DIR}/models%2Fboosting%2Frun=0.json",
    ]
    boosting.unlink()
    store.push(["models"])
    assert [k for k in _keys(s3_bucket) if k.startswith("run/")] == [
        f"run/{PUBLISHED_DIR}/models.json",
        "run/models/bagging/run=0/member-0.safetensors",
    ]
    # a narrower republish shadows what the wider manifest says under it
    boosting.write_bytes(b"boost again")
    store.push(["models/boosting/run=0"])
    reader = RunStore.open(url, cache_dir=tmp_path / "r")
    assert sorted(reader.pull(["models"])) == ["models/bagging/run=0/member-0.safetensors", "models/boosting/run=0/stage-0.safetensors"]
    assert (reader.local / "models/boosting/run=0/stage-0.safetensors").read_bytes() == b"boost again"


def test_a_second_process_is_refused_while_the_lease_is_held_and_renewed_then_gets_it(s3_bucket, tmp_path):
    url = f"{s3_bucket}/run"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, str(tmp_path / "child")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        store = RunStore.open(url, cache_dir=tmp_path / "parent")
        with store.lock(ttl_s=1.0):
            with store.lock():  # re-entrant: the pipeline holds it across its stage flows
                assert holds_lock(store.local)
            assert child.stdout.readline().strip() == "ready"
            time.sleep(1.3)  # longer than the TTL: only the heartbeat keeps the lease alive
            child.stdin.write("try\n")
            child.stdin.flush()
            answer = child.stdout.readline()
            assert answer.startswith("busy"), answer
            assert f"run directory {url} is in use by another run (holder: pid {os.getpid()}" in answer
        assert "run/.lock" not in _keys(s3_bucket)  # released: the lease object is gone
        child.stdin.write("try\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "locked"
    finally:
        child.stdin.close()
        assert child.wait(timeout=30) == 0


_CHILD = """
import sys
from flows.rundir import RunDirectoryBusy
from flows.storage import RunStore
store = RunStore.open(sys.argv[1], cache_dir=sys.argv[2])
print("ready", flush=True)
for line in sys.stdin:
    try:
        with store.lock(ttl_s=5):
            print("locked", flush=True)
    except RunDirectoryBusy as e:
        print("busy", str(e).replace(chr(10), " "), flush=True)
"""


def _foreign_lease(expires_in: float, ttl_s: float) -> bytes:
    now = time.time()
    return json.dumps(
        {"holder": "pid 999999 on elsewhere since then", "pid": 999999, "host": "elsewhere", "nonce": "x",
         "acquired_at": now - 60, "renewed_at": now + expires_in - ttl_s, "ttl_s": ttl_s, "expires_at": now + expires_in}
    ).encode()


def test_a_live_foreign_lease_refuses_and_an_expired_one_is_taken_over(s3_bucket, tmp_path):
    url = f"{s3_bucket}/run"
    bucket = s3_bucket.removeprefix("s3://")
    store = RunStore.open(url, cache_dir=tmp_path / "m")
    (store.local / ".shard-3.parquet.tmp777").write_bytes(b"left by a killed run")

    _client().put_object(Bucket=bucket, Key="run/.lock", Body=_foreign_lease(expires_in=300, ttl_s=120))
    with pytest.raises(RunDirectoryBusy, match=r"in use by another run \(holder: pid 999999 on elsewhere"):
        with store.lock():
            pass
    assert (store.local / ".shard-3.parquet.tmp777").exists()  # nothing swept without the lock

    # a holder that died: its own clock says the lease expired 10 s ago, and the store's clock
    # (last modified, whole seconds, + ttl) agrees once a second has passed
    _client().put_object(Bucket=bucket, Key="run/.lock", Body=_foreign_lease(expires_in=-10, ttl_s=0.0))
    time.sleep(1.1)
    with store.lock(ttl_s=60) as swept:
        lease = json.loads(_client().get_object(Bucket=bucket, Key="run/.lock")["Body"].read())
        assert lease["pid"] == os.getpid() and lease["ttl_s"] == 60
        assert swept == [".shard-3.parquet.tmp777"]
    assert "run/.lock" not in _keys(s3_bucket)


def test_a_run_that_lost_its_lease_publishes_nothing_more(s3_bucket, tmp_path):
    url = f"{s3_bucket}/run"
    bucket = s3_bucket.removeprefix("s3://")
    store = RunStore.open(url, cache_dir=tmp_path)
    _write_artifacts(store.local)
    with store.lock(ttl_s=0.4):  # renewed every 0.1 s
        store.push(["documents.parquet"])
        _client().put_object(Bucket=bucket, Key="run/.lock", Body=_foreign_lease(expires_in=300, ttl_s=120))  # taken over
        time.sleep(0.5)
        with pytest.raises(StorageError, match=rf"not publishing into {url}: this run lost its lease .*taken or deleted"):
            store.push(["models"])
    assert json.loads(_client().get_object(Bucket=bucket, Key="run/.lock")["Body"].read())["pid"] == 999999  # the successor's, untouched
    assert not RunStore.open(url, cache_dir=tmp_path / "r").exists("models")


def test_a_store_travels_to_a_worker_and_remembers_its_mirror_digests(s3_bucket, tmp_path):
    """Task runners pickle what they send to workers; a worker's pull finds the mirror current from the digests file."""
    url = f"{s3_bucket}/run"
    store = RunStore.open(url, cache_dir=tmp_path)
    files = _write_artifacts(store.local)
    store.push(["models"])
    worker = pickle.loads(pickle.dumps(store))
    assert (worker.url, worker.local, worker.remote) == (store.url, store.local, True)
    assert worker.pull(["models"]) == []
    digests = json.loads((store.local / PUBLISHED_DIR / "digests.json").read_text())
    member = "models/bagging/run=0/member-0.safetensors"
    assert digests[member][0] == len(files[member]) and digests[member][2] == hashlib.sha256(files[member]).hexdigest()


def test_result_storage_points_every_worker_at_the_run_directory(s3_bucket, tmp_path):
    from prefect.filesystems import RemoteFileSystem

    store = RunStore.open(f"{s3_bucket}/run", cache_dir=tmp_path)
    storage = store.result_storage()
    assert isinstance(storage, RemoteFileSystem) and storage.basepath == f"{s3_bucket}/run/.prefect/results"
    storage.write_path("abc", b"result bytes")
    assert _client().get_object(Bucket=s3_bucket.removeprefix("s3://"), Key="run/.prefect/results/abc")["Body"].read() == b"result bytes"


# --------------------------------------------------------------------------- memory://
def test_a_memory_store_publishes_verifies_and_locks(tmp_path):
    url = "memory://sae-tests/run"
    writer = RunStore.open(url, cache_dir=tmp_path / "w")
    files = _write_artifacts(writer.local)
    try:
        assert sorted(writer.push(["."])) == sorted(files)
        reader = RunStore.open(url, cache_dir=tmp_path / "r")
        assert sorted(reader.pull(["."])) == sorted(files)
        assert all((reader.local / rel).read_bytes() == data for rel, data in files.items())

        fs = fsspec.filesystem("memory")
        fs.pipe_file("/sae-tests/run/documents.parquet", b"tampered")
        with pytest.raises(StorageError, match="memory://sae-tests/run/documents.parquet does not match"):
            RunStore.open(url, cache_dir=tmp_path / "r2").pull(["documents.parquet"])

        with reader.lock(ttl_s=30):
            assert fs.exists("/sae-tests/run/.lock")
            with pytest.raises(RunDirectoryBusy, match="memory://sae-tests/run is in use"):
                # another holder in this process: what a second process would see (memory:// is per process)
                from flows.storage_lease import _Lease

                _Lease(writer, 30).acquire()
        assert not fs.exists("/sae-tests/run/.lock")
    finally:
        fsspec.filesystem("memory").rm("/sae-tests", recursive=True)


class _NoExclusiveCreate(MemoryFileSystem):
    """A store whose 'create' fsspec can only emulate by check-then-write."""

    protocol = ("nocreate",)


def test_a_store_without_exclusive_create_cannot_be_locked(tmp_path):
    fsspec.register_implementation("nocreate", _NoExclusiveCreate, clobber=True)
    store = RunStore.open("nocreate://run", cache_dir=tmp_path)
    with pytest.raises(StorageError, match=r"cannot lock run directory nocreate://run: nocreate:// has no exclusive conditional create"):
        with store.lock():
            pass


# ------------------------------------------------------------------------------ local
@pytest.mark.parametrize("as_url", [False, True])
def test_a_local_path_behaves_as_before(tmp_path, as_url):
    run = tmp_path / "run"
    store = RunStore.open(f"file://{run}" if as_url else run)
    assert (store.url, store.local, store.remote) == (str(run.resolve()), run.resolve(), False)
    assert not is_remote(run) and not is_remote(f"file://{run}") and is_remote("s3://b/x") and is_remote("memory://x")
    files = _write_artifacts(run)
    assert store.push(["models", "activations"]) == [] and store.pull(["models"]) == []
    assert store.exists("models/bagging/run=0") and not store.exists("metrics")
    assert store.result_storage() == run.resolve() / ".prefect" / "results"
    with store.lock() as swept:
        assert holds_lock(run) and (run / ".lock").read_text().startswith(f"pid {os.getpid()}")
        assert swept == ["models/bagging/run=0/.member-1.safetensors.tmp4242"]
    assert not holds_lock(run)
    assert {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")} == files
