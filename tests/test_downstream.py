"""The downstream stage: labelled sets and their contracts, SCR splits, end to end on a tiny model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_contracts import ContractViolation, validate
from data_contracts.activations import load_split, write_shard
from data_contracts.core import write_parquet_atomic
from data_contracts.labelled import SCHEMAS, read_table, validate_frame, write_table
from sae_core import SAEConfig, TrainConfig, save_ensemble, train_bagging, train_boosting, train_expanded, train_single
from sae_core.extraction import ActivationBatch
from sae_core.io import load_ensemble
from sae_core.probing import pooled_codes, sparse_probe_accuracy
from tasks.common import ModelDir
from tasks.config import CorpusSource, DownstreamConfig, ExtractConfig
from tasks.downstream import BENCHMARK_FIGURE, PROBING_FIGURE, SCR_FIGURE, run_downstream
from tasks.extract import run_extraction
from tasks.extract_shards import document_blocks, write_batch_by_document
from tasks.labelled import CellTooSmall, split_quotas, bbc_paragraphs, pronoun_gender, probing_set, scr_set
from tests.tiny_models import TEXTS, build_tiny_model


# ------------------------------------------------------------------ labelled sets
def test_pronoun_gender():
    assert pronoun_gender("He said his team won.") == "male"
    assert pronoun_gender("She thanked her fans herself.") == "female"
    assert pronoun_gender("He met her.") is None  # mixed
    assert pronoun_gender("The shares rose; the hero left.") is None  # 'he' inside words does not count


@pytest.fixture(scope="module")
def paragraphs() -> pd.DataFrame:
    return bbc_paragraphs()


def test_scr_splits_have_the_intended_correlations(paragraphs):
    frame, cells = scr_set(("politics", "tech"), paragraphs, max_per_cell=30, min_cell=20, seed=0)
    biased = frame[frame["split"] == "train_biased"]
    assert (biased["y"] == biased["z"]).all() and set(biased["y"]) == {0, 1}
    for split in ("train_balanced", "test"):
        part = frame[frame["split"] == split]
        counts = part.groupby(["y", "z"]).size()
        assert len(counts) == 4 and counts.nunique() == 1
        assert np.corrcoef(part["y"], part["z"])[0, 1] == pytest.approx(0.0, abs=1e-12)
    # y is the topic, z the gender
    assert frame.groupby("label")["y"].nunique().max() == 1 and frame.groupby("spurious")["z"].nunique().max() == 1
    assert all(pronoun_gender(t) == g for t, g in zip(frame["text"], frame["spurious"]))
    # cells: politics/female 67, politics/male 1017, tech/female 43, tech/male 348. The diagonal with the larger
    # cells pairs tech with male (min(67, 348) = 67 > min(1017, 43) = 43): quotas t = min(30, 43 // 2, 67 // 3) = 21
    # per cell for test and for balanced train, b = min(30, 67 − 2·21) = 25 per diagonal cell for biased train
    c = cells.set_index(["label", "spurious"])
    assert c.loc[("tech", "female"), "available"] == 43 and c.loc[("politics", "female"), "available"] == 67
    assert c.loc[("tech", "male"), "z"] == 1 and c.loc[("politics", "female"), "z"] == 0
    assert (c["test"] <= 21).all() and (c["train_balanced"] <= 21).all() and c["test"].min() >= 15
    assert c.loc[("politics", "female"), "train_biased"] == c.loc[("tech", "male"), "train_biased"] > 15
    assert c.loc[("politics", "female"), "train_biased"] <= 25
    assert c.loc[("politics", "male"), "train_biased"] == 0 and c.loc[("tech", "female"), "train_biased"] == 0
    assert cells["test"].sum() == (frame["split"] == "test").sum()


def test_scr_splits_share_no_document(paragraphs):
    """Whole documents: every paragraph of an article sits in one split (the paragraphs of one
    article used to land in train and test), and no paragraph is in two splits."""
    frame, _ = scr_set(("entertainment", "sports"), paragraphs, max_per_cell=30, min_cell=20, seed=3)
    assert frame.groupby("document")["split"].nunique().max() == 1
    assert not frame["doc_id"].duplicated().any()
    assert (frame["document"] == frame["doc_id"].str.split("#").str[0]).all()
    # several articles contribute more than one paragraph: the constraint binds
    assert frame.groupby("document").size().max() > 1
    splits = {s: set(frame.loc[frame["split"] == s, "document"]) for s in ("train_biased", "train_balanced", "test")}
    assert not (splits["test"] & splits["train_biased"]) and not (splits["test"] & splits["train_balanced"])
    assert not (splits["train_biased"] & splits["train_balanced"])
    # the contract rejects a set whose splits share a document
    broken = frame.copy()
    row = broken.index[broken["split"] == "test"][0]
    broken.loc[row, "document"] = broken.loc[broken["split"] == "train_biased", "document"].iloc[0]
    with pytest.raises(ContractViolation, match="splits share no document"):
        validate_frame(broken, "labelled_scr", "scr.parquet")


def test_scrsplit_quotas_hand_case():
    """t = min(cap, smallest off-diagonal cell // 2, smallest diagonal cell // 3); b = min(cap, diagonal − 2t)."""
    assert split_quotas({(0, 0): 90, (0, 1): 40, (1, 0): 50, (1, 1): 60}, 100) == (20, 20)  # t = min(40 // 2, 60 // 3)
    assert split_quotas({(0, 0): 90, (0, 1): 40, (1, 0): 50, (1, 1): 60}, 10) == (10, 10)
    assert split_quotas({(0, 0): 31, (0, 1): 100, (1, 0): 100, (1, 1): 100}, 100) == (10, 11)  # 31 // 3, 31 − 20


def test_too_small_cell_names_the_pair_and_the_cell(paragraphs):
    with pytest.raises(CellTooSmall, match=r"SCR pair business-sports: cell \(business, female\) has 37 paragraphs.*scr_min_cell=40; choose another topic pair"):
        scr_set(("business", "sports"), paragraphs, max_per_cell=30, min_cell=40, seed=0)
    with pytest.raises(ValueError, match="unknown BBC topic"):
        scr_set(("business", "sport"), paragraphs, max_per_cell=30, min_cell=5, seed=0)


def test_probing_sets_are_balanced_and_seeded():
    bbc = probing_set("bbc", 7, seed=0)
    assert bbc.groupby(["split", "label"]).size().eq(7).all() and bbc["label"].nunique() == 5
    tweets = probing_set("tweets", 5, seed=0)
    assert sorted(tweets["label"].unique()) == ["negative", "positive"] and len(tweets) == 20
    assert probing_set("tweets", 5, seed=0).equals(tweets)
    assert not probing_set("tweets", 5, seed=1)["doc_id"].equals(tweets["doc_id"])


def test_contracts_reject_corrupted_tables(tmp_path, paragraphs):
    frame, cells = scr_set(("entertainment", "sports"), paragraphs, max_per_cell=10, min_cell=20, seed=0)
    write_table(frame, tmp_path / "scr.parquet", "labelled_scr")
    pd.testing.assert_frame_equal(validate(tmp_path / "scr.parquet"), frame, check_dtype=False)
    broken = frame.copy()
    row = broken.index[broken["split"] == "train_biased"][0]
    broken.loc[row, "z"] = 1 - broken.loc[row, "z"]
    with pytest.raises(ContractViolation, match="train_biased has y = z"):
        write_table(broken, tmp_path / "bad.parquet", "labelled_scr")
    assert not (tmp_path / "bad.parquet").exists()  # nothing published

    results = pd.DataFrame({"method": ["bagging", "bagging"], "n_members": [2, 2], "run": [0, 0], "dataset": ["bbc", "bbc"],
                            "class": ["tech", "tech"], "k": [1, 2], "accuracy": [0.9, 1.5]})
    # a table written around the contract (as a bug or a hand edit would) fails on read
    table = pa.Table.from_pandas(results, schema=SCHEMAS["probing_results"], preserve_index=False)
    write_parquet_atomic(table, tmp_path / "probing.parquet", "probing_results")
    with pytest.raises(ContractViolation) as err:
        validate(tmp_path / "probing.parquet")
    assert "probing.parquet" in str(err.value) and "accuracy" in str(err.value) and "1.5" in str(err.value)
    dup = results.assign(accuracy=[0.9, 0.8], k=[1, 1])
    with pytest.raises(ContractViolation, match="unique"):
        write_table(dup, tmp_path / "p2.parquet", "probing_results")
    nan = pd.DataFrame({"method": ["raw"], "n_members": [0], "run": [0], "pair": ["a-b"], "n_ablated": [2], "acc_base": [0.5],
                        "acc_ablated": [0.6], "acc_oracle": [0.9], "score": [float("nan")]})
    with pytest.raises(ContractViolation, match="finite"):
        write_table(nan, tmp_path / "s.parquet", "scr_results")


# ------------------------------------------------------------------ token shards
VOCAB, MAX_NORM = 100, 1e3


def _batch(rows_per_doc: list[int], d: int = 4, seed: int = 0) -> ActivationBatch:
    """Rows in document order; positions 1..n within each document."""
    rng = np.random.default_rng(seed)
    doc_index = np.repeat(np.arange(len(rows_per_doc)), rows_per_doc).astype(np.int64)
    position = np.concatenate([np.arange(1, n + 1) for n in rows_per_doc]).astype(np.int32)
    n = len(doc_index)
    return ActivationBatch(doc_index, position, rng.integers(0, VOCAB, n).astype(np.int32), rng.normal(size=(n, d)).astype(np.float32))


def _shards_before_the_split(directory: Path, doc_ids: np.ndarray, batch: ActivationBatch, per_shard: int, fingerprint: str):
    """The shard loop tasks/downstream.py had before it used the extract stage's writer (verbatim)."""
    shards = []
    bounds = np.searchsorted(batch.doc_index, np.arange(0, len(doc_ids) + per_shard, per_shard))
    for i in range(len(bounds) - 1):
        sel = slice(bounds[i], bounds[i + 1])
        if bounds[i] == bounds[i + 1]:
            continue
        shards.append(
            write_shard(directory, "train", len(shards), doc_ids[batch.doc_index[sel]], batch.position[sel], batch.token_id[sel],
                        batch.activation[sel], fingerprint, validate=(VOCAB, MAX_NORM))
        )
    return shards


@pytest.mark.parametrize("rows_per_doc", [[2, 1, 3, 1, 1, 2, 4], [2, 1, 1, 0, 0, 0, 3], [5], [1, 1, 1]])
def test_shards_by_document_are_the_old_shards_byte_for_byte(tmp_path, rows_per_doc):
    """Blocks of 3 documents; a block whose documents have no rows (second case) writes no shard."""
    doc_ids = np.array([f"doc{i:02d}" for i in range(len(rows_per_doc))], dtype=object)
    batch = _batch(rows_per_doc)
    old = _shards_before_the_split(tmp_path / "old", doc_ids, batch, 3, "fp")
    new = write_batch_by_document(tmp_path / "new", "train", doc_ids, batch, 3, "fp", validate=(VOCAB, MAX_NORM))
    assert new == old
    for info in new:
        assert (tmp_path / "new" / info.file).read_bytes() == (tmp_path / "old" / info.file).read_bytes()
    # the shards hold every row once, in order, with at most 3 documents each
    tables = [pq.read_table(tmp_path / "new" / info.file).to_pandas() for info in new]
    assert [t["doc_id"].nunique() for t in tables] == [info.documents for info in new] and all(i.documents <= 3 for i in new)
    rows = pd.concat(tables, ignore_index=True)
    assert rows["doc_id"].tolist() == doc_ids[batch.doc_index].tolist()
    np.testing.assert_array_equal(np.stack(rows["activation"].to_numpy()), batch.activation)


def test_document_blocks_are_the_extraction_plan_chunks():
    """The extract stage's former chunking: rows[i : i + n] for i in range(0, len(rows), n)."""
    for n_docs in range(0, 11):
        rows = np.arange(100, 100 + n_docs)
        for per_shard in (1, 2, 3, 4, 10, 11):
            old = [rows[i : i + per_shard] for i in range(0, len(rows), per_shard)]
            new = [rows[block] for block in document_blocks(n_docs, per_shard)]
            assert len(new) == len(old) and all(np.array_equal(a, b) for a, b in zip(new, old))


# ----------------------------------------------------------------------- end to end
SMALL = dict(
    probing_datasets=["bbc", "tweets"], probing_ks=[1, 2], max_documents_per_class=4, max_tokens_per_document=12,
    sae_probes_max_tokens=6, scr_pairs=[("entertainment", "sports")],
    scr_n_ablated=[1, 4], scr_min_cell=10, scr_max_documents_per_cell=6, batch_size=16,
    sae_probes_tasks=["glue_sst2", "5_hist_fig_ismale"], sae_probes_documents_per_class=4,
    scr_sae_probes=[("hist_fig_ismale", "hist_fig_isamerican")], scr_planted=[], scr_min_headroom=0.0,
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run dir: a tiny BERT's activations, then single, expanded_J2, bagging (2 runs) and boosting."""
    root = tmp_path_factory.mktemp("downstream")
    model = build_tiny_model(root / "bert", "bert", d=32)
    corpus = root / "docs.txt"
    corpus.write_text("\n".join(f"{t} {TEXTS[(i + 2) % 5]}" for i, t in enumerate(TEXTS * 2)) + "\n")
    run = root / "run"
    run_extraction(ExtractConfig(model=str(model), layer=1, context_length=16, batch_size=8, corpus=[CorpusSource(name=str(corpus))],
                                 split_fractions={"train": 0.8, "val": 0.1, "test": 0.1}), run, progress=False)
    acts = torch.from_numpy(load_split(run / "activations", "train"))
    cfg = SAEConfig(architecture="topk", d_in=32, d_sae=16, k=4)
    recipe = TrainConfig(n_steps=8, batch_size=64, lr=3e-3, b_dec_init="mean")
    for r in (0, 1):
        rc = recipe.model_copy(update={"seed": r})
        save_ensemble(train_bagging(cfg, acts, rc, 2).ensemble, ModelDir("bagging", r).path(run))
    save_ensemble(train_boosting(cfg, acts, recipe, 2).ensemble, ModelDir("boosting", 0).path(run))
    save_ensemble(train_single(cfg, acts, recipe).ensemble, ModelDir("single", 0).path(run))
    save_ensemble(train_expanded(cfg, acts, recipe, 2).ensemble, ModelDir("expanded", 0, matched_j=2).path(run))
    start = time.perf_counter()
    result = run_downstream(DownstreamConfig(**SMALL), run, progress=False)
    return run, result, time.perf_counter() - start


def test_run_downstream_tables(trained_run):
    run, result, seconds = trained_run
    probing = validate(run / "downstream" / "probing.parquet")
    scr = validate(run / "downstream" / "scr.parquet")
    cells = validate(run / "downstream" / "scr_cells.parquet")
    keys = set(map(tuple, probing[["method", "n_members", "run"]].drop_duplicates().to_numpy().tolist()))
    assert keys == {("raw", 0, 0), ("single", 1, 0), ("expanded", 2, 0), ("bagging", 1, 0), ("bagging", 2, 0),
                    ("bagging", 1, 1), ("bagging", 2, 1), ("boosting", 1, 0), ("boosting", 2, 0)}
    # per dictionary: bbc 5 classes + tweets 1 task + 2 sae-probes tasks (one probe each), k ∈ {1, 2};
    # raw also has the dense probe (k = d = 32)
    per_key = probing.groupby(["method", "n_members", "run"]).size()
    assert (per_key.drop(("raw", 0, 0)) == 8 * 2).all() and per_key[("raw", 0, 0)] == 8 * 3
    assert set(probing.loc[probing["method"] == "raw", "k"]) == {1, 2, 32}
    assert probing["accuracy"].between(0, 1).all()
    assert {"sae_probes.glue_sst2", "sae_probes.hist_fig_ismale"} <= set(probing["dataset"])
    benchmark = validate(run / "downstream" / "datasets" / "probe_sae_probes.parquet")  # every task in one file
    assert set(benchmark["dataset"]) == {"sae_probes.glue_sst2", "sae_probes.hist_fig_ismale"}
    sst2 = benchmark[benchmark["dataset"] == "sae_probes.glue_sst2"]
    assert sst2.groupby(["split", "label"]).size().eq(4).all() and sorted(sst2["label"].unique()) == ["0", "1"]
    # sae-probes texts keep at most sae_probes_max_tokens = 6 tokens, the others max_tokens_per_document = 12
    tokens = pq.read_table(run / "downstream" / "activations" / "split=train" / "shard-00000.parquet", columns=["doc_id"]).to_pandas()
    per_doc = tokens.groupby("doc_id").size()
    is_benchmark = per_doc.index.str.startswith("sae_probes.")
    assert per_doc[is_benchmark].max() == 6 and per_doc[~is_benchmark].max() == 12
    # SCR: every pair in the pair table; only those with headroom ≥ scr_min_headroom are scored
    pairs = validate(run / "downstream" / "scr_pairs.parquet").set_index("pair")
    assert set(pairs.index) == {"entertainment-sports", "hist_fig_ismale-vs-hist_fig_isamerican"}
    assert (pairs["conditioned"] == (pairs["acc_oracle"] - pairs["acc_base"] >= 0)).all() and pairs["conditioned"].any()
    assert set(scr["pair"]) == set(pairs.index[pairs["conditioned"]])
    # the probes depend only on the activations, so A_base and A_oracle are shared by every method
    assert len(scr) == 9 * 2 * pairs["conditioned"].sum()
    for pair, rows in scr.groupby("pair"):
        assert rows["acc_base"].nunique() == 1 and rows["acc_base"].iloc[0] == pytest.approx(pairs.loc[pair, "acc_base"])
        gap = np.maximum(rows["acc_oracle"] - rows["acc_base"], 1 / pairs.loc[pair, "n_test"])
        np.testing.assert_allclose(rows["score"], (rows["acc_ablated"] - rows["acc_base"]) / gap)
    assert set(cells["pair"]) == set(pairs.index) and (cells["train_balanced"] == cells["test"]).all()
    assert (cells["test"] <= 6).all() and (cells.groupby("pair")["train_biased"].apply(lambda v: sorted(v)[:2]) == [[0, 0]] * 2).all()
    assert (run / PROBING_FIGURE).stat().st_size > 1000 and (run / SCR_FIGURE).stat().st_size > 1000
    assert (run / BENCHMARK_FIGURE).stat().st_size > 1000
    assert any("entertainment-sports" in n for n in result.notes) and result.did_work
    assert seconds < 60


def test_run_downstream_numbers_match_a_direct_computation(trained_run):
    """The bagging J=1 prefix rows equal probing the codes of ``prefix(1)`` encoded directly."""
    run, _, _ = trained_run
    probing = validate(run / "downstream" / "probing.parquet")
    data = validate(run / "downstream" / "datasets" / "probe_tweets.parquet")
    tokens = pq.read_table(run / "downstream" / "activations" / "split=train" / "shard-00000.parquet").to_pandas()
    ids = data["doc_id"].tolist()
    tokens = tokens[tokens["doc_id"].isin(ids)]
    index = tokens["doc_id"].map({d: i for i, d in enumerate(ids)}).to_numpy().copy()
    acts = torch.tensor(np.stack(tokens["activation"].to_numpy()))
    ens = load_ensemble(ModelDir("bagging", 1).path(run)).prefix(1)
    codes = pooled_codes(ens, acts, index, len(ids)).numpy()
    tr, te = (data["split"] == "train").to_numpy(), (data["split"] == "test").to_numpy()
    direct = sparse_probe_accuracy(codes[tr], data["label"][tr], codes[te], data["label"][te], [1, 2], seed=0)
    got = probing[(probing["method"] == "bagging") & (probing["n_members"] == 1) & (probing["run"] == 1) & (probing["dataset"] == "tweets")]
    assert sorted(got["accuracy"].tolist()) == pytest.approx(sorted(r.accuracy for r in direct))


def test_rerun_does_no_work_and_a_changed_model_recomputes(trained_run):
    run, first, _ = trained_run
    before = read_table(run / "downstream" / "probing.parquet")
    start = time.perf_counter()
    again = run_downstream(DownstreamConfig(**SMALL), run, progress=False)
    assert not again.did_work and again.written == []
    assert read_table(run / "downstream" / "probing.parquet").equals(before)
    assert time.perf_counter() - start < 20
    # a different config recomputes the tables but reuses the cached token activations
    changed = run_downstream(DownstreamConfig(**{**SMALL, "probing_ks": [1]}), run, progress=False)
    assert changed.did_work and "downstream/activations" not in changed.written
    assert set(read_table(run / "downstream" / "probing.parquet").query("method != 'raw'")["k"]) == {1}


def test_a_model_directory_without_ensemble_json_is_skipped(trained_run):
    """An interrupted training leaves a directory without ensemble.json: not a model yet."""
    run, _, _ = trained_run
    run_downstream(DownstreamConfig(**SMALL), run, progress=False)  # up to date, whatever ran before
    partial = ModelDir("boosting", 7).path(run)
    partial.mkdir(parents=True)
    try:
        again = run_downstream(DownstreamConfig(**SMALL), run, progress=False)
        assert not again.did_work and "models/boosting/run=7" not in again.read
        assert again.read[:2] == ["activations/manifest.json", "models/bagging/run=0"]
    finally:
        partial.rmdir()
