"""Record the LLM transcript that `make test` replays (tests/test_interpret.py).

    .venv/bin/sae-ensembles run --config configs/smoke.yaml --out /tmp/smoke   # (through evaluate is enough)
    .venv/bin/python tests/record_interpret_transcript.py /tmp/smoke

It keeps, of the smoke run's ``metrics/latent_contexts.parquet``, one latent per member of
run 0 of single, bagging and boosting (the one :func:`tasks.interpret.select_latents`
picks) with all their contexts, writes them to ``tests/data/interpret_contexts.parquet``,
runs the interpret stage on them with the real embedded SmolLM2-135M-Instruct (backend
``local``: greedy, on the CPU) and saves its transcript — every prompt and raw answer with
P(yes) — as ``tests/data/interpret_transcript.parquet``. The test then runs the same stage
with backend ``recorded`` on the same contexts: every prompt must be found.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
CONTEXTS = DATA / "interpret_contexts.parquet"
TRANSCRIPT = DATA / "interpret_transcript.parquet"
METHODS = ["single", "bagging", "boosting"]


def record_config(backend: str = "local", transcript: str | None = None):
    """The interpret config of the recording (and of its replay: only the backend differs)."""
    from tasks.config_interpret import InterpretConfig
    from tasks.config_latent import LatentAnalysisConfig

    analyses = LatentAnalysisConfig(**{name: {"enabled": False} for name in ("monosemanticity", "cones", "sparse_head", "steering")})
    return InterpretConfig(latents_per_member=1, methods=METHODS, explain_contexts=5, detection_contexts=3, fuzzing_contexts=4,
                           llm={"backend": backend, "transcript": transcript}, analyses=analyses)


def main(run_dir: str) -> None:
    sys.path.insert(0, str(ROOT))
    import pandas as pd

    from data_contracts.interpret_contexts import read_latent_contexts, write_latent_contexts
    from tasks.interpret import run_interpret, select_latents

    contexts = read_latent_contexts(Path(run_dir) / "metrics" / "latent_contexts.parquet")
    chosen = select_latents(contexts, 1, METHODS)[["model", "member", "latent"]]
    kept = contexts.merge(chosen, on=["model", "member", "latent"])
    DATA.mkdir(parents=True, exist_ok=True)
    write_latent_contexts(kept, CONTEXTS)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics").mkdir()
        shutil.copy(CONTEXTS, Path(tmp) / "metrics" / "latent_contexts.parquet")
        start = time.perf_counter()
        run_interpret(record_config("local"), tmp, progress=False)
        seconds = time.perf_counter() - start
        shutil.copy(Path(tmp) / "interpret" / "transcript.parquet", TRANSCRIPT)
        explanations = pd.read_parquet(Path(tmp) / "interpret" / "explanations.parquet")
    print(f"{len(chosen)} latents, {len(pd.read_parquet(TRANSCRIPT))} calls in {seconds:.1f} s -> {CONTEXTS}, {TRANSCRIPT}")
    print(explanations[["model", "member", "latent", "explanation", "detection_accuracy", "fuzzing_accuracy"]].to_string())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
