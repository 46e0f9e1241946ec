"""The ``synthetic`` flow: every architecture against a planted sparse dictionary."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from tasks.synthetic import SUMMARY_DIR, SUMMARY_FILE, SYNTHETIC_ARCHITECTURES, run_synthetic, unknown_architectures

__all__ = ["SUMMARY_DIR", "SUMMARY_FILE", "SYNTHETIC_ARCHITECTURES", "synthetic_flow", "unknown_architectures"]


@flow(name="synthetic")
def synthetic_flow(out: str = "runs/synthetic", architectures: list[str] | None = None, steps: int = 1200, seed: int = 0) -> list[dict]:
    """Train each architecture (default: all) on synthetic data with a known dictionary; save
    the SAEs under ``out/<architecture>`` and the recovery table under ``out/summary``."""
    logger = get_run_logger()

    def log(report: dict) -> None:
        logger.info("%s: recovery %.3f (random %.3f), EV %.3f, L0 %.2f", report["architecture"], report["recovery"],
                    report["random_recovery"], report["explained_variance"], report["l0"])

    return run_synthetic(Path(out), list(architectures or SYNTHETIC_ARCHITECTURES), steps, seed, on_result=log)
