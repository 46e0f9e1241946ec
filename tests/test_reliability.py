"""Reliability (issue 9): bad input, kill -9 and resume, determinism, concurrent runs, security.

Everything runs for real on a tiny random BERT: real Parquet shards, real SAEs, real Prefect
flows (against the session's test server), real subprocesses killed with SIGKILL. Each
bad-input test asserts both the message (it names the problem) and that the stage
published nothing. The README's "Failure modes covered" table points here.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_contracts import ContractViolation, validate
from data_contracts.activations import read_manifest, write_manifest, write_shard
from flows.configs import load_pipeline_config
from sae_core import Ensemble, SAEConfig, build_sae, load_ensemble, save_ensemble
from tasks.common import ACTIVATIONS_DIR, DOCUMENTS_FILE, METRICS_DIR, MODELS_DIR
from tasks.config import CorpusSource, ExtractConfig
from tasks.evaluate import run_evaluation
from tasks.extract import run_extraction
from tasks.train import CHECKPOINTS_DIR, run_training
from tests.tiny_models import TEXTS, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TEMPORARY = re.compile(r"^(\..+\.(tmp|old)[A-Za-z0-9_]*|checkpoint\.tmp\d+)$")

CONFIG = """\
name: reliability
extract:
  model: {model}
  layer: 1
  context_length: 16
  batch_size: 16
  documents_per_shard: 10
  corpus:
    - name: {corpus}
  split_fractions: {{train: 0.6, val: 0.1, test: 0.3}}
train:
  d_sae: 32
  k: 4
  n_members: 2
  n_runs: 2
  methods: [single, bagging, boosting]
  expanded_sizes: [2]
  recipe: {{n_steps: 20, batch_size: 64, lr: 0.003, checkpoint_every: 5, log_every: 5}}
evaluate:
  ce_loss: false
"""


# ----------------------------------------------------------------------- fixtures
class Tiny:
    """A tiny model, a 120-document corpus and a config file (12 shards of 10 documents)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = build_tiny_model(root / "bert", "bert")
        words = " ".join(TEXTS[:5]).split()
        rng = random.Random(0)
        docs = {" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(120)}
        self.corpus = root / "docs.txt"
        self.corpus.write_text("\n".join(sorted(docs)) + "\n")
        self.config_file = root / "reliability.yaml"
        self.config_file.write_text(CONFIG.format(model=self.model, corpus=self.corpus))
        self.cfg = load_pipeline_config(self.config_file)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("reliability"))


@pytest.fixture(scope="module")
def reference(tiny) -> Path:
    """An uninterrupted extract -> train -> evaluate, in this process."""
    run = tiny.root / "reference"
    run_extraction(tiny.cfg.extract, run, progress=False)
    run_training(tiny.cfg.train, run, progress=False)
    run_evaluation(tiny.cfg.evaluate, run, progress=False)
    return run


def published(run: Path) -> list[str]:
    """Every artifact file under ``run`` (hidden state such as .lock, .cache, .prefect left out)."""
    if not run.exists():
        return []
    return sorted(
        p.relative_to(run).as_posix() for p in run.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run).parts)
    )


def temporaries(run: Path) -> list[str]:
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if TEMPORARY.match(p.name) and ".cache" not in p.parts)


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (hidden ones left out), by relative path."""
    return {rel: hashlib.sha256((directory / rel).read_bytes()).hexdigest() for rel in published(directory)}


def copy_run(reference: Path, target: Path, *parts: str) -> Path:
    """A run directory holding copies of ``parts`` of the reference run."""
    target.mkdir(parents=True)
    for part in parts:
        src = reference / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, target / part)
    return target


# ---------------------------------------------------------------- subprocess helpers
def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``args`` in its own process group (so SIGKILL reaches everything it started)."""
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_until(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    """Poll ``condition`` every 20 ms; fail naming ``what`` if the process ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill(proc)
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def kill(proc: subprocess.Popen) -> None:
    """kill -9 the process group we started, and reap it."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def api_env() -> dict[str, str]:
    """Point a subprocess's flows at the session's Prefect test server (no server of its own to start)."""
    from prefect.settings import get_current_settings

    return {"PREFECT_API_URL": str(get_current_settings().api.url)}


# Runs one plain stage function. The train stage stops itself (SIGSTOP) on a progress message,
# so the test's SIGKILL lands at a known point in the middle of a model, with a checkpoint.
STAGE_SCRIPT = """
import os, signal, sys
from pathlib import Path
from flows.configs import load_pipeline_config
cfg = load_pipeline_config(sys.argv[1])
stage, run_dir = sys.argv[2], Path(sys.argv[3])
if stage == "train":
    from tasks.train import run_training
    def on_progress(fraction, message):
        if message.startswith(sys.argv[4]):
            Path(sys.argv[5]).write_text(message)
            os.kill(os.getpid(), signal.SIGSTOP)
    run_training(cfg.train, run_dir, progress=False, on_progress=on_progress)
else:
    from tasks.evaluate import run_evaluation
    run_evaluation(cfg.evaluate, run_dir, progress=True)
"""


# =========================================================================== bad input
# Extraction: unknown model id/path, missing layer and empty corpus are in
# tests/test_extraction.py::test_bad_inputs (which also asserts nothing is published).

def test_non_finite_activations_from_the_model_stop_extraction_before_any_shard(tiny, tmp_path):
    """A model that yields NaN at the hooked layer: the shard fails its contract before it is written."""
    from safetensors.torch import load_file, save_file

    poisoned = tmp_path / "nan-model"
    shutil.copytree(tiny.model, poisoned)
    weights = load_file(str(poisoned / "model.safetensors"))
    name = next(k for k in weights if k.endswith("layer.0.output.dense.bias"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    run = tmp_path / "run"
    with pytest.raises(ContractViolation, match=r"(?s)activations.*column=finite.*value_set=\[True\]") as err:
        run_extraction(tiny.cfg.extract.model_copy(update={"model": str(poisoned)}), run, progress=False)
    assert "shard-00000.parquet" in str(err.value) and "'position'" in str(err.value)  # names the shard and sample rows
    # no shard, no manifest, no documents table: the documents go out with the manifest
    assert published(run) == []


def test_documents_shorter_than_the_context_are_padded_not_mixed(tiny, tmp_path):
    """Not an error: each short document is one window, right-padded in its batch; padding is
    masked and never recorded, so its activations equal an unpadded forward of it alone."""
    from transformers import AutoModel, AutoTokenizer

    corpus = tmp_path / "short.txt"
    corpus.write_text("\n".join(" ".join(t.split()[: 2 + i % 5]) + f" {TEXTS[(i + 1) % 5].split()[i % 7]}" for i, t in enumerate(TEXTS)) + "\n")
    cfg = ExtractConfig(model=str(tiny.model), layer=1, context_length=64, batch_size=8, corpus=[CorpusSource(name=str(corpus))],
                        split_fractions={"train": 1.0, "val": 0.0, "test": 0.0})
    report = run_extraction(cfg, tmp_path / "run", progress=False)
    table = pq.read_table(tmp_path / "run" / ACTIVATIONS_DIR / report.manifest.shards[0].file).to_pandas()
    docs = pq.read_table(tmp_path / "run" / DOCUMENTS_FILE).to_pandas().set_index("doc_id")
    tok, model = AutoTokenizer.from_pretrained(tiny.model), AutoModel.from_pretrained(tiny.model).eval()
    lengths = []
    for doc_id, rows in table.groupby("doc_id"):
        ids = tok(docs.loc[doc_id, "text"], add_special_tokens=False)["input_ids"]
        lengths.append(len(ids))
        assert rows["position"].tolist() == list(range(1, len(ids) + 1))  # one window, no pad or special rows
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([[2, *ids, 3]]), output_hidden_states=True).hidden_states[2][0, 1:-1]
        np.testing.assert_allclose(np.stack(rows["activation"].to_numpy()), alone.numpy(), rtol=1e-4, atol=1e-5)
    assert len(set(lengths)) > 2 and max(lengths) < 62  # mixed lengths, all shorter than the context


def _truncate(directory: Path) -> str:
    info = read_manifest(directory).shards_of("train")[1]
    path = directory / info.file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return rf"{info.file}.*truncated or corrupt"


def _rewrite_shard(directory: Path, mutate) -> str:
    """Rewrite train shard 1 through ``mutate`` and fix its checksum in the manifest."""
    info = read_manifest(directory).shards_of("train")[1]
    table = pq.read_table(directory / info.file).to_pandas()
    acts = mutate(np.stack(table["activation"].to_numpy()))
    new = write_shard(directory, "train", 1, table["doc_id"].to_numpy(), table["position"].to_numpy(),
                      table["token_id"].to_numpy(), acts, "rewritten")
    manifest = read_manifest(directory)
    write_manifest(directory, manifest.model_copy(update={"shards": [new if s.file == info.file else s for s in manifest.shards]}))
    return info.file


def _wrong_dimension(directory: Path) -> str:
    _rewrite_shard(directory, lambda a: a[:, :-1])
    return r"column activation has width 31 \(float\), expected width 32 \(the manifest's d\)"


def _infinite(directory: Path) -> str:
    def poison(a):
        a = a.copy()
        a[2, 5] = np.inf
        return a

    file = _rewrite_shard(directory, poison)
    return rf"\[{file}\] column=finite.*\(1 rows\)"


def _manifest_mismatch(directory: Path) -> str:
    manifest = read_manifest(directory)
    write_manifest(directory, manifest.model_copy(update={"tokens_per_split": {**manifest.tokens_per_split, "train": 7}}))
    return r"split train: shards list \d+ rows, manifest says 7"


def _shard_missing(directory: Path) -> str:
    info = read_manifest(directory).shards_of("train")[0]
    (directory / info.file).unlink()
    return rf"\[{info.file}\] listed in the manifest but missing"


@pytest.mark.parametrize("damage", [_wrong_dimension, _infinite, _truncate, _manifest_mismatch, _shard_missing])
def test_damaged_activations_stop_training_before_any_model(reference, tiny, tmp_path, damage):
    run = copy_run(reference, tmp_path / "run", ACTIVATIONS_DIR)
    expected = damage(run / ACTIVATIONS_DIR)
    with pytest.raises(ContractViolation, match=rf"artifact {re.escape(str(run / ACTIVATIONS_DIR))} violates its contract") as err:
        run_training(tiny.cfg.train, run, progress=False)
    assert re.search(expected, str(err.value)), str(err.value)
    assert not (run / MODELS_DIR).exists() and not (run / CHECKPOINTS_DIR).exists()


def _infinite_same_fingerprint(directory: Path) -> str:
    """An inf value in a shard that still carries this extraction's fingerprint (as if written by it)."""
    from data_contracts.activations import shard_fingerprint

    info = read_manifest(directory).shards_of("train")[1]
    fingerprint = shard_fingerprint(directory / info.file)
    table = pq.read_table(directory / info.file).to_pandas()
    acts = np.stack(table["activation"].to_numpy()).copy()
    acts[2, 5] = np.inf
    write_shard(directory, "train", 1, table["doc_id"].to_numpy(), table["position"].to_numpy(),
                table["token_id"].to_numpy(), acts, fingerprint)
    return info.file


@pytest.mark.parametrize("damage", [_truncate, _manifest_mismatch, _infinite_same_fingerprint])
def test_extraction_repairs_damaged_activations(reference, tiny, tmp_path, damage):
    """The extract stage itself redoes what is broken and keeps what is intact (a deleted shard:
    tests/test_extraction.py::test_rerun_does_no_work_and_resume_rewrites_only_the_missing_shard)."""
    run = copy_run(reference, tmp_path / "run", ACTIVATIONS_DIR, DOCUMENTS_FILE)
    damage(run / ACTIVATIONS_DIR)
    redo = run_extraction(tiny.cfg.extract, run, progress=False)
    assert len(redo.shards_written) == (0 if damage is _manifest_mismatch else 1)
    assert digests(run / ACTIVATIONS_DIR) == digests(reference / ACTIVATIONS_DIR)


def test_a_failing_stage_flow_publishes_nothing(prefect_harness, reference, tiny, tmp_path):
    """Through the train flow (what the CLI runs): the contract error propagates, no models, no stamp."""
    from flows.stages import train_flow

    run = copy_run(reference, tmp_path / "run", ACTIVATIONS_DIR, DOCUMENTS_FILE)
    expected = _truncate(run / ACTIVATIONS_DIR)
    with pytest.raises(ContractViolation, match=expected):
        train_flow(config=tiny.cfg.train, run_dir=str(run))
    assert not (run / MODELS_DIR).exists() and not (run / ".prefect" / "stamps" / "train.json").exists()


def _wrong_d_sae(run: Path) -> tuple[type, str]:
    target = run / MODELS_DIR / "single" / "run=0"
    save_ensemble(Ensemble(build_sae(SAEConfig(architecture="topk", d_in=16, d_sae=32, k=4)), "single"), target)
    return ValueError, rf"{re.escape(str(target))} was trained on d=16 activations but .* has d=32; retrain"


def _missing_member(run: Path) -> tuple[type, str]:
    shutil.rmtree(run / MODELS_DIR / "bagging" / "run=1" / "member_01")
    return FileNotFoundError, r"ensemble .*bagging/run=1 is missing member directory \['member_01'\]"


class _Payload:
    """Unpickling this touches a marker file: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_weights(run: Path) -> tuple[type, str]:
    weights = run / MODELS_DIR / "boosting" / "run=0" / "member_01" / "sae.safetensors"
    weights.write_bytes(pickle.dumps(_Payload(run.parent / "UNPICKLED")))
    return ValueError, rf"{re.escape(str(weights))} is not a readable safetensors file"


@pytest.mark.parametrize("damage", [_wrong_d_sae, _missing_member, _pickled_weights])
def test_bad_models_stop_evaluation_before_any_metric(reference, tiny, tmp_path, damage):
    run = copy_run(reference, tmp_path / "run", ACTIVATIONS_DIR, MODELS_DIR)
    error, expected = damage(run)
    with pytest.raises(error, match=expected):
        run_evaluation(tiny.cfg.evaluate, run, progress=False)
    assert not (run / METRICS_DIR).exists() and not (run / "figures").exists()
    assert not (tmp_path / "UNPICKLED").exists()


def test_bad_models_stop_downstream_before_any_table(reference, tmp_path):
    from tasks.config import DownstreamConfig
    from tasks.downstream import run_downstream

    run = copy_run(reference, tmp_path / "run", ACTIVATIONS_DIR, MODELS_DIR)
    cfg = DownstreamConfig(probing_datasets=["tweets"], scr_pairs=[])
    target = run / MODELS_DIR / "single" / "run=0"
    save_ensemble(Ensemble(build_sae(SAEConfig(architecture="topk", d_in=16, d_sae=32, k=4)), "single"), target)
    with pytest.raises(ValueError, match=rf"model {re.escape(str(target))} reads d=16, but the activations have d=32"):
        run_downstream(cfg, run, progress=False)
    assert not (run / "downstream").exists() and not (run / "figures").exists()


def test_a_missing_member_is_retrained_by_the_train_stage_to_the_same_bytes(reference, tiny, tmp_path):
    run = copy_run(reference, tmp_path / "run", ACTIVATIONS_DIR, MODELS_DIR)
    shutil.rmtree(run / MODELS_DIR / "bagging" / "run=1" / "member_01")
    result = run_training(tiny.cfg.train, run, progress=False)
    assert result.written == ["models/bagging/run=1"]
    assert digests(run / MODELS_DIR) == digests(reference / MODELS_DIR)


@pytest.mark.parametrize(("kind", "expected"), [
    ("single_class", r"probing set '.*one_label.csv' needs at least 2 labels; found \['sports'\]"),
    ("small_cell", r"SCR pair business-sports: cell .*\(business, female\) has \d+.* paragraphs, fewer than scr_min_cell=5000; choose another topic pair or lower scr_min_cell"),
])
def test_unusable_label_sets_stop_downstream_before_any_table(reference, tmp_path, kind, expected):
    from tasks.config import DownstreamConfig
    from tasks.downstream import run_downstream
    from tasks.labelled import CellTooSmall

    run = copy_run(reference, tmp_path / "run", ACTIVATIONS_DIR, MODELS_DIR)
    if kind == "single_class":
        labels = tmp_path / "one_label.csv"
        labels.write_text("text,label\n" + "".join(f"{t},sports\n" for t in TEXTS[:5]))
        cfg, error = DownstreamConfig(probing_datasets=[str(labels)], scr_pairs=[]), ValueError
    else:
        cfg, error = DownstreamConfig(probing_datasets=[], scr_pairs=[("business", "sports")], scr_min_cell=5000), CellTooSmall
    with pytest.raises(error, match=expected):
        run_downstream(cfg, run, progress=False)
    assert not (run / "downstream").exists() and not (run / "figures").exists()


# ======================================================================== interruption
def test_extraction_killed_mid_run_resumes_to_identical_shards(prefect_harness, reference, tiny, tmp_path):
    """`sae-ensembles extract` in a subprocess, kill -9 after a few shards; the rerun takes the
    lock at once (the kernel released it), sweeps the dead run's temporaries, keeps its finished
    shards and publishes exactly the manifest of an uninterrupted run."""
    from flows.stages import extract_flow

    run, log = tmp_path / "run", tmp_path / "extract.log"
    proc = start(cli("extract", "--config", str(tiny.config_file), "--out", str(run)), log, api_env())
    wait_until(lambda: len(list((run / ACTIVATIONS_DIR).glob("split=*/shard-*.parquet"))) >= 2, proc, log, "two shards were written")
    kill(proc)
    assert not (run / ACTIVATIONS_DIR / "manifest.json").exists(), "the kill came too late: extraction had finished"
    kept = {p.relative_to(run / ACTIVATIONS_DIR).as_posix() for p in (run / ACTIVATIONS_DIR).glob("split=*/shard-*.parquet")}
    assert f"pid {proc.pid} " in (run / ".lock").read_text()  # what the dead holder left; the kernel dropped its lock
    (run / ACTIVATIONS_DIR / "split=train" / ".shard-00009.parquet.tmp999999").write_bytes(b"half a shard")  # as a kill mid-write leaves

    outcome = extract_flow(config=tiny.cfg.extract, run_dir=str(run))
    shards = {s.file for s in read_manifest(reference / ACTIVATIONS_DIR).shards}
    assert {w.removeprefix("activations/") for w in outcome.result.written if w.startswith("activations/split=")} == shards - kept
    assert read_manifest(run / ACTIVATIONS_DIR) == read_manifest(reference / ACTIVATIONS_DIR)  # same shard checksums
    assert digests(run / ACTIVATIONS_DIR) == digests(reference / ACTIVATIONS_DIR)
    assert temporaries(run) == [] and (run / ".lock").read_text() == ""


def test_training_killed_mid_model_resumes_from_its_checkpoint_bit_identical(reference, tiny, tmp_path):
    """kill -9 in the middle of boosting run 0 (bagging run 0 saved, a boosting checkpoint on
    disk); the rerun keeps the saved model, resumes boosting from its checkpoint, and every
    model and every metric equals the uninterrupted run's bit for bit."""
    run = copy_run(reference, tmp_path / "run", ACTIVATIONS_DIR)
    log, marker = tmp_path / "train.log", tmp_path / "stopped"
    proc = start([sys.executable, "-c", STAGE_SCRIPT, str(tiny.config_file), "train", str(run), "boosting/run=0: step 10", str(marker)], log)
    wait_until(marker.is_file, proc, log, "boosting run 0 reached step 10")
    kill(proc)
    checkpoints = sorted(p.relative_to(run).as_posix() for p in (run / CHECKPOINTS_DIR).rglob("checkpoint.safetensors"))
    assert checkpoints == [".checkpoints/boosting/run=0/stage_00/checkpoint.safetensors"]
    assert sorted(p.parent.relative_to(run).as_posix() for p in (run / MODELS_DIR).glob("*/run=*/ensemble.json")) == [
        "models/bagging/run=0", "models/single/run=0"]

    resumed = run_training(tiny.cfg.train, run, progress=False)
    assert "models/bagging/run=0" not in resumed.written and "models/boosting/run=0" in resumed.written
    assert digests(run / MODELS_DIR) == digests(reference / MODELS_DIR)
    assert not (run / CHECKPOINTS_DIR).exists()
    # the same config and seeds give bit-identical metrics on CPU (another process trained half of it)
    run_evaluation(tiny.cfg.evaluate, run, progress=False)
    assert digests(run / METRICS_DIR) == digests(reference / METRICS_DIR)


def test_evaluation_killed_mid_run_publishes_nothing_and_the_rerun_is_identical(reference, tiny, tmp_path):
    run = copy_run(reference, tmp_path / "run", ACTIVATIONS_DIR, MODELS_DIR)
    log = tmp_path / "evaluate.log"
    proc = start([sys.executable, "-c", STAGE_SCRIPT, str(tiny.config_file), "evaluate", str(run)], log)
    wait_until(lambda: re.search(r"evaluate:.*\| *[1-9]\d*/\d+ ", log.read_text(errors="replace")), proc, log, "the first model was scored")
    kill(proc)
    assert published(run / METRICS_DIR) == [], "the kill came too late: metrics were already written"
    run_evaluation(tiny.cfg.evaluate, run, progress=False)
    assert digests(run / METRICS_DIR) == digests(reference / METRICS_DIR)


# ========================================================================= determinism
def test_another_seed_gives_other_members(reference, tiny, tmp_path):
    """recipe.seed = 1 (bagging, the same S = 2 runs of J = 2) trains four new members, none equal
    to any of the reference's four (seed 0); the same seed retraining bit for bit is shown by
    the resume and repair tests above."""
    run = copy_run(reference, tmp_path / "run", ACTIVATIONS_DIR)
    base = tiny.cfg.train.model_copy(update={"methods": ["bagging"]})
    other_cfg = base.model_copy(update={"recipe": base.recipe.model_copy(update={"seed": 1})})
    assert run_training(other_cfg, run, progress=False).written == ["models/bagging/run=0", "models/bagging/run=1"]
    new = [load_ensemble(run / MODELS_DIR / "bagging" / f"run={r}") for r in (0, 1)]
    old = [load_ensemble(reference / MODELS_DIR / "bagging" / f"run={r}") for r in (0, 1)]
    assert [e.info.seeds for e in old] == [(0, 1), (2, 3)] and [e.info.seeds for e in new] == [(4, 5), (6, 7)]
    members = [e.member(j).W_dec for e in new + old for j in range(2)]
    for a in range(len(members)):
        for b in range(a + 1, len(members)):
            assert not torch.allclose(members[a], members[b]), (a, b)


# ========================================================================= concurrency
def test_two_runs_into_different_directories_succeed_and_one_into_a_busy_directory_is_refused(
    prefect_harness, reference, tiny, tmp_path
):
    """While `sae-ensembles extract` runs in a subprocess into one directory, a run into the same
    directory fails at once naming it and its holder, and a run into another directory works
    alongside; both finished directories hold the uninterrupted run's bytes."""
    from flows.rundir import RunDirectoryBusy
    from flows.stages import extract_flow

    one, two, log = tmp_path / "one", tmp_path / "two", tmp_path / "one.log"
    proc = start(cli("extract", "--config", str(tiny.config_file), "--out", str(one)), log, api_env())
    wait_until(lambda: f"pid {proc.pid} " in ((one / ".lock").read_text() if (one / ".lock").exists() else ""),
               proc, log, "the first run took its lock")
    asked = time.monotonic()
    with pytest.raises(RunDirectoryBusy) as refused:
        extract_flow(config=tiny.cfg.extract, run_dir=str(one))
    assert f"run directory {one.resolve()} is in use by another run (holder: pid {proc.pid} " in str(refused.value)
    assert time.monotonic() - asked < 15 and proc.poll() is None  # refused at once, while the holder works on
    extract_flow(config=tiny.cfg.extract, run_dir=str(two))  # another directory: runs alongside
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    for d in (one, two):
        assert validate(d / ACTIVATIONS_DIR) == read_manifest(reference / ACTIVATIONS_DIR)
        assert digests(d / ACTIVATIONS_DIR) == digests(reference / ACTIVATIONS_DIR)
    assert (one / ".lock").read_text() == ""  # released on exit


def test_the_lock_is_reentrant_exclusive_and_sweeps_only_stale_temporaries(tmp_path):
    from flows.rundir import RunDirectoryBusy, holds_lock, run_directory_lock, sweep_stale_temporaries

    run = tmp_path / "run"
    stale = [".shard-00001.parquet.tmp4242", ".manifest.json.tmp7", ".prefect/stamps/.train.json.tmp12",
             ".checkpoints/bagging/run=0/checkpoint.tmp99"]
    for rel in stale:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("partial")
    (run / "models" / "bagging" / ".run=0.tmpk2j_x8" / "member_00").mkdir(parents=True)  # atomic_directory's temp dir
    keep = ["models/bagging/run=0/ensemble.json", "notes.tmp", ".cache/datasets/.lock.tmp3", "metrics/summary.parquet"]
    for rel in keep:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("kept")
    with pytest.raises(RuntimeError, match="needs the run directory's lock"):
        sweep_stale_temporaries(run)
    with run_directory_lock(run) as swept:
        assert swept == sorted([*stale, "models/bagging/.run=0.tmpk2j_x8"])
        with run_directory_lock(run) as again:  # the pipeline flow and its stage subflows
            assert again == [] and holds_lock(run)
        assert holds_lock(run)
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from flows.rundir import run_directory_lock\n"
             "try:\n    run_directory_lock(sys.argv[1]).__enter__()\nexcept RuntimeError as e:\n    print(e)", str(run)],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
        assert f"run directory {run.resolve()} is in use by another run (holder: pid {os.getpid()} " in probe.stdout, probe
    assert not holds_lock(run)
    assert all((run / rel).exists() for rel in keep) and temporaries(run) == []
    with run_directory_lock(run):  # free again once released
        pass
    assert RunDirectoryBusy.__mro__[1] is RuntimeError  # the CLI reports it as a stage error (exit 1)


@pytest.mark.slow
def test_two_full_pipelines_at_once_with_their_own_temporary_servers(tiny, tmp_path):
    """`sae-ensembles run` twice at once, each starting its own temporary Prefect server on the
    same PREFECT_HOME, into two directories: both finish, and their metrics are identical."""
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(tiny.config_file.read_text().replace("name: reliability", "name: twin") + (
        "downstream:\n  probing_datasets: [tweets]\n  probing_ks: [1, 2]\n  max_documents_per_class: 4\n"
        "  max_tokens_per_document: 12\n  scr_pairs: [[entertainment, sports]]\n  scr_n_ablated: [1, 4]\n"
        "  scr_min_cell: 10\n  scr_max_documents_per_cell: 6\n  batch_size: 16\n"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    procs = []
    for name in ("a", "b"):
        with open(tmp_path / f"{name}.log", "wb") as out:
            procs.append(subprocess.Popen(cli("run", "--config", str(cfg), "--out", str(tmp_path / name)), cwd=ROOT, env=env,
                                          stdout=out, stderr=subprocess.STDOUT))
    for proc, name in zip(procs, ("a", "b")):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        assert (tmp_path / name / "report" / "report.html").is_file()
    assert digests(tmp_path / "a" / METRICS_DIR) == digests(tmp_path / "b" / METRICS_DIR)


# ============================================================================ security
def test_model_weights_load_only_from_safetensors(tiny, tmp_path):
    """A model directory holding only a pickle checkpoint is refused before anything is unpickled."""
    from sae_core.models import load_model

    model = tmp_path / "pickled-model"
    shutil.copytree(tiny.model, model)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp_path / "UNPICKLED")))
    with pytest.raises(ValueError, match=r"has no \*.safetensors weights: it has only pytorch_model.bin.*unpickling can run code"):
        load_model(str(model), 1)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        run_extraction(tiny.cfg.extract.model_copy(update={"model": str(model)}), run, progress=False)
    assert published(run) == [] and not (tmp_path / "UNPICKLED").exists()


def test_remote_code_runs_only_when_the_config_opts_in(tiny, tmp_path):
    import json

    from sae_core.models import load_model

    model, marker = tmp_path / "custom-code-model", tmp_path / "REMOTE_CODE_RAN"
    shutil.copytree(tiny.model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom_bert", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                       "AutoModel": "modeling_custom.CustomModel"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nfrom transformers import BertConfig\n"
        "class CustomConfig(BertConfig):\n    model_type = 'custom_bert'\n")
    (model / "modeling_custom.py").write_text(
        "from transformers import BertModel\nfrom .configuration_custom import CustomConfig\n"
        "class CustomModel(BertModel):\n    config_class = CustomConfig\n")
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"ships its own Python code .* set `extract.trust_remote_code: true` only if you trust"):
        run_extraction(tiny.cfg.extract.model_copy(update={"model": str(model)}), run, progress=False)
    assert not marker.exists() and published(run) == []
    assert ExtractConfig().trust_remote_code is False
    loaded = load_model(str(model), 1, trust_remote_code=True)  # opted in: its code runs
    assert type(loaded.model).__name__ == "CustomModel" and marker.read_text() == "ran"
    # the opt-in is recorded in the manifest, so evaluate and downstream load the model the same way
    report = run_extraction(tiny.cfg.extract.model_copy(update={"model": str(model), "trust_remote_code": True}), run,
                            progress=False)
    assert report.manifest.trust_remote_code is True
    assert read_manifest(run / ACTIVATIONS_DIR).trust_remote_code is True


@pytest.mark.parametrize("name", [".", "..", ".hidden", "../elsewhere", "a/b", "/abs"])
def test_run_names_cannot_leave_the_runs_directory(tmp_path, name):
    from flows.configs import ConfigError

    path = tmp_path / "bad.yaml"
    path.write_text(f"name: {name!r}\n")
    with pytest.raises(ConfigError, match=r"top level: name: String should match pattern"):
        load_pipeline_config(path)


def test_artifact_names_cannot_point_outside_their_directory(reference, tmp_path):
    """Names read from artifacts (manifest shard files, ensemble members, stamp entries) and
    from the config (probing dataset names) never reach a path outside the run directory."""
    import json

    from tasks.labelled import probing_set
    from tasks.stage_state import clear_outputs, write_stamp

    acts = shutil.copytree(reference / ACTIVATIONS_DIR, tmp_path / "acts")
    manifest = json.loads((acts / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../../outside.parquet"
    (acts / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ContractViolation, match=r"shards\.0\.file: Value error, shard file '\.\./\.\./outside\.parquet' is not of the form"):
        validate(acts)

    ens = shutil.copytree(reference / MODELS_DIR / "bagging" / "run=0", tmp_path / "ens")
    meta = json.loads((ens / "ensemble.json").read_text())
    meta["members"][1] = "../../elsewhere"
    (ens / "ensemble.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"member names \['\.\./\.\./elsewhere'\] that are not plain subdirectory names"):
        load_ensemble(ens)

    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    (run / METRICS_DIR).mkdir(parents=True)
    (run / METRICS_DIR / "summary.parquet").write_text("x")
    victim.write_text("not the run's")
    write_stamp(run, "evaluate", "key", [])
    stamp = run / ".prefect" / "stamps" / "evaluate.json"
    data = json.loads(stamp.read_text())
    data["files"]["../victim.txt"] = [1, "0"]
    stamp.write_text(json.dumps(data))
    assert clear_outputs(run, "evaluate") == ["metrics/summary.parquet"]  # --force deletes only inside the run
    assert victim.read_text() == "not the run's"

    (tmp_path / "sub").mkdir()
    (tmp_path / "labels.csv").write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(TEXTS)))
    frame = probing_set(str(tmp_path / "sub" / ".." / "labels.csv"), 2, seed=0)
    label = frame["dataset"].iloc[0]
    assert "/" not in label and (run / "downstream" / "datasets" / f"probe_{label}.parquet").resolve().parent == (run / "downstream" / "datasets").resolve()
