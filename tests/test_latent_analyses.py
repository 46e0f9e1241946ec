"""Latent analyses (issue 21): monosemanticity, concept cones, the sparse head, steering, and
their stage wrapper, contracts and report sections. Hand-built cases, tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sae_core.cones import cone_fit, random_dictionary
from sae_core.monosemanticity import bootstrap_mean_ci, minmax_normalise, monosemanticity, monosemanticity_pairwise
from sae_core.sparse_head import fit_sparse_head
from sae_core.steering import added_to_output, greedy_generate, steered_generate
from tests.tiny_models import build_tiny_model


# --------------------------------------------------------------------------- monosemanticity
def test_minmax_normalise_by_hand():
    a = np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]])
    np.testing.assert_allclose(minmax_normalise(a), [[0.0, 0.0], [1.0, 0.0], [0.5, 0.0]])


def test_monosemanticity_hand_computed_case():
    # three contexts: e0 = e1 = x-axis, e2 = y-axis; latent fires 1, 1, 0.5 (min 0 added by a 4th context)
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    acts = np.array([[1.0], [1.0], [0.5], [0.0]])
    # ã = (1, 1, .5, 0); pairs with weight: (0,1) w=1 s=1; (0,2) w=.5 s=0; (1,2) w=.5 s=0 -> 1 / 2
    assert monosemanticity(acts, emb)[0] == pytest.approx(0.5)
    assert monosemanticity_pairwise(acts, emb)[0] == pytest.approx(0.5)


def test_monosemanticity_fast_form_equals_pairwise_sum():
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.standard_normal((40, 7)), 0)
    acts[:, 3] = 0.0                      # dead: undefined
    acts[:, 4] = 0.0
    acts[5, 4] = 2.0                      # fires once: undefined
    emb = rng.standard_normal((40, 6))
    fast, slow = monosemanticity(acts, emb), monosemanticity_pairwise(acts, emb)
    np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=1e-12)
    assert np.isnan(fast[3]) and np.isnan(fast[4]) and np.isfinite(np.delete(fast, [3, 4])).all()


def test_one_topic_latent_scores_higher_than_mixed_topic_latent():
    rng = np.random.default_rng(1)
    topics = rng.standard_normal((4, 16))
    topic_of = np.repeat(np.arange(4), 10)                           # 40 contexts, 10 per topic
    emb = topics[topic_of] + 0.3 * rng.standard_normal((40, 16))
    one_topic = np.where(topic_of == 2, rng.uniform(1, 2, 40), 0.0)  # fires on topic 2 only
    mixed = np.zeros(40)
    mixed[rng.choice(40, 10, replace=False)] = rng.uniform(1, 2, 10)
    mixed[[0, 10, 20, 30]] = 1.5                                     # at least once on every topic
    scores = monosemanticity(np.stack([one_topic, mixed], 1), emb)
    assert scores[0] > 0.8 and scores[0] > scores[1] + 0.3


def test_bootstrap_mean_ci_contains_mean_and_drops_nan():
    mean, low, high = bootstrap_mean_ci(np.array([0.1, 0.2, np.nan, 0.3, 0.4]), resamples=500)
    assert mean == pytest.approx(0.25) and low < mean < high
    with pytest.raises(ValueError, match="no finite value"):
        bootstrap_mean_ci(np.array([np.nan]))


# --------------------------------------------------------------------------- cones
def test_planted_direction_in_the_cone_has_zero_residual():
    D = random_dictionary(64, 16, seed=0)
    w = 0.7 * D[3] + 0.2 * D[10] + 0.5 * D[40]
    fit = cone_fit(w, D, candidates=64)
    assert fit.residual == pytest.approx(0.0, abs=1e-8) and fit.containment == pytest.approx(1.0)
    assert set(fit.atoms.tolist()) == {3, 10, 40} and fit.n_atoms == 3


def test_direction_outside_the_cone_has_a_residual():
    D = np.eye(4)                                          # the cone is the positive orthant
    assert cone_fit(-D[0], D, candidates=4).containment == pytest.approx(0.0)
    fit = cone_fit(D[0] - D[1], D, candidates=4)           # 45° from the cone's face
    assert fit.residual**2 == pytest.approx(0.5) and fit.containment == pytest.approx(0.5)
    assert fit.atoms.tolist() == [0]
    only_two = cone_fit(D[0] + D[1] + D[2], D, candidates=2)   # s caps the atoms offered
    assert only_two.containment == pytest.approx(2 / 3) and only_two.n_atoms == 2


def test_batched_fits_with_partial_selection_equal_single_fits_on_the_sorted_top_s():
    from scipy.optimize import nnls

    from sae_core.cones import cone_fits

    rng = np.random.default_rng(4)
    D = random_dictionary(40, 8, seed=5)
    D = np.concatenate([D, D[:10]])                    # duplicated rows: tied cosines across the top-s boundary
    directions = rng.standard_normal((6, 8))
    for s in (1, 5, 12, 50):
        for w, fit in zip(directions, cone_fits(directions, 3.0 * D, s)):
            u = w / np.linalg.norm(w)
            cosine = D @ u
            top = np.lexsort((np.arange(len(D)), -cosine))[:s]          # the slow twin: sort everything
            alpha, residual = nnls(D[top].T, u)
            assert fit.residual == pytest.approx(min(residual, 1.0), abs=1e-12)
            used = top[alpha > 1e-9 * max(1.0, alpha.max())]
            # a duplicated row may stand in for its twin (rounding decides the tie): compare rows, not indices
            assert {i % 40 for i in fit.atoms.tolist()} == {i % 40 for i in used.tolist()}


def test_cone_fit_clear_errors():
    with pytest.raises(ValueError, match="zero"):
        cone_fit(np.zeros(4), np.eye(4), 2)
    with pytest.raises(ValueError, match="dimensions"):
        cone_fit(np.ones(3), np.eye(4), 2)


# --------------------------------------------------------------------------- sparse head
def _planted_codes(seed: int = 0, n: int = 200, m: int = 50):
    rng = np.random.default_rng(seed)
    z = np.maximum(rng.standard_normal((n, m)), 0)
    y = (2 * z[:, 3] - 1.5 * z[:, 7] + 0.1 * rng.standard_normal(n) > 0.3).astype(int)
    return z, y


def test_sparse_head_finds_the_planted_latents():
    z, y = _planted_codes()
    head = fit_sparse_head(z, y, l1=0.05, steps=500)
    assert set(head.top(2).tolist()) == {3, 7}
    assert head.coef[3] > 0 > head.coef[7]
    assert head.n_nonzero <= 6 and head.accuracy(z, y) > 0.9


def test_sparse_head_matches_scikit_learn_l1_logistic():
    from sklearn.linear_model import LogisticRegression

    z, y = _planted_codes(seed=1, n=120, m=12)
    lam = 0.02
    head = fit_sparse_head(z, y, l1=lam, steps=5000)
    x = (z - head.mean) / head.scale
    # sklearn minimises ‖w‖₁ + C Σ loss; ours (1/N) Σ loss + λ‖w‖₁ -> C = 1/(Nλ)
    ref = LogisticRegression(l1_ratio=1.0, C=1 / (len(y) * lam), solver="saga", tol=1e-9, max_iter=100_000).fit(x, y)
    np.testing.assert_allclose(head.coef, ref.coef_[0], atol=2e-3)
    assert head.intercept == pytest.approx(float(ref.intercept_[0]), abs=2e-3)


def test_sparse_head_clear_errors():
    with pytest.raises(ValueError, match="labels 0 and 1"):
        fit_sparse_head(np.ones((4, 2)), np.ones(4), l1=0.1)


# --------------------------------------------------------------------------- steering
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def tiny_llama(llama_dir):
    from sae_core.models import load_model

    return load_model(str(llama_dir), 1, causal_lm=True)


def test_steering_hook_adds_exactly_alpha_d_to_the_residual_stream(tiny_llama):
    model, ids = tiny_llama.model, torch.tensor([[2, 5, 6, 7, 8]])
    captured = {}
    handle = tiny_llama.block.register_forward_hook(lambda m, a, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    handle.remove()
    direction, alpha = torch.randn(tiny_llama.d_model, generator=torch.Generator().manual_seed(0)), 3.0
    with torch.no_grad(), added_to_output(tiny_llama.block, alpha * direction):
        steered = model(input_ids=ids).logits
        # manual forward: block 1's output plus α·d, then blocks 2.., the final norm and the head
        x = captured["h"] + alpha * direction
        positions = torch.arange(ids.shape[1])[None]
        rotary = model.model.rotary_emb(x, positions)
        for layer in model.model.layers[tiny_llama.layer + 1:]:
            out = layer(x, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            x = out[0] if isinstance(out, tuple) else out
        manual = model.lm_head(model.model.norm(x))
    torch.testing.assert_close(steered, manual, rtol=1e-5, atol=1e-5)
    assert (steered - plain).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)   # the hook is gone


def test_cached_generation_equals_the_recomputed_one_with_and_without_steering(tiny_llama):
    model, block, prompt = tiny_llama.model, tiny_llama.block, [2, 5, 6]
    direction = torch.randn(tiny_llama.d_model, generator=torch.Generator().manual_seed(2))
    assert greedy_generate(model, prompt, 10) == greedy_generate(model, prompt, 10, use_cache=False)
    with added_to_output(block, 5.0 * direction):
        steered = greedy_generate(model, prompt, 10)
        assert steered == greedy_generate(model, prompt, 10, use_cache=False)
    assert steered != greedy_generate(model, prompt, 10)


def test_alpha_zero_reproduces_the_plain_generation_and_a_large_alpha_changes_it(tiny_llama):
    model, prompt = tiny_llama.model, [2, 5, 6]
    plain = greedy_generate(model, prompt, 8)
    assert len(plain) == 8
    direction = torch.randn(tiny_llama.d_model, generator=torch.Generator().manual_seed(1))
    assert steered_generate(model, tiny_llama.block, direction, 0.0, prompt, 8) == plain
    assert steered_generate(model, tiny_llama.block, direction, 50.0, prompt, 8) != plain


def test_context_texts_stay_in_their_document_and_window(llama_dir):
    from transformers import AutoTokenizer

    from tasks.latent_monosemanticity import CONTEXT_AFTER, CONTEXT_BEFORE, context_texts

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    first, second = tokenizer("the market rose as shares in the bank gained on strong profits", add_special_tokens=False)["input_ids"], \
        tokenizer("the striker scored twice", add_special_tokens=False)["input_ids"]
    where = pd.DataFrame({"doc_id": ["a"] * len(first) + ["b"] * len(second), "position": [*range(len(first)), *range(len(second))],
                          "token_id": first + second})
    assert (CONTEXT_BEFORE, CONTEXT_AFTER) == (8, 2)
    texts = context_texts(where, np.array([0, 10, len(first) - 1, len(first)]), tokenizer)
    assert texts == ["the market rose", "rose as shares in the bank gained on strong profits",
                     "as shares in the bank gained on strong profits",
                     "the striker scored"]


# --------------------------------------------------------------------------- the contracts
def _cones_row(**change) -> dict:
    row = {"method": "bagging", "model": "models/bagging/run=0", "run": 0, "n_members": 1, "concept": "bbc:sport",
           "dictionary": "sae", "draw": 0, "candidates": 8, "containment": 0.75, "residual": 0.5, "n_atoms": 3}
    return row | change


@pytest.mark.parametrize("kind, frame, expectation", [
    ("concept_cones", pd.DataFrame([_cones_row(containment=0.5)]), "containment = 1 − residual²"),
    ("concept_cones", pd.DataFrame([_cones_row(dictionary="other")]), "expect_column_values_to_be_in_set"),
    ("concept_cones", pd.DataFrame([_cones_row(model="bagging")]), "expect_column_values_to_match_regex"),
    ("latent_monosemanticity", pd.DataFrame([{"method": "bagging", "model": "models/bagging/run=0", "member": 0, "latent": 1,
                                              "n_active": 3, "score": 1.5}]), "expect_column_values_to_be_between"),
    ("steering", pd.DataFrame([{"model": "models/bagging/run=0", "member": 0, "latent": 1, "prompt": "p", "strength": 0.0,
                                "norm": 0.0, "generation": "x", "changed": True}]), "strength 0 adds nothing"),
])
def test_a_broken_latent_table_is_not_written(tmp_path, kind, frame, expectation):
    from data_contracts import ContractViolation
    from data_contracts.latents import write_latent_table

    with pytest.raises(ContractViolation, match=expectation):
        write_latent_table(frame, tmp_path / "t.parquet", kind)
    assert not (tmp_path / "t.parquet").exists()


def test_undefined_monosemanticity_is_null_and_round_trips(tmp_path):
    from data_contracts.latents import read_latent_table, write_latent_table

    frame = pd.DataFrame({"method": ["neurons", "neurons"], "model": ["activations"] * 2, "member": [0, 0], "latent": [0, 1],
                          "n_active": [1, 5], "score": [np.nan, 0.25]})
    write_latent_table(frame, tmp_path / "m.parquet", "latent_monosemanticity")
    got = read_latent_table(tmp_path / "m.parquet")
    assert np.isnan(got["score"][0]) and got["score"][1] == 0.25


# --------------------------------------------------------------------------- the stage's job on a tiny run
TOPICS = ["business", "sport", "politics", "film", "tech"]   # the five texts of tests.tiny_models.TEXTS, in order


def _residual_tokens(loaded, texts) -> tuple[list[str], list[int], list[int], np.ndarray]:
    """Each text's tokens through the loaded model (doc ids doc00, doc01, …; positions after the prefix) and
    their residual-stream activations [tokens, d] at the loaded layer."""
    from sae_core.models import residual_stream

    doc_ids, positions, token_ids, acts = [], [], [], []
    for n, text in enumerate(texts):
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        h = residual_stream(loaded, torch.tensor([loaded.prefix_ids + ids]), torch.ones(1, len(ids) + 1, dtype=torch.long))
        acts.append(h[0, 1:].numpy())
        doc_ids += [f"doc{n:02d}"] * len(ids)
        positions += list(range(1, len(ids) + 1))
        token_ids += ids
    return doc_ids, positions, token_ids, np.concatenate(acts).astype(np.float32)


def _write_tokens(directory: Path, split: str, doc_ids, positions, token_ids, acts: np.ndarray, model: str) -> None:
    from data_contracts.activations import ActivationManifest, write_manifest, write_shard

    info = write_shard(directory, split, 0, np.array(doc_ids), np.array(positions), np.array(token_ids), acts, "cfg")
    manifest = ActivationManifest(
        model=model, revision="r", layer=1, d=acts.shape[1], tokenizer="t", vocab_size=200, context_length=64,
        include_special_tokens=False, corpus_fingerprint="c", config_fingerprint="cfg",
        tokens_per_split={s: (len(doc_ids) if s == split else 0) for s in ("train", "val", "test")},
        documents_per_split={s: (len(set(doc_ids)) if s == split else 0) for s in ("train", "val", "test")},
        shards=[info], max_norm=1e4,
    )
    write_manifest(directory, manifest)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, llama_dir) -> Path:
    """A run directory built from the tiny Llama's real residual stream at layer 1 on the 20 texts
    of tests.tiny_models: the test split, bagging and boosting (J = 2) trained on it, and a
    labelled probing set (the texts' five topics) with its token cache, as downstream writes them."""
    from data_contracts.labelled import write_table
    from sae_core import SAEConfig, TrainConfig, save_ensemble, train_bagging, train_boosting
    from sae_core.models import load_model
    from tasks.common import ModelDir
    from tests.tiny_models import TEXTS

    run_dir = tmp_path_factory.mktemp("run")
    loaded = load_model(str(llama_dir), 1)
    doc_ids, positions, token_ids, x = _residual_tokens(loaded, TEXTS)
    _write_tokens(run_dir / "activations", "test", doc_ids, positions, token_ids, x, str(llama_dir))
    data = torch.from_numpy(x)
    cfg = SAEConfig(architecture="topk", d_in=x.shape[1], d_sae=16, k=3)
    train = TrainConfig(n_steps=20, batch_size=64, lr=3e-3, warmup_steps=0, b_dec_init_samples=64, log_every=20)
    save_ensemble(train_bagging(cfg, data, train, 2).ensemble.eval(), ModelDir("bagging", 0).path(run_dir))
    save_ensemble(train_boosting(cfg, data, train, 2).ensemble.eval(), ModelDir("boosting", 0).path(run_dir))
    docs = pd.DataFrame({"doc_id": [f"doc{n:02d}" for n in range(20)], "dataset": "topics", "text": TEXTS,
                         "label": [TOPICS[n % 5] for n in range(20)], "split": ["train"] * 10 + ["test"] * 10})
    write_table(docs, run_dir / "downstream" / "datasets" / "probe_topics.parquet", "labelled_probing")
    _write_tokens(run_dir / "downstream" / "activations", "train", doc_ids, positions, token_ids, x, str(llama_dir))
    return run_dir


def _analyses_cfg(embedder: Path, **steering):
    from tasks.config_latent import LatentAnalysisConfig

    return LatentAnalysisConfig.model_validate({
        "monosemanticity": {"eval_contexts": 60, "embedding_model": str(embedder), "baseline_directions": 4},
        "cones": {"candidates": 6, "random_dictionaries": 2, "max_concepts": 2},
        "sparse_head": {"l1": 0.02, "steps": 100, "top_latents": 3, "max_concepts": 2},
        "steering": {"n_latents": 1, "strengths": [0.0, 30.0], "prompts": ["the team"], "max_new_tokens": 4} | steering,
    })


def test_run_latent_analyses_writes_every_contracted_table_and_the_report_shows_them(tiny_run, llama_dir, tmp_path):
    from data_contracts.latents import read_latent_table
    from sae_core.steering import greedy_generate
    from sae_core.models import load_model
    from tasks.latent_analyses import ALL_FILES, run_latent_analyses
    from tasks.report_doc import Document
    from tasks.report_latents import latent_sections

    embedder = build_tiny_model(tmp_path / "bert", "bert")   # a separate encoder: not the analysed model
    explanations = pd.DataFrame({"model": ["models/bagging/run=0"] * 2, "member": [1, 0], "latent": [3, 5],
                                 "explanation": ["sport", "money"], "detection_accuracy": [0.9, 0.6]})
    written = run_latent_analyses(tiny_run, _analyses_cfg(embedder), explanations, progress=False)
    assert sorted(written) == sorted(ALL_FILES)
    tables = {rel: read_latent_table(tiny_run / rel) for rel in written}
    import data_contracts

    for rel in written:  # the generic validator knows every kind (as the report and `validate(path)` by hand use it)
        assert data_contracts.validate(tiny_run / rel).equals(tables[rel]), rel

    mono = tables["latents/monosemanticity.parquet"]
    assert mono.groupby("method").size().to_dict() == {"bagging": 32, "boosting": 32, "neurons": 32, "random_directions": 4}
    assert mono["score"].notna().sum() > 40

    cones = tables["latents/cones.parquet"]
    assert set(cones["concept"]) == {"topics:business", "topics:film"}
    assert set(zip(cones["method"], cones["n_members"])) == {("bagging", 1), ("bagging", 2), ("boosting", 1), ("boosting", 2)}
    assert (cones["dictionary"] == "random").sum() == 2 * 4 * 2 and (cones["n_atoms"] <= 6).all()

    heads = tables["latents/sparse_head.parquet"]
    assert len(heads) == 2 * 2 and (heads["n_features"] == 32).all() and (heads["n_test"] == 4).all()
    assert set(tables["latents/sparse_head_latents.parquet"]["explanation"]) <= {"", "sport", "money"}

    steering = tables["latents/steering.parquet"]
    assert set(zip(steering["member"], steering["latent"])) == {(1, 3)}     # the best-explained latent
    loaded = load_model(str(llama_dir), 1, causal_lm=True)
    ids = loaded.prefix_ids + loaded.tokenizer("the team", add_special_tokens=False)["input_ids"]
    plain = loaded.tokenizer.decode(greedy_generate(loaded.model, ids, 4, loaded.tokenizer.eos_token_id), skip_special_tokens=True)
    assert steering.loc[steering["strength"] == 0, "generation"].tolist() == [plain]

    text = Document("t", latent_sections(tiny_run)).to_markdown(tiny_run)
    for heading in ("### Monosemanticity", "### Concept cones", "### Sparse interpretable head", "### Steering"):
        assert heading in text

    # an analysis switched off leaves no stale table behind
    off = _analyses_cfg(embedder).model_copy(update={"monosemanticity": _analyses_cfg(embedder).monosemanticity.model_copy(
        update={"enabled": False}), "cones": _analyses_cfg(embedder).cones.model_copy(update={"enabled": False}),
        "sparse_head": _analyses_cfg(embedder).sparse_head.model_copy(update={"enabled": False})})
    assert run_latent_analyses(tiny_run, off, None, progress=False) == ["latents/steering.parquet"]
    assert not (tiny_run / "latents" / "monosemanticity.parquet").exists()
    shown = Document("t", latent_sections(tiny_run)).to_markdown(tiny_run)
    assert "### Steering" in shown and "Monosemanticity" not in shown and "Concept cones" not in shown


def test_steering_skips_an_encoder_model_saying_why(tmp_path, caplog):
    from tasks.config_latent import SteeringConfig
    from tasks.latent_steering import run_steering

    bert = build_tiny_model(tmp_path / "bert", "bert")
    _write_tokens(tmp_path / "run" / "activations", "test", ["d"] * 3, [1, 2, 3], [5, 6, 7],
                  np.zeros((3, 32), dtype=np.float32), str(bert))
    with caplog.at_level("INFO", logger="sae_ensembles"):
        assert run_steering(tmp_path / "run", SteeringConfig(), None, progress=False) == []
    assert "steering skipped" in caplog.text and "not a causal LM" in caplog.text


def test_synthetic_activations_skip_the_analyses_that_need_the_model_saying_why(tmp_path, caplog):
    from tasks.config_latent import LatentAnalysisConfig
    from tasks.latent_analyses import run_latent_analyses

    _write_tokens(tmp_path / "activations", "test", ["d"] * 3, [1, 2, 3], [5, 6, 7], np.ones((3, 4), dtype=np.float32),
                  str(tmp_path / "no-such-model"))
    from sae_core import SAEConfig, TrainConfig, save_ensemble, train_bagging
    from tasks.common import ModelDir

    cfg, train = SAEConfig(architecture="topk", d_in=4, d_sae=8, k=1), TrainConfig(n_steps=2, batch_size=16, warmup_steps=0,
                                                                                    b_dec_init_samples=16, log_every=2)
    save_ensemble(train_bagging(cfg, torch.rand(32, 4), train, 1).ensemble, ModelDir("bagging", 0).path(tmp_path))
    (tmp_path / "latents").mkdir()
    (tmp_path / "latents" / "steering.parquet").write_text("stale")
    with caplog.at_level("INFO", logger="sae_ensembles"):
        assert run_latent_analyses(tmp_path, LatentAnalysisConfig(), None, progress=False) == []
    assert "monosemanticity skipped" in caplog.text and "steering skipped" in caplog.text and "cannot be loaded" in caplog.text
    assert "cones and the sparse head skipped" in caplog.text and not (tmp_path / "latents" / "steering.parquet").exists()


def test_explanations_and_best_explained_latents_are_read_robustly():
    from tasks.latent_sparse_head import explanation_lookup
    from tasks.latent_steering import best_explained, most_frequent

    frame = pd.DataFrame({"model": ["m", "m", "m"], "member": [0, 1, 1], "latent": [4, 2, 7], "explanation": ["a", None, "c"],
                          "detection_auroc": [0.5, 0.9, 0.7], "fuzzing_auroc": [0.9, 0.1, 0.1]})
    assert explanation_lookup(frame) == {("m", 0, 4): "a", ("m", 1, 7): "c"}
    assert explanation_lookup(None) == {} and explanation_lookup(frame.drop(columns="explanation")) == {}
    assert best_explained(frame, "m", 2) == [(1, 2), (1, 7)] and best_explained(frame, "other", 2) == []
    assert best_explained(frame.drop(columns="detection_auroc"), "m", 1) == [(0, 4)]   # the next score column
    assert best_explained(frame.drop(columns=["detection_auroc", "fuzzing_auroc"]), "m", 2) == []
    codes = torch.zeros(2, 5, 3)
    codes[1, :4, 2] = 1.0
    codes[0, :2, 0] = 1.0
    assert most_frequent(codes, 3) == [(1, 2), (0, 0)]   # never-firing latents are not chosen


@pytest.mark.slow
def test_steering_the_real_smollm2_changes_its_generation(tmp_path):
    """Real SmolLM2-135M at layer 6: a bagging ensemble trained on its residual stream over a
    few hundred tokens, the most frequent latent steered at strengths 0 and 8."""
    from data_contracts.latents import read_latent_table
    from sae_core import SAEConfig, TrainConfig, save_ensemble, train_bagging
    from sae_core.models import load_model
    from tasks.common import ModelDir
    from tasks.config_latent import SteeringConfig
    from tasks.latent_steering import run_steering
    from tests.tiny_models import TEXTS

    loaded = load_model("smollm2-135m", 6)
    doc_ids, positions, token_ids, x = _residual_tokens(loaded, TEXTS * 2)
    _write_tokens(tmp_path / "activations", "test", doc_ids, positions, token_ids, x, "smollm2-135m")
    manifest_path = tmp_path / "activations" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"layer": 1', '"layer": 6'))
    cfg = SAEConfig(architecture="topk", d_in=x.shape[1], d_sae=256, k=8)
    train = TrainConfig(n_steps=60, batch_size=128, lr=3e-3, warmup_steps=0, b_dec_init_samples=256, log_every=60)
    save_ensemble(train_bagging(cfg, torch.from_numpy(x), train, 2).ensemble.eval(), ModelDir("bagging", 0).path(tmp_path))
    steering = SteeringConfig(n_latents=2, strengths=[0.0, 8.0], prompts=["The weather today is", "My favourite food is"],
                              max_new_tokens=8)
    assert run_steering(tmp_path, steering, None, progress=False) == ["latents/steering.parquet"]
    table = read_latent_table(tmp_path / "latents" / "steering.parquet")
    assert len(table) == 2 * 2 * 2 and (table["generation"].str.len() > 0).all()
    assert not table.loc[table["strength"] == 0, "changed"].any()
    assert table.loc[table["strength"] == 8, "changed"].any()
    print(table[["latent", "prompt", "strength", "norm", "generation"]].to_string())
