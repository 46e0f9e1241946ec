"""Streaming activations (issue 18): the shard-backed source against the in-memory path.

The shards are real Parquet files written by the shard writer (tests/synthetic_shards.py);
the streamed batches, the trained models and the metrics are compared with the in-memory
twin: identical when the split fits in the shuffle buffer, and, when it does not, every row
once per epoch and member, members reading one window at a time, any step reachable without
replaying the ones before it, and training resumed after kill -9 equal to an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core.config import SAEConfig, TrainConfig
from sae_core.evaluation import prefix_reconstruction_metrics
from sae_core.ensemble import Ensemble
from sae_core.training.ensembles import _Residual, _subtract_stage, train_bagging, train_boosting
from sae_core.training.sources import Chunk, ChunkedSource, InMemorySource, subset_per_chunk
from sae_core.training.trainer import train_sae
from tasks.common import activation_source, split_tokens
from tests.synthetic_shards import write_synthetic_activations

ROOT = Path(__file__).resolve().parents[1]
D = 32
SAE = SAEConfig(architecture="topk", d_in=D, d_sae=64, k=4)
RECIPE = TrainConfig(n_steps=24, batch_size=64, lr=3e-3, b_dec_init_samples=256, log_every=4)
N_TRAIN, ROWS_PER_SHARD = 3000, 500   # 6 shards of one row group each: 6 chunks


@pytest.fixture(scope="module")
def acts_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("streaming") / "activations"
    write_synthetic_activations(directory, {"train": N_TRAIN, "test": 1100}, d=D, n_features=128, rows_per_shard=ROWS_PER_SHARD)
    return directory


def windowed(acts_dir, buffer_rows: int = 1200) -> ChunkedSource:
    """The train split streamed through windows of ``buffer_rows`` rows (two chunks each)."""
    source = activation_source(acts_dir, "train", None, 0)
    source.buffer_rows = buffer_rows
    assert source.streams
    return source


def row_ids(rows: torch.Tensor, data: torch.Tensor) -> list[int]:
    index = {r.numpy().tobytes(): i for i, r in enumerate(data)}
    return [index[r.numpy().tobytes()] for r in rows]


def test_subset_is_exact_distinct_seeded_and_kept_in_file_order():
    chunks = [Chunk(("s", i), rows) for i, rows in enumerate([100, 7, 300, 1, 50])]
    picked = subset_per_chunk(chunks, 120, seed=3)
    assert sum(c.n for c in picked) == 120
    assert all(list(c.keep) == sorted(set(c.keep)) and max(c.keep) < c.rows for c in picked)
    assert picked == subset_per_chunk(chunks, 120, seed=3) != subset_per_chunk(chunks, 120, seed=4)
    assert subset_per_chunk(chunks, None, 0) == chunks == subset_per_chunk(chunks, 458, 0)


def test_a_split_within_the_buffer_trains_exactly_as_in_memory(acts_dir, monkeypatch):
    """The default path: the shards are read once and the batches, hence the models, are the in-memory ones bit for bit;
    boosting precomputes its residuals as in memory (never the per-batch recomputation of streamed data, J times the work)."""
    import sae_core.training.ensembles as ensembles

    def per_batch_residual(*args, **kwargs):
        raise AssertionError("boosting recomputed residuals per batch on data held in memory")

    monkeypatch.setattr(ensembles, "_Residual", per_batch_residual)
    source = activation_source(acts_dir, "train", None, 0, buffer_mb=64)
    assert not source.streams
    rows = split_tokens(acts_dir, "train", None, 0)
    assert torch.equal(source.in_memory().rows, rows) and rows.shape == (N_TRAIN, D)
    for train in (train_bagging, train_boosting):  # boosting: the precomputed residuals of the in-memory path
        a = train(SAE, source, RECIPE, 2, seeds=[5, 6]).ensemble.state_dict()
        b = train(SAE, rows, RECIPE, 2, seeds=[5, 6]).ensemble.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), train.__name__


def test_streamed_batches_cover_every_row_once_per_epoch_and_members_share_windows(acts_dir):
    source = windowed(acts_dir)
    data = split_tokens(acts_dir, "train", None, 0)
    B, seeds = 100, [1, 2, 3]
    stream = source.stream(seeds, B)
    windows, starts = stream._plan(0)
    assert [sum(source.chunks[c].n for c in w) for w in windows] == [1000, 1000, 1000]  # 2 chunks of 500 fit 1,200 rows
    seen = [[] for _ in seeds]
    for step in range(stream.batches_per_epoch):
        batch = stream.batch(step)
        assert batch.shape == (3, B, D)
        for j in range(3):
            seen[j] += row_ids(batch[j], data)
        # members read the same window(s) at the same step: their rows come from the same chunks
        chunk_of = [{i // ROWS_PER_SHARD for i in row_ids(batch[j], data)} for j in range(3)]
        assert chunk_of[0] == chunk_of[1] == chunk_of[2]
        assert len(stream._loaded) + len(stream._pending) <= 3  # this step's window(s) and the next: bounded
    for j in range(3):
        assert len(seen[j]) == len(set(seen[j])) == stream.batches_per_epoch * B  # no row twice in an epoch
    assert seen[0] != seen[1]  # each member its own order
    stream.close()


def test_any_step_is_read_without_replaying_the_ones_before(acts_dir):
    source = windowed(acts_dir)
    sequential = source.stream([4, 9], 128)
    batches = [sequential.batch(s) for s in range(60)]  # 23 batches per epoch: crosses two epoch boundaries
    sequential.close()
    for step in (0, 7, 22, 23, 41, 59):
        fresh = source.stream([4, 9], 128)
        assert torch.equal(fresh.batch(step), batches[step])
        fresh.close()


def test_same_seed_same_batches_same_model_and_bootstrap_refused(acts_dir):
    first = train_sae(SAE, windowed(acts_dir), RECIPE, member_seeds=[3, 4]).sae.state_dict()
    second = train_sae(SAE, windowed(acts_dir), RECIPE, member_seeds=[3, 4]).sae.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ValueError, match="bootstrap.*activations: memory"):
        train_sae(SAE, windowed(acts_dir), RECIPE.model_copy(update={"bootstrap": True}), member_seeds=[3])


def test_streamed_boosting_trains_each_stage_on_the_residual(acts_dir):
    source = windowed(acts_dir)
    result = train_boosting(SAE, source, RECIPE, 2, seeds=[0, 1])
    ens = result.ensemble
    data = split_tokens(acts_dir, "test", None, 0)
    one, two = (prefix_reconstruction_metrics(ens, data.split(256))[n].explained_variance for n in (1, 2))
    assert two > one  # the second stage learned the residual the first one left
    stage = ens.member(0).eval()
    np.testing.assert_allclose(_Residual([stage], torch.device("cpu"))(data[:300]).numpy(),
                               _subtract_stage(data[:300], stage, torch.device("cpu")).numpy(), rtol=1e-5, atol=1e-6)


def test_streaming_evaluation_equals_in_memory(acts_dir):
    source = activation_source(acts_dir, "test", None, 0)
    rows = split_tokens(acts_dir, "test", None, 0)
    batches = list(source.iter_batches(256))
    assert [b.shape[0] for b in batches] == [256] * 4 + [76] and torch.equal(torch.cat(batches), rows)
    ens = train_bagging(SAE, InMemorySource(split_tokens(acts_dir, "train", None, 0)), RECIPE, 3, seeds=[0, 1, 2]).ensemble
    streamed = prefix_reconstruction_metrics(ens, activation_source(acts_dir, "test", None, 0).iter_batches(256))
    in_memory = prefix_reconstruction_metrics(ens, rows.split(256))
    assert streamed == in_memory
    # a seeded subset: the same rows either way
    subset = activation_source(acts_dir, "test", 500, 1)
    assert torch.equal(torch.cat(list(subset.iter_batches(128))), split_tokens(acts_dir, "test", 500, 1))


# Trains 3 members streamed from the shards with a checkpoint every 4 steps and stops itself
# (SIGSTOP) right after the checkpoint of step 12, so the test's SIGKILL lands mid-run.
KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from sae_core.config import SAEConfig, TrainConfig
from sae_core.training.trainer import train_sae
from tasks.common import activation_source
acts, ckpt, marker = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
source = activation_source(acts, "train", None, 0)
source.buffer_rows = 1200
def stop(step, sae, record):
    if step == 12:
        marker.write_text("12")
        os.kill(os.getpid(), signal.SIGSTOP)
train_sae(SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4),
          source, TrainConfig(n_steps=24, batch_size=64, lr=3e-3, b_dec_init_samples=256, log_every=4, checkpoint_every=4),
          member_seeds=[3, 4, 5], checkpoint_dir=ckpt, callback=stop)
"""


def test_streamed_training_killed_mid_run_resumes_bit_identical(acts_dir, tmp_path):
    checkpoint, marker = tmp_path / "ckpt", tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(acts_dir), str(checkpoint), str(marker)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not marker.is_file():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the training subprocess did not reach step 12"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    recipe = RECIPE.model_copy(update={"checkpoint_every": 4})
    resumed = train_sae(SAE, windowed(acts_dir), recipe, member_seeds=[3, 4, 5], checkpoint_dir=checkpoint)
    assert resumed.resumed_from_step == 12
    whole = train_sae(SAE, windowed(acts_dir), recipe, member_seeds=[3, 4, 5])
    a, b = resumed.sae.state_dict(), whole.sae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.to_json() for r in resumed.history] == [r.to_json() for r in whole.history]


def test_the_train_stage_streams_and_says_so(acts_dir, tmp_path, caplog, monkeypatch):
    """run_training with a buffer smaller than the split streams it, records how in the
    model's data fingerprint (so the in-memory model is not reused for it) and logs progress
    lines without a terminal."""
    import logging
    import shutil

    from tasks.config import TrainStageConfig
    from tasks.train import run_training

    run = tmp_path / "run"
    shutil.copytree(acts_dir, run / "activations")
    cfg = TrainStageConfig(d_sae=64, k=4, n_members=2, n_runs=1, methods=["bagging", "boosting"], device="cpu", recipe=RECIPE)
    memory = run_training(cfg, run, progress=False)
    assert any("held in memory" in n for n in memory.notes)
    monkeypatch.setenv("SAE_ENSEMBLES_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="sae_ensembles"):
        streamed = run_training(cfg.model_copy(update={"shuffle_buffer_mb": 0.15}), run, progress=False)  # 1,228 rows of d = 32
    assert any("streamed through a shuffle buffer of 1,228 rows" in n for n in streamed.notes)
    assert sorted(streamed.written) == ["models/bagging/run=0", "models/boosting/run=0"]  # not the in-memory models
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    assert lines and all("member-steps" in line and "tokens/s" in line for line in lines)
    assert any("loss" in line and "EV" in line and "ETA" in line for line in lines) and "took" in lines[-1]


def test_bfloat16_shards_halve_the_disk_within_the_stated_error(tmp_path):
    """extract.activation_dtype = bfloat16: the manifest and the contract record it, the shards
    take about half the bytes, and every value read back is within a relative 2^-8 (8 significant bits) of the
    float32 extraction's (round to nearest); a float32 shard under a bfloat16 manifest fails its contract."""
    from data_contracts import ContractViolation
    from data_contracts.activations import load_split, read_manifest, validate_activations
    from tasks.config import CorpusSource, ExtractConfig
    from tasks.extract import run_extraction
    from tests.tiny_models import TEXTS, build_tiny_model

    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(f"{t} {TEXTS[(i + 2) % 5]}" for i, t in enumerate(TEXTS * 3)) + "\n")
    model = build_tiny_model(tmp_path / "model", "bert")
    base = ExtractConfig(model=str(model), layer=1, context_length=16, batch_size=8, corpus=[CorpusSource(name=str(corpus))],
                         device="cpu")
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = tmp_path / dtype
        run_extraction(base.model_copy(update={"activation_dtype": dtype}), runs[dtype], progress=False)
    acts = {k: v / "activations" for k, v in runs.items()}
    assert read_manifest(acts["bfloat16"]).dtype == "bfloat16" and read_manifest(acts["float32"]).dtype == "float32"
    validate_activations(acts["bfloat16"])
    exact, rounded = (load_split(acts[k], "train") for k in ("float32", "bfloat16"))
    assert rounded.dtype == np.float32 and rounded.shape == exact.shape
    assert np.all(np.abs(rounded - exact) <= 2.0**-8 * np.abs(exact))
    assert not np.array_equal(rounded, exact)
    size = {k: sum(p.stat().st_size for p in acts[k].rglob("*.parquet")) for k in acts}
    assert size["bfloat16"] < 0.6 * size["float32"]
    # the streamed reader decodes the same values
    assert torch.equal(torch.cat(list(activation_source(acts["bfloat16"], "train", None, 0).iter_batches(64))), torch.from_numpy(rounded))
    # a float32 shard in a bfloat16 directory is a contract violation naming the dtype
    manifest = read_manifest(acts["float32"])
    from data_contracts.activations import write_manifest

    write_manifest(acts["float32"], manifest.model_copy(update={"dtype": "bfloat16"}))
    with pytest.raises(ContractViolation, match="expected width 32 .* of bfloat16 bits, 64 bytes a row; the manifest.s dtype bfloat16"):
        validate_activations(acts["float32"])


def test_training_from_the_model_without_storing_the_train_split(tmp_path):
    """extract.store_train = false stores only val and test and plans the train split's
    blocks; the train stage runs the model over them as it streams, and on the CPU gets the
    stored rows bit for bit, hence the same models as from shards."""
    from data_contracts import ContractViolation
    from data_contracts.activations import load_split, read_manifest
    from tasks.config import CorpusSource, ExtractConfig, TrainStageConfig
    from tasks.extract import run_extraction
    from tasks.train import run_training
    from tests.tiny_models import TEXTS, build_tiny_model

    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(f"{t} {TEXTS[(i + 3) % 5]} {i}" for i, t in enumerate(TEXTS * 4)) + "\n")
    model = build_tiny_model(tmp_path / "model", "llama")
    base = ExtractConfig(model=str(model), layer=1, context_length=16, batch_size=8, corpus=[CorpusSource(name=str(corpus))],
                         documents_per_shard=6, device="cpu")
    runs = {store: tmp_path / f"store_{store}" for store in (True, False)}
    for store, run in runs.items():
        run_extraction(base.model_copy(update={"store_train": store}), run, progress=False)
    stored, live = (read_manifest(runs[s] / "activations") for s in (True, False))
    assert live.shards_of("train") == [] and live.is_live("train") and not stored.is_live("train")
    assert live.tokens_per_split == stored.tokens_per_split
    assert [(s.file, s.rows) for s in live.shards_of("test")] == [(s.file, s.rows) for s in stored.shards_of("test")]
    assert [b.rows for b in live.live_splits["train"]] == [s.rows for s in stored.shards_of("train")]
    with pytest.raises(ContractViolation, match="not stored"):
        load_split(runs[False] / "activations", "train")
    rows = activation_source(runs[False] / "activations", "train", None, 0).in_memory().rows
    assert torch.equal(rows, split_tokens(runs[True] / "activations", "train", None, 0))

    cfg = TrainStageConfig(d_sae=48, k=4, n_members=2, n_runs=1, methods=["bagging", "boosting"], device="cpu",
                           shuffle_buffer_mb=0.03, recipe=TrainConfig(n_steps=8, batch_size=32, lr=3e-3, b_dec_init_samples=64))
    results = {store: run_training(cfg, run, progress=False) for store, run in runs.items()}
    assert any("computed by" in n and "store_train: false" in n for n in results[False].notes)
    assert any("streamed through a shuffle buffer" in n for n in results[False].notes)
    for name in ("bagging", "boosting"):
        a, b = (load_ensemble_state(runs[s] / "models" / name / "run=0") for s in (True, False))
        assert all(torch.equal(a[k], b[k]) for k in a)


def load_ensemble_state(directory):
    from sae_core.io import load_ensemble

    return load_ensemble(directory).state_dict()
