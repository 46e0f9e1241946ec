"""Top-activating contexts: the table's contract, the rows against hand-made codes, the batched
encoding against the whole-split one, and the evaluate-stage writer on a tiny run directory."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import data_contracts
from data_contracts import ContractViolation, UnknownArtifact
from data_contracts.contexts import read_contexts, validate_contexts, write_contexts
from tasks import top_contexts as tc
from tasks.common import ModelDir

MODEL = "models/bagging/run=0"


def _valid() -> pd.DataFrame:
    rows = [
        (MODEL, 0, 5, 0.5, 1, 2.0, "d/1", 3, "a [[b]] c"),
        (MODEL, 0, 5, 0.5, 2, 1.0, "d/2", 0, "[[x]] y"),
        (MODEL, 2, 9, 0.125, 1, 0.25, "d/1", 1, "a [[b]]"),
    ]
    return pd.DataFrame(rows, columns=["model", "member", "latent", "frequency", "rank", "activation", "doc_id",
                                       "position", "context"])


# ------------------------------------------------------------------ the contract
def test_a_valid_table_round_trips_through_validate(tmp_path):
    path = tmp_path / "metrics" / "top_contexts.parquet"
    write_contexts(_valid(), path)
    assert data_contracts.artifact_kind(path) == "top_contexts"
    pd.testing.assert_frame_equal(data_contracts.validate(path), _valid().astype({"position": "int32"}))
    empty = _valid().iloc[:0]
    write_contexts(empty, path)  # no latent fired: an empty table is a valid answer
    assert read_contexts(path).empty


def _break(column: str, value, row: int = 0):
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.astype({column: object}) if value is None else frame
        frame.loc[row, column] = value
        return frame
    return edit


@pytest.mark.parametrize("edit, expectation", [
    (_break("context", None), "expect_column_values_to_not_be_null"),
    (_break("member", -1), "expect_column_values_to_be_between"),
    (_break("latent", -3), "expect_column_values_to_be_between"),
    (_break("frequency", 1.5, row=2), "expect_column_values_to_be_between"),
    (_break("activation", 0.0, row=2), "expect_column_values_to_be_between"),  # a context is where the latent fires
    (_break("rank", 0, row=2), "expect_column_values_to_be_between"),
    (_break("rank", 1, row=1), "expect_compound_columns_to_be_unique"),
    (_break("model", "bagging/run=0"), "expect_column_values_to_match_regex"),
    (_break("activation", 3.0, row=1), "activation falls with rank"),
    (_break("frequency", 0.25, row=1), "one frequency per latent"),
    (_break("activation", float("inf"), row=2), "finite values"),
    (lambda f: f.drop(columns="context"), "schema"),
])
def test_a_broken_table_is_not_written(tmp_path, edit, expectation):
    path = tmp_path / "top_contexts.parquet"
    with pytest.raises(ContractViolation) as err:
        write_contexts(edit(_valid()), path)
    assert expectation in {f.expectation for f in err.value.failures}
    assert str(path) in str(err.value) and not path.exists()


def test_a_file_with_a_wrong_column_type_fails_on_read(tmp_path):
    import pyarrow as pa

    from data_contracts.core import write_parquet_atomic

    path = tmp_path / "top_contexts.parquet"
    frame = _valid().astype({"latent": float})
    write_parquet_atomic(pa.Table.from_pandas(frame, preserve_index=False), path, "top_contexts")
    with pytest.raises(ContractViolation, match="latent: double"):
        data_contracts.validate(path)


def test_an_unknown_kind_is_its_own_violation(tmp_path):
    import pyarrow as pa

    from data_contracts.core import write_parquet_atomic

    path = tmp_path / "x.parquet"
    write_parquet_atomic(pa.table({"a": [1]}), path, "from_the_future")
    with pytest.raises(UnknownArtifact) as err:
        data_contracts.validate(path)
    assert err.value.kind == "from_the_future" and isinstance(err.value, ContractViolation)
    validate_contexts(_valid(), path)  # the frame-level check needs no file


# ------------------------------------------------------------------ the rows
def _tokens() -> pd.DataFrame:
    # two documents of 10 tokens each; token_id = 100 * doc + position
    rows = [(f"doc{d}", p, 100 * d + p) for d in range(2) for p in range(10)]
    return pd.DataFrame(rows, columns=["doc_id", "position", "token_id"])


def test_contexts_table_ranks_positive_codes_and_marks_the_token():
    tokens = _tokens()                                   # N = 20
    frequency = torch.zeros(1, 8, dtype=torch.float64)   # M = 1 member, d_sae = 8
    frequency[0, 3], frequency[0, 6] = 0.1, 0.05
    latents = torch.tensor([[3, 6]])                     # L = 2
    codes = torch.zeros(1, 20, 2)
    codes[0, 8, 0], codes[0, 12, 0] = 2.0, 5.0           # latent 3 fires at doc0 pos 8 and doc1 pos 2
    codes[0, 0, 1] = 1.5                                 # latent 6 fires once, at doc0 pos 0
    got = tc.contexts_table(MODEL, [2], frequency, latents, codes, tokens, contexts_per_latent=3, piece=lambda t: f"t{t}")
    assert got[["member", "latent", "rank", "activation", "doc_id", "position"]].values.tolist() == [
        [2, 3, 1, 5.0, "doc1", 2], [2, 3, 2, 2.0, "doc0", 8], [2, 6, 1, 1.5, "doc0", 0],  # zero codes are no contexts
    ]
    assert got["frequency"].tolist() == [0.1, 0.1, 0.05]
    # TOKENS_BEFORE = 6 before, TOKENS_AFTER = 2 after, clipped at the document's ends
    assert got["context"].tolist() == [
        "t100 t101 [[t102]] t103 t104",
        "t2 t3 t4 t5 t6 t7 [[t8]] t9",
        "[[t0]] t1 t2",
    ]
    validate_contexts(got, "hand-made")


def test_most_frequent_latents_break_ties_by_index():
    frequency = torch.tensor([[0.1, 0.3, 0.3, 0.0, 0.2]], dtype=torch.float64)
    assert tc.most_frequent_latents(frequency, 3).tolist() == [[1, 2, 4]]


@pytest.fixture(scope="module")
def bagging():
    from sae_core import SAEConfig, TrainConfig, train_bagging
    from sae_core.synthetic import make_sparse_dictionary_data

    data = make_sparse_dictionary_data(n_features=32, d=8, n_samples=1024, seed=3).activations
    cfg = SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2)
    train = TrainConfig(n_steps=10, batch_size=128, lr=3e-3, warmup_steps=0, b_dec_init_samples=256, log_every=10)
    return train_bagging(cfg, data, train, 3).ensemble.eval(), data[:300]


def test_batched_frequency_and_codes_equal_the_whole_split_ones(bagging, monkeypatch):
    ensemble, x = bagging
    with torch.inference_mode():
        dense = ensemble.member_codes(x)[[0, 2]]                   # [M=2, N=300, d_sae=16]
        monkeypatch.setattr(tc, "ENCODE_BATCH", 64)                 # 5 batches, the last one short
        frequency = tc.latent_frequency(ensemble, x, [0, 2])
        latents = tc.most_frequent_latents(frequency, 4)
        codes = tc.selected_codes(ensemble, x, [0, 2], latents)
    torch.testing.assert_close(frequency, (dense > 0).double().mean(1))
    torch.testing.assert_close(codes, torch.gather(dense, 2, latents[:, None, :].expand(-1, 300, -1)))


# ------------------------------------------------------------------ the writer
def _run_dir(tmp_path, ensemble, x: torch.Tensor):
    from data_contracts.activations import ActivationManifest, write_manifest, write_shard
    from sae_core.io import save_ensemble

    acts = tmp_path / "activations"
    n = x.shape[0]
    doc_ids = np.array([f"doc{i // 50}" for i in range(n)])
    position, token_id = np.arange(n) % 50, np.arange(n) % 50 + 10
    info = write_shard(acts, "test", 0, doc_ids, position, token_id, x.numpy(), "cfg")
    manifest = ActivationManifest(
        model="no-such-model", revision="r", layer=0, d=x.shape[1], tokenizer="t", vocab_size=100, context_length=64,
        include_special_tokens=False, corpus_fingerprint="c", config_fingerprint="cfg", tokens_per_split={"test": n},
        documents_per_split={"test": len(set(doc_ids))}, shards=[info], max_norm=1e4,
    )
    write_manifest(acts, manifest)
    save_ensemble(ensemble, ModelDir("bagging", 0).path(tmp_path))
    return tmp_path


def test_write_top_contexts_writes_the_contracted_table_of_bagging_run_0(tmp_path, bagging):
    ensemble, x = bagging
    run_dir = _run_dir(tmp_path, ensemble, x)
    assert tc.write_top_contexts(run_dir, "no-such-model", latents_per_member=2, contexts_per_latent=3) == "metrics/top_contexts.parquet"
    got = data_contracts.validate(run_dir / "metrics" / "top_contexts.parquet")
    assert set(got["model"]) == {MODEL} and got["member"].unique().tolist() == [0, 2]  # first and last member
    # against the codes of the whole split at once (the way the report used to compute them)
    with torch.inference_mode():
        dense = ensemble.member_codes(x)
    for j in (0, 2):
        mine = got[got["member"] == j]
        frequency = (dense[j] > 0).double().mean(0)
        assert mine["latent"].unique().tolist() == torch.argsort(frequency, descending=True, stable=True)[:2].tolist()
        for latent, rows in mine.groupby("latent"):
            top = torch.topk(dense[j, :, latent], 3)
            assert rows["activation"].tolist() == pytest.approx(top.values.tolist())
            assert rows["position"].tolist() == [i % 50 for i in top.indices.tolist()]
            assert rows["frequency"].tolist() == pytest.approx([float(frequency[latent])] * 3)
    assert got["context"].str.contains(r"\[\[#\d+\]\]").all()  # no tokenizer for "no-such-model": ids


def test_nothing_to_describe_returns_none_and_removes_a_stale_table(tmp_path, bagging):
    ensemble, x = bagging
    run_dir = _run_dir(tmp_path, ensemble, x)
    out = run_dir / "metrics" / "top_contexts.parquet"
    assert tc.write_top_contexts(run_dir, "no-such-model", latents_per_member=0, contexts_per_latent=3) is None
    assert not out.exists()
    tc.write_top_contexts(run_dir, "no-such-model", 1, 1)
    assert out.exists()
    import shutil

    shutil.rmtree(run_dir / "models")
    assert tc.write_top_contexts(run_dir, "no-such-model", 1, 1) is None and not out.exists()
    assert tc.write_top_contexts(tmp_path / "empty", "no-such-model", 1, 1) is None
