"""What latent interpretation adds to a run: the evaluate stage's latent-contexts table at the
default config's shapes, and the interpret stage per latent with the local SmolLM2.

    .venv/bin/python benchmarks/bench_interpret.py ACTIVATIONS_RUN_DIR [RUN_DIR_WITH_CONTEXTS]

ACTIVATIONS_RUN_DIR: a run directory whose extract stage ran (e.g. runs/default after
`sae-ensembles extract`). Freshly initialised ensembles with configs/default.yaml's shapes
(TopK k = 40: the codes cost what trained ones cost) are saved beside a copy of its manifest and
test shards, and ``write_latent_contexts_table`` is timed with the default settings.
RUN_DIR_WITH_CONTEXTS (optional): a run with ``metrics/latent_contexts.parquet``; the
interpret stage then runs there on `interpret.latents_per_member` 1 of bagging with the
local backend, timed per latent. Writes runs/bench/interpret.json.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def contexts_seconds(source: Path) -> dict:
    import torch

    from flows.configs import load_pipeline_config
    from sae_core.config import SAEConfig
    from sae_core.ensemble import Ensemble
    from sae_core.io import save_ensemble
    from sae_core.training.trainer import build_sae
    from tasks.interpret_contexts import write_latent_contexts_table

    import great_expectations  # noqa: F401 - loaded in the evaluate stage before this table; not part of its cost

    cfg = load_pipeline_config(ROOT / "configs" / "default.yaml")
    manifest = json.loads((source / "activations" / "manifest.json").read_text())
    d, d_sae, k, J = manifest["d"], cfg.train.d_sae, cfg.train.k, cfg.train.n_members
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        shutil.copytree(source / "activations", run / "activations", ignore=shutil.ignore_patterns("split=train", "split=val"))
        torch.manual_seed(0)
        shapes = {"single": (d_sae, 1), "bagging": (d_sae, J), "boosting": (d_sae, J), "expanded_J8": (J * d_sae, 1),
                  "random_decoder_J1": (d_sae, 1)}
        for name, (width, members) in shapes.items():
            method = {"expanded_J8": "expanded", "random_decoder_J1": "single"}.get(name, name)
            sae = build_sae(SAEConfig(d_in=d, d_sae=width, architecture="topk", k=k * (J if name == "expanded_J8" else 1)), members)
            sae.initialize([torch.Generator().manual_seed(100 * len(name) + j) for j in range(members)])
            save_ensemble(Ensemble(sae, method), run / "models" / name / "run=0")
        start = time.perf_counter()
        write_latent_contexts_table(run, manifest["model"], cfg.evaluate.latent_contexts)
        return {"latent_contexts_s": round(time.perf_counter() - start, 2), "models": list(shapes)}


def interpret_seconds(run_dir: Path) -> dict:
    from tasks.config_interpret import InterpretConfig
    from tasks.config_latent import LatentAnalysisConfig
    from tasks.interpret import run_interpret

    off = LatentAnalysisConfig(**{n: {"enabled": False} for n in ("monosemanticity", "cones", "sparse_head", "steering")})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics").mkdir()
        shutil.copy(run_dir / "metrics" / "latent_contexts.parquet", Path(tmp) / "metrics")
        start = time.perf_counter()
        result = run_interpret(InterpretConfig(latents_per_member=1, methods=["bagging"], analyses=off), tmp, progress=False)
        seconds = time.perf_counter() - start
    return {"interpret_s": round(seconds, 1), "latents": 2, "notes": result.notes}


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    out = {"contexts": contexts_seconds(Path(sys.argv[1]))}
    if len(sys.argv) == 3:
        out["interpret"] = interpret_seconds(Path(sys.argv[2]))
    print(json.dumps(out, indent=1))
    (ROOT / "runs" / "bench").mkdir(parents=True, exist_ok=True)
    (ROOT / "runs" / "bench" / "interpret.json").write_text(json.dumps(out, indent=1) + "\n")
