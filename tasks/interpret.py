"""The interpret stage: explanations of latents by an LLM, scored by detection and fuzzing
(issue 21), then the latent analyses (:func:`tasks.latent_analyses.run_latent_analyses`).

Reads ``metrics/latent_contexts.parquet`` (evaluate; validated) and, for the SAGE-style
refinement, the extraction's model and the saved ensembles; writes

    interpret/explanations.parquet  one row per explained latent: explanation and scores
    interpret/transcript.parquet    every prompt and raw answer (re-scorable; the `recorded` backend replays it)
    interpret/summary.parquet       per method and member position: mean score with a t CI over latents

For each (model, member) of the contexts table, ``latents_per_member`` of its sampled latents
spread over the frequency bins are explained from their top contexts; detection judges the
held-out activating contexts (the table's random sample) and as many non-activating ones,
fuzzing the held-out activating contexts with right or (a seeded half) wrong marks
(:mod:`sae_core.llm_scoring`).
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from data_contracts.interpret import EXPLANATIONS, SCORES, TRANSCRIPT, write_interpret
from data_contracts.interpret_contexts import read_latent_contexts
from sae_core.llm import LLM, prompt_key
from sae_core.llm_scoring import Call, Snippet, detect, explain, fuzz, refine, scores
from sae_core.stats import mean_ci
from tasks.common import StageResult
from tasks.config_interpret import InterpretConfig
from tasks.interpret_contexts import LATENT_CONTEXTS_FILE
from tasks.progress import ProgressLog

INTERPRET_DIR = "interpret"
EXPLANATIONS_FILE = f"{INTERPRET_DIR}/explanations.parquet"
TRANSCRIPT_FILE = f"{INTERPRET_DIR}/transcript.parquet"
SUMMARY_FILE = f"{INTERPRET_DIR}/summary.parquet"
LATENT_KEY = ["model", "method", "member", "latent"]


def select_latents(contexts: pd.DataFrame, n: int, methods: list[str] | None) -> pd.DataFrame:
    """Per (model, member): ``n`` of its sampled latents, evenly spread over their frequency bins
    (both ends kept); the latent key, frequency and bin, in table order."""
    latents = contexts.drop_duplicates(["model", "member", "latent"])[[*LATENT_KEY, "frequency", "frequency_bin"]]
    if methods is not None:
        latents = latents[latents["method"].isin(methods)]
    chosen = []
    for _, group in latents.sort_values(["model", "member", "frequency_bin", "latent"]).groupby(["model", "member"], sort=False):
        picks = np.unique(np.linspace(0, len(group) - 1, min(n, len(group))).round().astype(int)) if n else []
        chosen.append(group.iloc[picks])
    return pd.concat(chosen, ignore_index=True) if chosen else latents.iloc[:0]


def snippets(rows: pd.DataFrame, kind: str, n: int) -> list[Snippet]:
    """The first ``n`` contexts of ``kind`` by rank."""
    chosen = rows[rows["kind"] == kind].sort_values("rank").head(n)
    return [Snippet(tuple(p), tuple(float(a) for a in acts)) for p, acts in zip(chosen["pieces"], chosen["activations"])]


def interpret_latent(llm: LLM, rows: pd.DataFrame, cfg: InterpretConfig, latent: pd.Series, reader=None) -> tuple[dict, list[Call]]:
    """Explain one latent (and refine), then score the explanation; its explanations row and every call."""
    seed = [cfg.seed, zlib.crc32(latent["model"].encode()), int(latent["member"]), int(latent["latent"])]
    explanation, calls = explain(llm, snippets(rows, "top", cfg.explain_contexts), cfg.llm.max_new_tokens)
    rounds = 0
    if cfg.refine_rounds and reader is not None:
        def read(sentences: list[str]) -> list[Snippet]:
            return reader.read(latent["model"], int(latent["member"]), int(latent["latent"]), sentences)

        explanation, refined = refine(llm, explanation, read, cfg.refine_rounds, cfg.refine_inputs, cfg.llm.max_new_tokens)
        calls += refined
        rounds = sum(c.step == "revise" for c in refined)
    held_out = snippets(rows, "random", max(cfg.detection_contexts, cfg.fuzzing_contexts))
    detected = detect(llm, explanation, held_out[: cfg.detection_contexts], snippets(rows, "negative", cfg.detection_contexts),
                      np.random.default_rng(seed + [1]))
    fuzzed = fuzz(llm, explanation, held_out[: cfg.fuzzing_contexts], np.random.default_rng(seed + [2])) if cfg.fuzzing_contexts else []
    (det_acc, det_auc), (fuzz_acc, fuzz_auc) = scores(detected), scores(fuzzed)
    row = {**{k: latent[k] for k in (*LATENT_KEY, "frequency", "frequency_bin")}, "explanation": explanation, "backend": llm.name,
           "detection_accuracy": det_acc, "detection_auroc": det_auc, "fuzzing_accuracy": fuzz_acc, "fuzzing_auroc": fuzz_auc,
           "n_detection": len(detected), "n_fuzzing": len(fuzzed), "refine_rounds": rounds}
    return row, calls + detected + fuzzed


def transcript_rows(latent: pd.Series, calls: list[Call], backend: str) -> list[dict]:
    return [{**{k: latent[k] for k in LATENT_KEY}, "step": c.step, "item": c.item, "kind": c.kind, "max_new_tokens": c.max_new_tokens,
             "prompt_key": prompt_key(c.kind, c.prompt, c.max_new_tokens), "prompt": c.prompt, "answer": c.answer,
             "p_yes": c.p_yes, "truth": c.truth, "backend": backend} for c in calls]


def summarise_scores(explanations: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Per method and member position (first: member 0, last: the model's last member, all):
    n, mean and t CI over latents of every score with values (the CI cut to [0, 1], where scores lie)."""
    rows = []
    for method, frame in explanations.groupby("method", sort=True):
        last = frame.groupby("model")["member"].transform("max")
        parts = {"all": frame}
        if (last > 0).any():
            parts |= {"first": frame[frame["member"] == 0], "last": frame[(frame["member"] == last) & (last > 0)]}
        for position, part in parts.items():
            for score in SCORES:
                values = part[score].dropna().to_numpy(dtype=float)
                if values.size:
                    mean, low, high = mean_ci(values, confidence)
                    low, high = (None, None) if low is None else (max(low, 0.0), min(high, 1.0))  # scores lie in [0, 1]
                    rows.append({"method": method, "position": position, "score": score, "n_latents": int(values.size),
                                 "mean": mean, "ci_low": low, "ci_high": high, "confidence": confidence})
    return pd.DataFrame(rows, columns=["method", "position", "score", "n_latents", "mean", "ci_low", "ci_high", "confidence"])


def explain_latents(run_dir: Path, cfg: InterpretConfig, contexts: pd.DataFrame, llm: LLM, result: StageResult) -> pd.DataFrame:
    """Explain and score the selected latents; write the three tables; the explanations."""
    from tasks.interpret_llm import ActivationReader

    latents = select_latents(contexts, cfg.latents_per_member, cfg.methods)
    reader = ActivationReader(run_dir) if cfg.refine_rounds else None
    by_latent = {key: rows for key, rows in contexts.groupby(["model", "member", "latent"])}
    log = ProgressLog("interpret", len(latents), "latents")
    explained, transcript = [], []
    for _, latent in latents.iterrows():
        row, calls = interpret_latent(llm, by_latent[latent["model"], latent["member"], latent["latent"]], cfg, latent, reader)
        explained.append(row)
        transcript += transcript_rows(latent, calls, llm.name)
        log.advance(1, f"{latent['model']} member {latent['member']} latent {latent['latent']}: {row['explanation']!r}")
    log.finish()
    explanations = pd.DataFrame(explained, columns=EXPLANATIONS.names)
    summary = summarise_scores(explanations, cfg.confidence)
    for frame, kind, rel in ((explanations, "interpret_explanations", EXPLANATIONS_FILE),
                             (pd.DataFrame(transcript, columns=TRANSCRIPT.names), "interpret_transcript", TRANSCRIPT_FILE),
                             (summary, "interpret_summary", SUMMARY_FILE)):
        write_interpret(frame, kind, run_dir / rel)
        result.written.append(rel)
        result.validated.append(rel)
    result.tables["interpret_summary"] = summary
    result.notes.append(f"{len(explanations)} latents explained by {llm.name} with {len(transcript)} LLM calls")
    return explanations


def run_interpret(cfg: InterpretConfig, run_dir: str | Path, *, progress: bool = True) -> StageResult:
    """Explain and score latents, then run the latent analyses; see the module docstring."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    result = StageResult(stage="interpret")
    explanations = None
    if cfg.latents_per_member and not (run_dir / LATENT_CONTEXTS_FILE).is_file():
        # evaluate ran (the flow checked its summary) but described no latent: no run-0 model, no test split, or
        # evaluate.latent_contexts.latents_per_member 0
        result.notes.append(f"{LATENT_CONTEXTS_FILE} was not written by the evaluate stage (no run-0 model or test split, or "
                            "evaluate.latent_contexts.latents_per_member is 0): no explanations")
    elif cfg.latents_per_member:
        contexts = read_latent_contexts(run_dir / LATENT_CONTEXTS_FILE)
        result.read.append(LATENT_CONTEXTS_FILE)
        result.validated.append(LATENT_CONTEXTS_FILE)
        from tasks.interpret_llm import make_llm

        explanations = explain_latents(run_dir, cfg, contexts, make_llm(cfg.llm), result)
    else:
        result.notes.append("interpret.latents_per_member is 0: no explanations")
    from tasks.latent_analyses import run_latent_analyses

    written = run_latent_analyses(run_dir, cfg.analyses, explanations)
    result.written += written
    result.validated += [w for w in written if w.endswith(".parquet")]
    result.seconds = time.perf_counter() - start
    return result
