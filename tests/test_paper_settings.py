"""The paper-scale configs on tiny random models of their families (SPEC §12, issue 18).

``configs/pythia160m-topk.yaml``, ``configs/gemma2-2b-jumprelu.yaml`` and
``configs/gelu1l-relu.yaml`` are read as written; only what needs a GPU box and network
is scaled down — the model (a tiny random GPT-NeoX / Gemma-2 / one-layer GELU model built
from a config), the corpus (local text), widths, steps and token counts — while the
architecture and the recipe (lr, schedule, sparsity coefficients, bandwidths, bf16) stay
the config's. Each run goes through extraction, streaming training (a shuffle buffer
smaller than the train split, so windows are streamed), evaluation and the report, on
the device the config names (auto: CUDA where present). Pythia always runs; the other
two are marked slow (`make test SLOW=1`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.configs import load_pipeline_config
from sae_core.io import load_ensemble
from tasks.common import ACTIVATIONS_DIR, MODELS_DIR, activation_source
from tasks.config import PipelineConfig
from tasks.evaluate import run_evaluation
from tasks.extract import run_extraction
from tasks.report import run_report
from tasks.train import run_training
from tests.tiny_models import TEXTS, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    pytest.param("gpt_neox", "pythia160m-topk.yaml", id="pythia-topk"),
    pytest.param("gemma2", "gemma2-2b-jumprelu.yaml", id="gemma2-jumprelu", marks=pytest.mark.slow),
    pytest.param("gelu1l", "gelu1l-relu.yaml", id="gelu1l-relu", marks=pytest.mark.slow),
]


def scaled_down(config: Path, model: Path, corpus: Path) -> PipelineConfig:
    """The config with a tiny model, local text and toy sizes; every other setting as written."""
    cfg = load_pipeline_config(config).model_dump()
    cfg["extract"].update(model=str(model), revision=None, layer=0, context_length=24, batch_size=8, max_tokens_per_split=None,
                          corpus=[{"name": str(corpus)}], documents_per_shard=12,
                          split_fractions={"train": 0.7, "val": 0.1, "test": 0.2})
    train = cfg["train"]
    train.update(d_sae=48, n_members=2, n_runs=2, expanded_sizes=[2], shuffle_buffer_mb=0.02)  # 0.02 MB = 163 rows of d = 32
    if train["k"] is not None:
        train["k"] = 4
    train["recipe"].update(n_steps=6, batch_size=32, b_dec_init_samples=128, log_every=3)
    cfg["evaluate"].update(max_tokens=None, ce_max_windows=4)
    return PipelineConfig(**cfg)


@pytest.mark.parametrize(("family", "config"), SETTINGS)
def test_paper_config_runs_end_to_end_on_a_tiny_model_of_its_family(family, config, tmp_path):
    model = build_tiny_model(tmp_path / "model", family, d=32)
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(f"{t} {TEXTS[(i + 1) % len(TEXTS)]} {i}" for i, t in enumerate(TEXTS * 6)) + "\n")
    cfg = scaled_down(ROOT / "configs" / config, model, corpus)
    original = load_pipeline_config(ROOT / "configs" / config)
    assert cfg.train.architecture == original.train.architecture and cfg.train.recipe.lr == original.train.recipe.lr
    run = tmp_path / "run"

    run_extraction(cfg.extract, run, progress=False)
    source = activation_source(run / ACTIVATIONS_DIR, "train", None, 0, buffer_mb=cfg.train.shuffle_buffer_mb)
    assert source.streams and len(source.chunks) > 3, "the train split should be streamed through several windows"

    trained = run_training(cfg.train, run, progress=False)
    assert any("streamed through a shuffle buffer" in note for note in trained.notes)
    expected = {f"{MODELS_DIR}/{name}/run={r}" for r in range(2) for name in ("bagging", "boosting", "single", "expanded_J2")}
    assert expected <= set(trained.written)
    assert load_ensemble(run / MODELS_DIR / "boosting" / "run=0").n_members == 2

    evaluated = run_evaluation(cfg.evaluate, run, progress=False)
    summary = evaluated.tables["intrinsic_summary"]
    ev = summary[(summary["metric"] == "explained_variance") & (summary["method"] == "bagging")]
    assert len(ev) == 2 and ev["mean"].notna().all()
    assert {"ce_loss_recovered", "stability"} <= set(summary["metric"])  # decoder models get the CE splice; S = 2 runs

    report = run_report(cfg, run, progress=False)
    text = (run / "report" / "report.md").read_text()
    assert "report/report.md" in report.written and "bagging" in text.lower() and "boosting" in text.lower()
