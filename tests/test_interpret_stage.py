"""The latent-contexts table (evaluate stage) and the interpret stage on real data.

The stage test replays a transcript recorded from the real SmolLM2-135M-Instruct on contexts
of a real smoke run (tests/record_interpret_transcript.py); the slow test runs the stage with
SmolLM2 itself on the smoke run, refinement included, end to end.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_contracts import ContractViolation, validate
from data_contracts.interpret_contexts import read_latent_contexts, validate_latent_contexts
from sae_core.llm_scoring import Call, parse_explanation, scores
from tasks.config_interpret import LatentContextsConfig
from tasks.interpret_contexts import TOKENS_AFTER, TOKENS_BEFORE, latent_rows, stratified_latents, window_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from record_interpret_transcript import CONTEXTS, TRANSCRIPT, record_config  # noqa: E402


def test_latents_are_drawn_one_per_equal_count_frequency_bin():
    frequency = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.0])
    chosen = stratified_latents(frequency, 3, np.random.default_rng(0))
    assert [b for _, b in chosen] == [0, 1, 2]
    assert chosen[0][0] in (1, 2) and chosen[1][0] in (3, 4) and chosen[2][0] == 5  # firing latents cut as [1 2] [3 4] [5]
    assert stratified_latents(np.zeros(4), 3, np.random.default_rng(0)) == []
    assert len(stratified_latents(frequency, 9, np.random.default_rng(0))) == 5  # never more bins than firing latents


def test_windows_stay_in_their_document_and_negatives_have_quiet_windows():
    docs = np.array([0] * 12 + [1] * 12)
    rows, valid = window_rows(docs)
    assert rows.shape == (24, TOKENS_BEFORE + 1 + TOKENS_AFTER)
    assert list(rows[0][valid[0]]) == [0, 1, 2] and list(rows[12][valid[12]]) == [12, 13, 14]
    assert list(rows[11][valid[11]]) == list(range(5, 12))  # no row of document 1
    codes = np.zeros(24)
    codes[[3, 5, 9, 20]] = [2.0, 3.0, 1.0, 0.5]
    cfg = LatentContextsConfig(top=2, random=5, negatives=30)
    picked = latent_rows(codes, rows, valid, cfg, np.random.default_rng(0))
    by_kind = {k: [i for kind, _, i in picked if kind == k] for k in ("top", "random", "negative")}
    assert by_kind["top"] == [5, 3] and sorted(by_kind["random"]) == [9, 20]
    quiet = [i for i in range(24) if not any(codes[r] > 0 for r in rows[i][valid[i]])]
    assert sorted(by_kind["negative"]) == quiet == [0, 12, 13, 14, 15, 16, 17]  # 6 before and 2 after hold no firing token


def test_latent_contexts_of_a_run_and_one_pass_sparse_codes_equal_the_two_pass_twin(tmp_path):
    import torch

    from sae_core.config import SAEConfig
    from sae_core.ensemble import Ensemble
    from sae_core.io import save_ensemble
    from sae_core.training.trainer import build_sae
    from synthetic_shards import write_synthetic_activations
    from tasks.common import split_tokens
    from tasks.interpret_contexts import SparseCodes, write_latent_contexts_table
    from tasks.top_contexts import latent_frequency, selected_codes

    write_synthetic_activations(tmp_path / "activations", {"test": 600}, d=16, n_features=32, rows_per_shard=300, documents_per_shard=10)
    x = split_tokens(tmp_path / "activations", "test", None, 0)
    torch.manual_seed(0)
    for method, J in (("bagging", 3), ("boosting", 3), ("single", 1)):
        sae = build_sae(SAEConfig(d_in=16, d_sae=24, architecture="topk", k=3), J)
        sae.initialize([torch.Generator().manual_seed(10 * J + j) for j in range(J)])
        ensemble = Ensemble(sae, method).eval()
        save_ensemble(ensemble, tmp_path / "models" / method / "run=0")
        members = sorted({0, J - 1})
        sparse = SparseCodes(ensemble, x, members)
        with torch.inference_mode():
            np.testing.assert_allclose(sparse.frequency(), latent_frequency(ensemble, x, members).numpy())
            assert (sparse.frequency().sum(1) > 1).all()  # up to k = 3 latents fire per token: the codes are not all 0
            latents = torch.tensor([[0, 5, 23]] * len(members))
            dense = selected_codes(ensemble, x, members, latents).numpy()
        for m in range(len(members)):
            for col, latent in enumerate(latents[m].tolist()):
                np.testing.assert_allclose(sparse.dense(m, latent), dense[m, :, col], rtol=1e-6)
    rel = write_latent_contexts_table(tmp_path, "synthetic", LatentContextsConfig(latents_per_member=3, top=4, random=3, negatives=3))
    frame = validate(tmp_path / rel)
    per_member = frame.drop_duplicates(["model", "member", "latent"]).groupby(["model", "member"])["frequency_bin"].apply(sorted)
    assert per_member.to_dict() == {("models/bagging/run=0", 0): [0, 1, 2], ("models/bagging/run=0", 2): [0, 1, 2],
                                    ("models/boosting/run=0", 0): [0, 1, 2], ("models/boosting/run=0", 2): [0, 1, 2],
                                    ("models/single/run=0", 0): [0, 1, 2]}
    counts = frame.groupby(["model", "member", "latent", "frequency"])["kind"].value_counts().unstack(fill_value=0).reset_index()
    firing = (counts["frequency"] * 600).round().astype(int)  # a rare latent has fewer contexts than asked for
    assert (counts["top"] == np.minimum(4, firing)).all() and (counts["random"] == np.minimum(3, firing - counts["top"])).all()
    assert (counts["negative"] == 3).all() and (counts["random"] < 3).any()
    assert frame["pieces"].iloc[0][0].startswith("#")  # no tokenizer for this model: token ids shown


def test_latent_contexts_contract_rejects_an_activating_negative_and_a_bad_window():
    frame = read_latent_contexts(CONTEXTS)
    assert set(frame["kind"]) == {"top", "random", "negative"}
    broken = frame.copy()
    i = broken.index[broken["kind"] == "negative"][0]
    broken.at[i, "activations"] = [1.0] + list(broken.at[i, "activations"][1:])
    with pytest.raises(ContractViolation, match="a negative's window has code 0"):
        validate_latent_contexts(broken, "x.parquet")
    broken = frame.copy()
    broken.at[0, "center"] = len(broken.at[0, "pieces"])
    with pytest.raises(ContractViolation, match="window shape"):
        validate_latent_contexts(broken, "x.parquet")


def _run_recorded(run_dir: Path, **changes):
    from tasks.interpret import run_interpret

    (run_dir / "metrics").mkdir(parents=True)
    shutil.copy(CONTEXTS, run_dir / "metrics" / "latent_contexts.parquet")
    cfg = record_config("recorded", str(TRANSCRIPT)).model_copy(update=changes)
    return run_interpret(cfg, run_dir, progress=False)


def test_interpret_stage_replays_a_recorded_smollm2_transcript_and_scores_from_it(tmp_path):
    from tasks.report_interpret import interpretation_section
    from tasks.report_doc import Document

    result = _run_recorded(tmp_path)
    assert result.written == ["interpret/explanations.parquet", "interpret/transcript.parquet", "interpret/summary.parquet"]
    explanations, transcript = validate(tmp_path / result.written[0]), validate(tmp_path / result.written[1])
    summary, recorded = validate(tmp_path / result.written[2]), validate(TRANSCRIPT)
    # every call replayed: the same prompts and answers as the real SmolLM2 run
    key = ["model", "member", "latent", "step", "item"]
    same = transcript.merge(recorded, on=key, suffixes=("", "_recorded"))
    assert len(same) == len(transcript) == len(recorded)
    assert (same["prompt"] == same["prompt_recorded"]).all() and (same["answer"] == same["answer_recorded"]).all()
    assert set(explanations["method"]) == {"single", "bagging", "boosting"} and len(explanations) == 5
    for _, row in explanations.iterrows():
        calls = transcript[(transcript["model"] == row["model"]) & (transcript["member"] == row["member"]) & (transcript["latent"] == row["latent"])]
        assert row["explanation"] == parse_explanation(calls.loc[calls["step"] == "explain", "answer"].iloc[0])
        for step in ("detect", "fuzz"):  # the stored scores follow from the stored answers
            judged = [Call(step, 0, "judge", 1, "", a, p, t) for a, p, t in calls.loc[calls["step"] == step, ["answer", "p_yes", "truth"]].itertuples(index=False)]
            assert (row[f"{'detection' if step == 'detect' else 'fuzzing'}_accuracy"], row[f"{'detection' if step == 'detect' else 'fuzzing'}_auroc"]) == pytest.approx(scores(judged))
        assert row["n_detection"] == 6 and row["backend"].startswith("recorded:local:smollm2-135m")
    bagging = summary[(summary["method"] == "bagging") & (summary["score"] == "detection_accuracy")].set_index("position")
    assert bagging.loc["all", "n_latents"] == 2 and bagging.loc["first", "n_latents"] == 1
    assert bagging.loc["all", "mean"] == pytest.approx(explanations.loc[explanations["method"] == "bagging", "detection_accuracy"].mean())
    doc = Document("t")
    doc.blocks += interpretation_section(tmp_path)
    md = doc.to_markdown(tmp_path)
    assert "bagging: first vs last member" in md and "boosting: first vs last member" in md
    assert explanations["explanation"].iloc[0] in md


def test_interpret_stage_off_writes_no_explanations_and_a_missing_recording_is_named(tmp_path):
    from sae_core.llm import MissingRecording

    from tasks.interpret import run_interpret

    result = _run_recorded(tmp_path / "off", latents_per_member=0)
    assert not (tmp_path / "off" / "interpret").exists() and "no explanations" in result.notes[0]
    (tmp_path / "none").mkdir()  # evaluate described no latent: noted, nothing explained
    result = run_interpret(record_config("recorded", str(TRANSCRIPT)), tmp_path / "none", progress=False)
    assert result.written == [] and "latent_contexts.parquet was not written by the evaluate stage" in result.notes[0]
    with pytest.raises(MissingRecording, match="is not in the recorded transcript"):
        _run_recorded(tmp_path / "more", explain_contexts=4)  # another prompt than the recorded one


@pytest.mark.slow
def test_interpret_stage_with_smollm2_on_the_smoke_run_end_to_end(prefect_harness, tmp_path):
    """extract, train, evaluate of configs/smoke.yaml, then the interpret stage with the real
    SmolLM2 (one refinement round), the report, and a replay of the run's own transcript."""
    from flows.configs import load_pipeline_config
    from flows.stages import STAGE_FLOWS, stage_section

    cfg = load_pipeline_config(ROOT / "configs" / "smoke.yaml")
    run = tmp_path / "smoke"
    for stage in ("extract", "train", "evaluate"):
        STAGE_FLOWS[stage](config=stage_section(cfg, stage), run_dir=str(run))
    analyses_off = record_config().analyses
    interpret = cfg.interpret.model_copy(update={"latents_per_member": 1, "methods": ["bagging"], "refine_rounds": 1,
                                                 "analyses": analyses_off})
    outcome = STAGE_FLOWS["interpret"](config=interpret, run_dir=str(run))
    assert not outcome.cached
    transcript = validate(run / "interpret" / "transcript.parquet")
    assert {"explain", "propose", "revise", "detect", "fuzz"} <= set(transcript["step"])
    explanations = validate(run / "interpret" / "explanations.parquet")
    assert len(explanations) == 2 and (explanations["refine_rounds"] == 1).all()
    STAGE_FLOWS["report"](config=cfg, run_dir=str(run))
    assert "bagging: first vs last member" in (run / "report" / "report.md").read_text()
    replay = tmp_path / "replay"
    shutil.copytree(run, replay, ignore=shutil.ignore_patterns("interpret", ".prefect"))
    recorded = interpret.model_copy(update={"llm": interpret.llm.model_copy(update={"backend": "recorded",
                                                                                    "transcript": str(run / "interpret" / "transcript.parquet")})})
    from tasks.interpret import run_interpret

    run_interpret(recorded, replay, progress=False)
    again = validate(replay / "interpret" / "explanations.parquet")
    pd.testing.assert_series_equal(again["explanation"], explanations["explanation"])
