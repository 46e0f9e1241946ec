"""The synthetic-recovery job: train architectures on a planted sparse dictionary, save
them and tabulate how well each recovers it (an end-to-end check of sae_core)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from sae_core.io import atomic_directory, save_sae
from sae_core.synthetic import SYNTHETIC_RECIPES, make_sparse_dictionary_data, synthetic_recovery

#: tokens of the synthetic data set
SYNTHETIC_SAMPLES = 40_960
SUMMARY_DIR = "summary"
SUMMARY_FILE = "recovery.json"
SYNTHETIC_ARCHITECTURES: tuple[str, ...] = tuple(SYNTHETIC_RECIPES)


def unknown_architectures(names: list[str]) -> list[str]:
    """The names in ``names`` that have no synthetic recipe, sorted."""
    return sorted(set(names) - set(SYNTHETIC_RECIPES))


def run_synthetic(out: Path, architectures: list[str], steps: int, seed: int,
                  on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Train each architecture, save it to ``out/<architecture>`` and the table to
    ``out/summary/recovery.json``; returns one report dict per architecture, in order."""
    unknown = unknown_architectures(architectures)
    if unknown:
        raise ValueError(f"unknown architecture(s) {unknown}; choose from {sorted(SYNTHETIC_RECIPES)}")
    data = make_sparse_dictionary_data(n_samples=SYNTHETIC_SAMPLES, seed=seed)
    reports = []
    for arch in architectures:
        report, sae = synthetic_recovery(arch, n_steps=steps, seed=seed, data=data)
        save_sae(sae, out / arch)
        reports.append(asdict(report))
        if on_result is not None:
            on_result(reports[-1])
    with atomic_directory(out / SUMMARY_DIR) as tmp:
        (tmp / SUMMARY_FILE).write_text(json.dumps(reports, indent=2) + "\n")
    return reports
