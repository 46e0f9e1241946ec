"""Steering (related.md §6, §9): the job of :mod:`tasks.latent_analyses` that writes
``latents/steering.parquet``, for decoder models only.

For each chosen latent i of member j of ``steering.method``'s run-0 ensemble (``latents`` as
given; else the best-explained ones by the interpret stage's first score column; else the most
frequent on the test tokens), greedy generations from every prompt with α·d_i added to the
residual stream at the hooked layer (:mod:`sae_core.steering`), where d_i is the member's
decoder row and α = strength × the latent's typical activation (its mean non-zero code on the
first STEERING_TOKENS test tokens), so strength 1 adds what the latent typically writes.
An encoder model (MiniLM) cannot generate: the job logs why it skips and writes nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from data_contracts.activations import read_manifest
from data_contracts.latents import write_latent_table
from sae_core.io import load_ensemble
from sae_core.steering import greedy_generate, steered_generate
from tasks.common import ACTIVATIONS_DIR, ModelDir, has_ensemble
from tasks.config_latent import SteeringConfig
from tasks.latent_data import STEERING_FILE, TEST_SPLIT, first_tokens
from tasks.progress import ProgressLog, run_logger

STEERING_TOKENS = 4096
#: the explanations' score that ranks latents: the first of these columns present (the interpret stage writes the four first)
SCORE_COLUMNS = ("detection_auroc", "detection_accuracy", "fuzzing_auroc", "fuzzing_accuracy", "score")


def best_explained(explanations: pd.DataFrame | None, model: str, n: int) -> list[tuple[int, int]]:
    """(member, latent) of the ``n`` latents of ``model`` with the highest explanation score
    (the first of SCORE_COLUMNS present); [] when nothing is known."""
    if explanations is None or not {"model", "member", "latent"} <= set(explanations.columns):
        return []
    column = next((c for c in SCORE_COLUMNS if c in explanations.columns), None)
    if column is None:
        return []
    rows = explanations[(explanations["model"] == model) & explanations[column].notna()]
    rows = rows.sort_values([column, "member", "latent"], ascending=[False, True, True]).drop_duplicates(["member", "latent"])
    return [(int(j), int(i)) for j, i in rows[["member", "latent"]].head(n).itertuples(index=False)]


def most_frequent(codes: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """(member, latent) of the ``n`` latents that fire on the most tokens: codes [J, N, m]."""
    counts = (codes > 0).sum(1).flatten()
    order = np.lexsort((np.arange(counts.numel()), -counts.numpy()))[:n]
    m = codes.shape[2]
    return [(int(i) // m, int(i) % m) for i in order if counts[i] > 0]


def run_steering(run_dir: Path, cfg: SteeringConfig, explanations: pd.DataFrame | None, progress: bool = True) -> list[str]:
    """Generate with and without each chosen latent; the paths written ([] when skipped)."""
    from sae_core.models import NotACausalLM, load_model

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir / ACTIVATIONS_DIR)
    try:
        loaded = load_model(manifest.model, manifest.layer, causal_lm=True)
    except NotACausalLM:
        run_logger().info(f"interpret: steering skipped: {manifest.model} is not a causal LM (an encoder cannot generate); "
                          "steering needs a decoder model, e.g. configs/smollm2-topk.yaml")
        return []
    except (OSError, ValueError) as err:   # activations not from a loadable model (synthetic data)
        run_logger().info(f"interpret: steering skipped: the analysed model {manifest.model!r} cannot be loaded ({err})")
        return []
    model_dir = ModelDir(cfg.method, 0)
    if not has_ensemble(run_dir, model_dir):
        raise FileNotFoundError(f"steering uses {model_dir.relative}, which the train stage did not write; set "
                                "interpret.analyses.steering.method to a trained method, or enabled: false")
    ensemble = load_ensemble(model_dir.path(run_dir))
    tokens = first_tokens(run_dir, TEST_SPLIT, STEERING_TOKENS)
    if tokens is None:
        raise ValueError(f"steering needs the {TEST_SPLIT} split's activations to scale its directions; run extract with a test split")
    with torch.no_grad():
        codes = ensemble.member_codes(tokens.acts.float().to(ensemble.device)).cpu()   # [J, N, m]
    chosen = (list(cfg.latents) if cfg.latents is not None
              else best_explained(explanations, model_dir.relative, cfg.n_latents) or most_frequent(codes, cfg.n_latents))
    for j, i in chosen:
        if not (0 <= j < ensemble.n_members and 0 <= i < ensemble.member_cfg.d_sae):
            raise ValueError(f"steering latent (member {j}, latent {i}) is not in {model_dir.relative} "
                             f"({ensemble.n_members} members of {ensemble.member_cfg.d_sae} latents)")
    tokenizer, eos = loaded.tokenizer, loaded.tokenizer.eos_token_id
    prompts = {p: loaded.prefix_ids + tokenizer(p, add_special_tokens=False)["input_ids"] for p in cfg.prompts}
    plain = {p: greedy_generate(loaded.model, ids, cfg.max_new_tokens, eos) for p, ids in prompts.items()}
    log = ProgressLog("interpret: steering", len(chosen) * len(prompts) * len(cfg.strengths), "generations", enabled=progress)
    rows = []
    for j, i in chosen:
        fired = codes[j, :, i][codes[j, :, i] > 0]
        typical = float(fired.mean()) if fired.numel() else 0.0
        direction = ensemble.members.W_dec[j, i].detach().float().cpu()
        for prompt, ids in prompts.items():
            for strength in cfg.strengths:
                alpha = strength * typical
                new = plain[prompt] if alpha == 0 else steered_generate(loaded.model, loaded.block, direction, alpha, ids,
                                                                        cfg.max_new_tokens, eos)
                rows.append({"model": model_dir.relative, "member": j, "latent": i, "prompt": prompt, "strength": float(strength),
                             "norm": abs(alpha) * float(direction.norm()), "generation": tokenizer.decode(new, skip_special_tokens=True),
                             "changed": new != plain[prompt]})
                log.advance(1)
    log.finish(f"{len(chosen)} latents of {model_dir.relative}")
    write_latent_table(pd.DataFrame(rows, columns=["model", "member", "latent", "prompt", "strength", "norm", "generation", "changed"]),
                       run_dir / STEERING_FILE, "steering")
    return [STEERING_FILE]
