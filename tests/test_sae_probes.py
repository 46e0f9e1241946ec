"""The sae-probes benchmark: its files read and validated by a contract, its labelled sets, the
mean-over-tasks CI (over tasks, by hand), and the SCR headroom guard."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from data_contracts import ContractViolation
from data_contracts.sae_probes import validate_sae_probes
from tasks import sae_probes
from tasks.config import DownstreamConfig
from tasks.downstream_evaluation import evaluate_codes, make_tasks
from tasks.downstream_report import benchmark_section, pairs_table, scr_section
from tasks.labelled import LabelledSets, scr_split
from tasks.probing_benchmark import identical_across_j, mean_over_tasks, paired_differences
from tasks.report_doc import Document

T_975_2 = 4.302652729911275  # Student t quantile, 97.5%, 2 degrees of freedom (scipy.stats.t.ppf(0.975, 2))


# ------------------------------------------------------------------ files and contract
def test_the_listing_names_113_binary_tasks_whose_files_exist():
    listing = sae_probes.listing()
    assert len(listing) == 113 and listing["tag"].is_unique and listing["number"].is_monotonic_increasing
    assert {"glue_sst2", "hist_fig_ismale", "code_Python", "agnews_0", "headline_istrump"} <= set(listing["tag"])
    root = sae_probes.data_dir()
    assert all((root / f).is_file() for f in listing["file"])
    assert listing.set_index("tag").loc["glue_sst2", "file"] == "cleaned_data/92_glue_sst2.csv.zst"


def test_the_listing_contract_rejects_a_repeated_tag_and_a_foreign_file():
    listing = sae_probes.listing().head(3).copy()
    validate_sae_probes(listing, "sae_probes_listing", "listing")
    bad = listing.copy()
    bad.loc[1, "tag"] = bad.loc[0, "tag"]
    bad.loc[2, "file"] = "elsewhere/x.csv"
    with pytest.raises(ContractViolation) as err:
        validate_sae_probes(bad, "sae_probes_listing", "probing_datasets_MASTER.csv.zst")
    text = str(err.value)
    assert "probing_datasets_MASTER.csv.zst" in text and "unique" in text and "elsewhere/x.csv" in text


def test_real_task_files_are_read_cleaned_and_validated():
    rows = sae_probes.read_tasks(["temp_cat_Frequency", "glue_sst2"])
    raw = sae_probes.read_zst_csv(sae_probes.data_dir() / "cleaned_data/130_temp_cat_Frequency.csv.zst")
    # the file repeats prompts: 1,062 rows, 371 distinct texts, none with two targets; each is kept once
    assert len(raw) == 1062 and raw["prompt"].nunique() == 371
    freq = rows[rows["task"] == "temp_cat_Frequency"]
    assert len(freq) == 371 and freq["prompt"].is_unique
    assert set(rows["target"]) == {"0", "1"} and rows.groupby("task")["target"].nunique().eq(2).all()
    # every kept row is the first occurrence of its prompt, with that row's target
    first = raw.drop_duplicates("prompt").reset_index()
    assert freq["row"].tolist() == first["index"].tolist()
    assert freq["target"].tolist() == first["target"].astype(str).tolist()


def test_the_task_contract_rejects_three_classes_a_repeated_prompt_and_an_empty_prompt():
    good = pd.DataFrame({"task": "t", "row": [0, 1, 2], "prompt": ["a", "b", "c"], "target": ["0", "1", "0"]})
    validate_sae_probes(good, "sae_probes_tasks", "t.csv.zst")
    with pytest.raises(ContractViolation, match="two target values per task"):
        validate_sae_probes(good.assign(target=["0", "1", "2"]), "sae_probes_tasks", "t.csv.zst")
    with pytest.raises(ContractViolation, match="unique"):
        validate_sae_probes(good.assign(prompt=["a", "a", "c"]), "sae_probes_tasks", "t.csv.zst")
    with pytest.raises(ContractViolation, match="length"):
        validate_sae_probes(good.assign(prompt=["a", "", "c"]), "sae_probes_tasks", "t.csv.zst")
    with pytest.raises(ContractViolation, match="missing columns"):
        validate_sae_probes(good.drop(columns="target"), "sae_probes_tasks", "t.csv.zst")


def test_tasks_are_named_by_tag_file_name_or_all():
    assert sae_probes.resolve_tasks(["glue_sst2", "5_hist_fig_ismale", "glue_sst2"]) == ["glue_sst2", "hist_fig_ismale"]
    assert len(sae_probes.resolve_tasks(["all"])) == 113
    with pytest.raises(ValueError, match=r"unknown sae-probes tasks \['sst2'\].*glue_sst2"):
        sae_probes.resolve_tasks(["sst2"])


def test_probing_sets_are_balanced_seeded_and_never_share_a_text_between_splits():
    sets = sae_probes.probing_sets(["temp_cat_Frequency", "code_Python"], 25, seed=0)
    assert list(sets) == ["sae_probes.temp_cat_Frequency", "sae_probes.code_Python"]
    for name, frame in sets.items():
        assert frame.groupby(["split", "label"]).size().eq(25).all() and (frame["dataset"] == name).all()
        train, test = (set(frame.loc[frame["split"] == s, "text"]) for s in ("train", "test"))
        assert not train & test
    again = sae_probes.probing_sets(["code_Python"], 25, seed=0)["sae_probes.code_Python"]
    pd.testing.assert_frame_equal(again, sets["sae_probes.code_Python"])  # a task's draw does not depend on the others
    other = sae_probes.probing_sets(["code_Python"], 25, seed=1)["sae_probes.code_Python"]
    assert not other["doc_id"].equals(again["doc_id"])


def test_joined_and_planted_scr_sources():
    joined = sae_probes.joined_scr_frame("hist_fig_ismale", "hist_fig_isamerican")
    male = sae_probes.read_tasks(["hist_fig_ismale"]).set_index("prompt")["target"]
    american = sae_probes.read_tasks(["hist_fig_isamerican"]).set_index("prompt")["target"]
    shared = male.index.intersection(american.index)
    assert len(joined) == len(shared) and set(joined["text"]) == set(shared)
    assert (joined["y"] == (male[joined["text"]] == "1").astype(int).to_numpy()).all()
    assert (joined["z"] == (american[joined["text"]] == "1").astype(int).to_numpy()).all()

    planted = sae_probes.planted_scr_frame("glue_sst2", seed=0)
    cued = planted["text"].str.startswith(sae_probes.PLANTED_CUE + " ")
    assert (cued == (planted["z"] == 1)).all() and planted["doc_id"].is_unique
    # half of each class carries the cue (z independent of y before the split)
    per_class = planted.groupby("y")["z"].agg(["sum", "size"])
    assert (per_class["sum"] == per_class["size"] // 2).all()


# ------------------------------------------------------------------ SCR: splits and the headroom guard
def _names_source(n_per_cell: int) -> pd.DataFrame:
    rows = []
    for y in (0, 1):
        for z in (0, 1):
            for i in range(n_per_cell):
                doc = f"y{y}z{z}_{i}"
                rows.append((doc, doc, f"text {doc}", f"label{y}", f"spur{z}", y, z))
    return pd.DataFrame(rows, columns=["doc_id", "document", "text", "label", "spurious", "y", "z"])


def _planted_activations(frame: pd.DataFrame, spurious_strength: float, seed: int) -> np.ndarray:
    """Pooled activations (d = 6): dim 0 carries y weakly (noisy), dim 1 carries z with
    ``spurious_strength`` (clean), the rest noise. A strong clean z makes the biased probe
    follow z, which costs it half the balanced test set: headroom ≈ 0.5 − noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(frame), 6))
    x[:, 0] += 1.5 * (2 * frame["y"].to_numpy() - 1)
    x[:, 1] += spurious_strength * (2 * frame["z"].to_numpy() - 1)
    return x


def test_headroom_guard_keeps_a_pair_with_headroom_and_excludes_one_without():
    cued, _ = scr_split(_names_source(60), "cued", max_per_cell=20, min_cell=10, seed=0)
    plain, _ = scr_split(_names_source(60).assign(doc_id=lambda f: "p" + f["doc_id"], document=lambda f: "p" + f["document"]),
                         "plain", max_per_cell=20, min_cell=10, seed=0)
    sets = LabelledSets({}, {"cued": cued, "plain": plain}, pd.DataFrame())
    docs = sets.documents()
    position = {d: i for i, d in enumerate(docs["doc_id"])}
    pooled = np.zeros((len(docs), 6))
    pooled[[position[d] for d in cued["doc_id"]]] = _planted_activations(cued, 8.0, seed=1)
    pooled[[position[d] for d in plain["doc_id"]]] = _planted_activations(plain, 0.0, seed=2)
    probing, scr, pairs = make_tasks(sets, docs["doc_id"].tolist(), pooled, min_headroom=0.05)
    pairs = pairs.set_index("pair")
    # with the planted z the biased probe reads z: chance-level on the balanced test, the oracle is not fooled
    assert pairs.loc["cued", "acc_base"] < 0.7 and pairs.loc["cued", "acc_oracle"] > 0.8
    assert pairs.loc["cued", "headroom"] == pytest.approx(pairs.loc["cued", "acc_oracle"] - pairs.loc["cued", "acc_base"])
    assert pairs.loc["cued", "conditioned"]
    # without it the biased probe is as good as the oracle: no headroom
    assert pairs.loc["plain", "headroom"] < 0.05 and not pairs.loc["plain", "conditioned"]
    assert list(scr) == ["cued"] and probing == {}
    # only the pair with headroom gets SCR rows
    cfg = DownstreamConfig(probing_datasets=[], sae_probes_tasks=[], scr_pairs=[], scr_sae_probes=[], scr_planted=[],
                           scr_n_ablated=[1, 2])
    _, rows = evaluate_codes("raw", 0, 0, pooled, np.eye(6), probing, scr, cfg)
    assert {r["pair"] for r in rows} == {"cued"} and len(rows) == 2
    # ablating the planted neuron (1) first repairs the biased probe
    assert rows[0]["acc_ablated"] > pairs.loc["cued", "acc_base"] + 0.2


def test_the_headroom_minimum_is_inclusive_and_configurable():
    from sae_core.scr import has_headroom

    assert has_headroom(0.80, 0.85, 0.05) and not has_headroom(0.80, 0.849, 0.05)
    assert has_headroom(0.9, 0.9, 0.0) and not has_headroom(0.9, 0.89, 0.0)
    assert DownstreamConfig().scr_min_headroom == 0.05


def test_report_shows_no_headroom_pairs_with_their_numbers_and_scores_only_the_others(tmp_path):
    pairs = pd.DataFrame({"pair": ["a-vs-b", "c-vs-d"], "acc_base": [0.6, 0.85], "acc_oracle": [0.85, 0.86],
                          "headroom": [0.25, 0.01], "min_headroom": [0.05, 0.05], "conditioned": [True, False], "n_test": [80, 120]})
    table = pairs_table(pairs)
    assert table["status"].tolist() == ["scored", "no headroom (< 0.05)"] and table["headroom"].tolist() == [0.25, 0.01]
    scr = pd.DataFrame({"method": "single", "n_members": 1, "run": [0, 1], "pair": "a-vs-b", "n_ablated": 2,
                        "acc_base": 0.6, "acc_ablated": [0.7, 0.8], "acc_oracle": 0.85, "score": [0.4, 0.8]})
    doc = Document("t")
    doc.blocks += scr_section(scr, pairs, 0.95)
    md = doc.to_markdown(tmp_path)
    assert "| c-vs-d | 0.85 | 0.86 | 0.01 | 120 | no headroom (< 0.05) |" in md
    assert "pairs with headroom (a-vs-b)" in md and "0.6 [" in md  # S mean over runs 0.6 with its CI
    none = scr_section(None, pairs.assign(conditioned=False), 0.95)
    assert "No pair has headroom ≥ 0.05" in none[-1].text


# ------------------------------------------------------------------ the mean over tasks and its CI
def _probing(accuracies: dict[tuple[str, int], list[list[float]]]) -> pd.DataFrame:
    """probing_results rows: for each (method, J) a list per task of per-run accuracies, k = 1."""
    rows = []
    for (m, j), tasks in accuracies.items():
        for t, runs in enumerate(tasks):
            for r, acc in enumerate(runs):
                rows.append({"method": m, "n_members": j, "run": r, "dataset": f"sae_probes.task{t}", "class": "1", "k": 1,
                             "accuracy": acc})
    return pd.DataFrame(rows)


def test_mean_over_tasks_ci_is_the_t_interval_over_task_means():
    # three tasks, two runs each: task means 0.6, 0.7, 0.8 (runs averaged first);
    # mean 0.7, s = 0.1, half-width = t_{0.975, 2} · 0.1 / √3 = 4.302653 · 0.057735 = 0.248414
    probing = _probing({("single", 1): [[0.55, 0.65], [0.7, 0.7], [0.9, 0.7]]})
    probing = pd.concat([probing, probing.assign(dataset="bbc", accuracy=0.0)])  # a non-benchmark set is left out
    over = mean_over_tasks(probing, 0.95)
    assert len(over) == 1 and over["n_tasks"].iloc[0] == 3
    half = T_975_2 * 0.1 / math.sqrt(3)
    assert half == pytest.approx(0.248414, abs=1e-6)
    row = over.iloc[0]
    assert row["mean"] == pytest.approx(0.7) and row["half_width"] == pytest.approx(half)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.7 - half, 0.7 + half))
    # the run-to-run spread does not enter: the same task means from one run give the same interval
    one_run = mean_over_tasks(_probing({("single", 1): [[0.6], [0.7], [0.8]]}), 0.95).iloc[0]
    assert one_run["half_width"] == pytest.approx(half)


def test_paired_differences_are_over_tasks_and_flag_those_outside_the_ci():
    # bagging − single per task: 0.05, 0.04, 0.06 -> mean 0.05, s = 0.01, half = 4.302653 · 0.01 / √3 = 0.024841
    probing = _probing({("single", 1): [[0.6], [0.7], [0.8]], ("bagging", 8): [[0.65], [0.74], [0.86]],
                        ("boosting", 8): [[0.7], [0.6], [0.8]]})
    diffs = paired_differences(probing, [(("bagging", 8), ("single", 1)), (("boosting", 8), ("single", 1))], 0.95)
    bag = diffs.iloc[0]
    assert bag["a"] == "bagging J=8" and bag["b"] == "single SAE J=1" and bag["n_tasks"] == 3
    assert bag["difference"] == pytest.approx(0.05)
    assert (bag["ci_low"], bag["ci_high"]) == pytest.approx((0.05 - T_975_2 * 0.01 / math.sqrt(3), 0.05 + T_975_2 * 0.01 / math.sqrt(3)))
    assert bag["outside_ci"]
    # boosting − single: 0.1, −0.1, 0 -> mean 0, the CI straddles 0
    assert diffs.iloc[1]["difference"] == pytest.approx(0.0) and not diffs.iloc[1]["outside_ci"]
    # the means' own intervals overlap although the paired difference is outside its CI
    over = mean_over_tasks(probing, 0.95).set_index("method")
    assert over.loc["bagging", "ci_low"] < over.loc["single", "ci_high"]


def test_boosting_rows_identical_across_j_are_counted_and_reported(tmp_path):
    same = _probing({("boosting", 1): [[0.6], [0.7]], ("boosting", 2): [[0.6], [0.7]], ("single", 1): [[0.5], [0.9]]})
    assert identical_across_j(same, "boosting") == (2, 2)
    differ = _probing({("boosting", 1): [[0.6], [0.7]], ("boosting", 2): [[0.6], [0.75]]})
    assert identical_across_j(differ, "boosting") == (1, 2)
    doc = Document("t")
    doc.blocks += benchmark_section(same, 0.95)
    md = doc.to_markdown(tmp_path)
    assert "identical at every J on all 2 (run, task, k) groups" in md
    assert "Student-t interval **over tasks**" in md and "| task0 |" in md
