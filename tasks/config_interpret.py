"""Config of latent interpretation: the evaluate stage's latent-contexts table
(``evaluate.latent_contexts``) and the ``interpret`` stage (``interpret``): which LLM writes
and scores explanations, how many latents, the SAGE-style refinement, and the latent
analyses that run inside the stage (``interpret.analyses``, :mod:`tasks.config_latent`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.config_latent import LatentAnalysisConfig
from tasks.config_sections import Strict


class LatentContextsConfig(Strict):
    """``metrics/latent_contexts.parquet`` (evaluate stage): for run 0 of every method, its first
    and last member, a seeded sample of latents stratified by firing frequency (one latent per
    equal-count frequency bin of the latents that fire), and for each its top-activating
    contexts, a seeded sample of its other activating contexts, and non-activating ones."""

    latents_per_member: int = Field(
        default=4, ge=0, description="Latents sampled per member, one per frequency bin (bin 0: the rarest that fire); 0: no table.")
    top: int = Field(default=8, ge=1, description="Top-activating contexts kept per latent (what the explainer reads).")
    random: int = Field(
        default=6, ge=0, description="Other activating contexts per latent, a seeded sample of its non-zero codes outside the top "
        "ones (held-out positives for detection and fuzzing).")
    negatives: int = Field(
        default=6, ge=0, description="Non-activating contexts per latent: seeded tokens whose whole context window has a zero code.")
    max_tokens: int = Field(
        default=10_000, gt=0, description="The first this many test tokens (file order) are searched (every member of every run-0 "
        "model encodes them once).")
    seed: int = Field(default=0, description="Seed of the latent sample and of the random and negative contexts.")


class LLMConfig(Strict):
    """The LLM that writes explanations and answers the scoring questions (:mod:`sae_core.llm`)."""

    backend: Literal["local", "openai", "recorded"] = Field(
        default="local",
        description="local: a transformers chat model on this machine, greedy (default: the embedded SmolLM2-135M-Instruct, "
        "weak but real and offline). openai: any OpenAI-compatible /chat/completions endpoint (base_url + model). recorded: "
        "replays the answers of an earlier run's interpret/transcript.parquet (`transcript`), keyed by a hash of each prompt.",
    )
    model: str = Field(
        default="smollm2-135m",
        description="local: an embedded model name or a local transformers directory with a chat template; openai: the "
        "endpoint's model name.")
    base_url: str | None = Field(default=None, description="openai: the endpoint, e.g. http://localhost:8000/v1.")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="openai: environment variable holding the API key (unset: none sent).")
    transcript: str | None = Field(default=None, description="recorded: the transcript Parquet to replay (a run's interpret/transcript.parquet).")
    max_new_tokens: int = Field(default=32, gt=0, le=512, description="Tokens an explanation or a proposal may take.")
    timeout_s: float = Field(default=60.0, gt=0, description="openai: seconds one request may take.")

    @model_validator(mode="after")
    def _check(self) -> "LLMConfig":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("interpret.llm.backend 'openai' needs interpret.llm.base_url (e.g. http://localhost:8000/v1)")
        if self.backend == "recorded" and not self.transcript:
            raise ValueError("interpret.llm.backend 'recorded' needs interpret.llm.transcript (an interpret/transcript.parquet)")
        return self


class InterpretConfig(Strict):
    """The interpret stage: per sampled latent an explanation from its top contexts, scored by
    detection and fuzzing (balanced accuracy, and AUROC from P(yes) when the backend gives it),
    per method mean with a CI over latents; then the latent analyses."""

    latents_per_member: int = Field(
        default=2, ge=0, description="Latents explained per (method, member) of the contexts table, spread over its frequency "
        "bins; 0: no explanations (the stage is off, except the analyses).")
    methods: list[str] | None = Field(
        default_factory=lambda: ["single", "bagging", "boosting"],
        description="Methods explained (their run 0, first and last member; None: every method of the contexts table).")
    explain_contexts: int = Field(default=5, ge=1, description="Top contexts shown to the explainer.")
    detection_contexts: int = Field(
        default=3, ge=1, description="Held-out activating (the random sample) and as many non-activating contexts per latent, "
        "each judged alone.")
    fuzzing_contexts: int = Field(
        default=4, ge=0, description="Held-out activating contexts per latent shown with marked tokens; half (seeded) marked on "
        "random tokens instead. 0: no fuzzing.")
    refine_rounds: int = Field(
        default=0, ge=0, le=5, description="SAGE-style rounds: the explainer proposes test sentences, the stage reads the latent's "
        "activations on them (analysed model + SAE) and the explainer revises. 0: off.")
    refine_inputs: int = Field(default=3, ge=1, le=10, description="Test sentences read per refinement round.")
    confidence: float = Field(default=0.95, gt=0, lt=1, description="Level of the CIs of the per-method means (t over latents).")
    seed: int = Field(default=0, description="Seed of the fuzzing marks and the context order.")
    llm: LLMConfig = Field(default_factory=LLMConfig)
    analyses: LatentAnalysisConfig = Field(default_factory=LatentAnalysisConfig)

    @model_validator(mode="after")
    def _check(self) -> "InterpretConfig":
        from sae_core.methods import METHOD_NAMES

        unknown = sorted(set(self.methods or ()) - set(METHOD_NAMES))
        if unknown:
            raise ValueError(f"interpret.methods: unknown method(s) {unknown}; choose from {', '.join(METHOD_NAMES)}")
        return self
