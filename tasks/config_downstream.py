"""The downstream stage's configuration (SPEC §7): sparse probing and spurious correlation removal."""

from __future__ import annotations

from pydantic import Field, model_validator

from tasks.config_sections import DeviceSetting, Strict, device_field

# ------------------------------------------------------------------------- downstream
#: the downstream stage's default sae-probes tasks: all 113 binary ones (topic, sentiment, entity/fact, syntax, code, ...).
#: The CI of the mean over tasks is over tasks, so its width is set by the number of tasks and their spread; 15 texts
#: per class and split of 8 tokens each keep the stage's time at what BBC and tweets cost before (README, downstream).
SAE_PROBES_DEFAULT_TASKS = ("all",)
SAE_PROBES_DOCUMENTS_PER_CLASS = 15
SAE_PROBES_MAX_TOKENS = 8


class DownstreamConfig(Strict):
    """Concept detection (sparse probing) and spurious correlation removal (SPEC §7).

    Documents are run through the model, layer and context length of the extraction
    (``activations/manifest.json``), keeping each document's first
    ``max_tokens_per_document`` tokens; every trained model is evaluated at every
    J = 1..J_max prefix, and the raw activations give the baseline (method "raw").
    """

    probing_datasets: list[str] = Field(
        default_factory=list,
        description="Labelled sets for sparse probing besides the sae-probes tasks: bbc (5 topics), tweets (positive vs "
        "negative), or a local file / hub dataset with 'text' and 'label' columns.",
    )
    probing_ks: list[int] = Field(default_factory=lambda: [1, 2, 5, 10], min_length=1, description="Latents per probe (k).")
    max_documents_per_class: int = Field(
        default=40, gt=0, description="Probing: documents per class in each of train and test (balanced, seeded)."
    )
    max_tokens_per_document: int = Field(
        default=64, ge=1, description="Tokens kept per document (its first ones, at most one context window); pooled."
    )
    scr_pairs: list[tuple[str, str]] = Field(
        default_factory=list,
        description="BBC topic pairs (business, entertainment, politics, sports, tech) used as the SCR target y, pronoun "
        "gender as z (e.g. [[entertainment, sports]]; on MiniLM their headroom is below 0.05).",
    )
    scr_n_ablated: list[int] = Field(
        default_factory=lambda: [2, 5, 10, 20, 50, 100], min_length=1, description="Latents ablated (n)."
    )
    scr_min_cell: int = Field(default=20, gt=0, description="Fewest rows (paragraphs, names) a (y, z) cell of an SCR set may hold.")
    scr_max_documents_per_cell: int = Field(
        default=30, gt=0, description="SCR: cap on the rows per (y, z) cell and split (splits take whole documents)."
    )
    sae_probes_tasks: list[str] = Field(
        default_factory=lambda: list(SAE_PROBES_DEFAULT_TASKS),
        description="Binary tasks of the sae-probes benchmark (Kantamneni et al.) for sparse probing, by tag (glue_sst2), "
        "file name (92_glue_sst2) or 'all' (all 113); [] for none. Needs the package sae-probes.",
    )
    sae_probes_max_tokens: int = Field(
        default=SAE_PROBES_MAX_TOKENS, ge=1,
        description="Tokens kept per sae-probes text (its first ones; max_tokens_per_document is the cap of the other sets); pooled.",
    )
    sae_probes_documents_per_class: int = Field(
        default=SAE_PROBES_DOCUMENTS_PER_CLASS, gt=0,
        description="sae-probes tasks: documents per class in each of train and test (balanced, seeded; repeated prompts kept once).",
    )
    scr_sae_probes: list[tuple[str, str]] = Field(
        default_factory=lambda: [("hist_fig_ismale", "hist_fig_isamerican"), ("hist_fig_ismale", "hist_fig_ispolitician")],
        description="SCR sets from two sae-probes tasks over the same texts: (target y task, spurious z task).",
    )
    scr_planted: list[str] = Field(
        default_factory=lambda: ["glue_sst2"],
        description="SCR sets with a planted spurious cue: sae-probes tasks whose texts of z = 1 (half of each class) start "
        "with a fixed phrase, so the spurious feature is known.",
    )
    scr_min_headroom: float = Field(
        default=0.05, ge=0, lt=1,
        description="SCR pairs whose A_oracle - A_base is below this have no headroom: shown as such, left out of every "
        "mean and figure (their score would divide by noise).",
    )
    batch_size: int = Field(default=32, gt=0, description="Documents per forward pass of the language model.")
    device: DeviceSetting = device_field("the language model and the SAEs")
    encode_batch_size: int = Field(default=4096, gt=0, description="Tokens encoded per batch by an SAE.")
    confidence: float = Field(default=0.95, gt=0, lt=1, description="Level of the confidence bands in the figures.")
    seed: int = Field(default=0, description="Seed of the document samples and probes.")

    @model_validator(mode="after")
    def _check(self) -> "DownstreamConfig":
        same = [p for p in self.scr_pairs if p[0] == p[1]]
        if same:
            raise ValueError(f"an SCR pair needs two different topics; got {same}")
        if any(k < 1 for k in self.probing_ks) or any(n < 1 for n in self.scr_n_ablated):
            raise ValueError("probing_ks and scr_n_ablated must be positive")
        return self
