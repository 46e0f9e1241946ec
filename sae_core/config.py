"""Configuration objects of sae_core.

Two kinds, kept apart on purpose (as SAELens does): :class:`SAEConfig` is what a saved
SAE needs to run inference and is written to ``cfg.json``; :class:`TrainConfig` holds the
training recipe and never leaks into a saved SAE file. Every field carries its help text
in ``description`` so a CLI or the Prefect UI can show it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer, model_validator

from sae_core.registry import add_architecture_enum, check_architecture, get_architecture, uses_k

#: an architecture registered in :mod:`sae_core.registry` (one file in sae_core/saes/)
ArchitectureName = Annotated[str, AfterValidator(check_architecture)]


def _check_prefix_fractions(fractions: tuple[float, ...] | None) -> tuple[float, ...] | None:
    if fractions is None:
        return None
    if not fractions or any(not 0 < f <= 1 for f in fractions) or fractions[-1] != 1.0 \
            or any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ValueError(
            f"prefix_fractions must be strictly increasing fractions of d_sae in (0, 1] ending with 1.0, got {list(fractions)} "
            "(e.g. [0.0625, 0.1875, 0.4375, 1.0])"
        )
    return fractions


#: Fields of SAEConfig that only some architectures use. An architecture class lists the ones it
#: uses, with their defaults, in ``config_fields`` (name -> default); the others must stay None.
#: None values are left out of the dump, so the cfg.json and fingerprints of the other
#: architectures are what they were before these fields existed.
PrefixFractions = Annotated[tuple[float, ...] | None, AfterValidator(_check_prefix_fractions), Field(
    description="matryoshka: where the nested prefixes end, as fractions of d_sae (strictly increasing, the last 1.0; "
    "prefix l is the first max(1, round(f_l · d_sae)) latents, so an expanded SAE of J·d_sae latents keeps the same "
    "shape). Default (0.0625, 0.1875, 0.4375, 1.0): dictionary_learning's group_fractions (1/16, 1/8, 1/4, 9/16) "
    "cumulated. ordered with prefix_distribution 'groups': the groups of p_ND. Unused by other architectures.")]
MatryoshkaCode = Annotated[Literal["batchtopk", "topk"] | None, Field(
    description="matryoshka: the code shared by all prefixes, batchtopk (the B·k largest activations of a batch in "
    "training, a learned threshold at inference: Bussmann et al.) or topk (k per token, training and inference). "
    "Default batchtopk. Unused by other architectures.")]
PrefixDistribution = Annotated[Literal["uniform", "geometric", "groups"] | None, Field(
    description="ordered: p_ND, the distribution of the prefix length l in 1..d_sae that weighs the prefix losses "
    "(the OSAE paper leaves its exact form open): uniform (1/d_sae each), geometric (p(l) ∝ exp(-l / (prefix_scale · "
    "d_sae)), truncated: nested dropout's choice) or groups (equal mass per group of prefix_fractions, uniform inside "
    "a group: Matryoshka's groups with full support). Default geometric. Unused by other architectures.")]
PrefixScale = Annotated[float | None, Field(
    gt=0, description="ordered, prefix_distribution geometric: the decay length of p_ND as a fraction of d_sae "
    "(default 0.25; unused by the other distributions).")]
LatentSorts = Annotated[int | None, Field(
    ge=0, description="ordered: how many times training re-sorts each member's latents, evenly spaced (after steps "
    "n_steps·i/N, the last one after the final step), by their squared contribution since the last sort, largest first "
    "(with their Adam moments; 0: never). Default 20. A permutation leaves a plain SAE's loss unchanged but not the "
    "ordered loss, whose prefix weights favour the larger contributions first; it lets two seeds settle on the same "
    "order (tests/test_matryoshka_ordered.py).")]
ARCHITECTURE_FIELDS: tuple[str, ...] = ("prefix_fractions", "matryoshka_code", "prefix_distribution", "prefix_scale",
                                        "latent_sorts")


class _Strict(BaseModel):
    """Unknown keys and wrong types are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SAEConfig(_Strict):
    """Inference configuration of one SAE (the content of ``cfg.json``)."""

    architecture: ArchitectureName = Field(
        description="SAE architecture, a name registered in sae_core.registry: relu (ReLU + L1), topk, batchtopk, "
        "jumprelu, gated, or any architecture file added under sae_core/saes/.",
        json_schema_extra=add_architecture_enum,
    )
    d_in: int = Field(gt=0, description="Width d of the activations the SAE reads.")
    d_sae: int = Field(gt=0, description="Number of latents (dictionary size).")
    k: int | None = Field(
        default=None,
        gt=0,
        description="Active latents per token (topk) or mean active latents per token "
        "during training (batchtopk). Required for those two, unused otherwise.",
    )
    apply_b_dec_to_input: bool = Field(
        default=True, description="Encode a - b_dec instead of a (SPEC §5 form)."
    )
    prefix_fractions: PrefixFractions = None
    matryoshka_code: MatryoshkaCode = None
    prefix_distribution: PrefixDistribution = None
    prefix_scale: PrefixScale = None
    latent_sorts: LatentSorts = None

    @model_validator(mode="before")
    @classmethod
    def _architecture_defaults(cls, data: Any) -> Any:
        """Fill in the defaults of the architecture's own fields (its ``config_fields``), then those that
        depend on other fields (its ``config_defaults(data)``, if it has one)."""
        if isinstance(data, dict) and isinstance(data.get("architecture"), str):
            try:
                arch = get_architecture(data["architecture"])
            except KeyError:
                return data  # the architecture field's own validator names the problem
            data = {**data, **{name: default for name, default in getattr(arch, "config_fields", {}).items() if data.get(name) is None}}
            dependent = getattr(arch, "config_defaults", None)
            if dependent is not None:
                data = {**data, **{name: default for name, default in dependent(data).items() if data.get(name) is None}}
        return data

    @model_serializer(mode="wrap")
    def _drop_unused(self, handler) -> dict[str, Any]:
        data = handler(self)
        return {name: value for name, value in data.items() if not (name in ARCHITECTURE_FIELDS and value is None)}

    @model_validator(mode="after")
    def _check_architecture_fields(self) -> "SAEConfig":
        cls = get_architecture(self.architecture)
        own = getattr(cls, "config_fields", {})
        for name in ARCHITECTURE_FIELDS:
            if getattr(self, name) is not None and name not in own:
                users = ", ".join(a for a in _architectures_using(name)) or "no registered architecture"
                raise ValueError(f"{name} is only meaningful for {users}, not {self.architecture!r}; remove {name}")
        check = getattr(cls, "check_config", None)
        if check is not None:
            check(self)  # the architecture's own cross-field checks (a ValueError names the problem)
        return self

    @model_validator(mode="after")
    def _check_k(self) -> "SAEConfig":
        if uses_k(self.architecture):
            if self.k is None:
                raise ValueError(f"architecture {self.architecture!r} needs k (active latents per token); set k")
            if self.k > self.d_sae:
                raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}; choose k <= d_sae")
        elif self.k is not None:
            raise ValueError(
                f"k is only meaningful for architectures that keep k active latents (topk, batchtopk), not "
                f"{self.architecture!r}; remove k "
                "(sparsity of L1/L0 SAEs is set by TrainConfig.sparsity_coefficient)"
            )
        return self


def _architectures_using(field_name: str) -> list[str]:
    from sae_core.registry import architectures

    return [a for a in architectures() if field_name in getattr(get_architecture(a), "config_fields", {})]


class ArchitectureOptions(_Strict):
    """The SAEConfig fields that only some architectures use, for a stage config (every member gets them)."""

    prefix_fractions: PrefixFractions = None
    matryoshka_code: MatryoshkaCode = None
    prefix_distribution: PrefixDistribution = None
    prefix_scale: PrefixScale = None
    latent_sorts: LatentSorts = None

    def sae_fields(self) -> dict[str, Any]:
        """The options that are set, as SAEConfig keyword arguments."""
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS if getattr(self, name) is not None}


class PAnnealConfig(_Strict):
    """p-annealing of the sparsity exponent (Karvonen et al. 2024, eqs. 13-14).

    p = 1 until ``start_step``; then p steps through ``linspace(p_start, p_end, n_updates)``
    at ``n_updates`` evenly spaced steps in [start_step, end_step]. At each change the
    sparsity coefficient is rescaled by the ratio of the summed L_p^p norms at the old and
    new p over the last ``queue_length`` batches, so the penalty's strength stays locally
    constant.
    """

    p_start: float = Field(default=1.0, gt=0, le=1, description="First annealed exponent.")
    p_end: float = Field(default=0.2, gt=0, le=1, description="Final exponent (paper: 0.2).")
    start_step: int = Field(ge=0, description="Step at which annealing starts.")
    end_step: int | None = Field(default=None, description="Last update step; default: the last step.")
    n_updates: int = Field(default=10, ge=1, description="Number of changes of p.")
    queue_length: int = Field(default=10, ge=1, description="Batches used for the coefficient ratio.")


class TrainConfig(_Strict):
    """Training recipe for one SAE or a batch of members trained side by side."""

    n_steps: int = Field(gt=0, description="Optimizer steps.")
    batch_size: int = Field(default=4096, gt=0, description="Tokens per step (per member).")
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate.")
    beta1: float = Field(default=0.0, ge=0, lt=1, description="Adam beta1 (the paper uses 0).")
    beta2: float = Field(default=0.999, ge=0, lt=1, description="Adam beta2.")
    adam_eps: float = Field(default=1e-8, gt=0, description="Adam epsilon.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear lr warm-up steps from 0.")
    decay_start_fraction: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Fraction of n_steps after which lr decays linearly to 0 (1.0 = no decay).",
    )
    grad_clip: float | None = Field(
        default=1.0, gt=0, description="Max gradient norm per member; None disables clipping."
    )
    seed: int = Field(default=0, description="Seed of initialisation and batch order.")
    autocast_bf16: bool = Field(default=False, description="Run matmuls in bf16 autocast (weights stay fp32).")
    fast_paths: bool = Field(
        default=True,
        description="Use the sparse / hand-written training kernels (TopK: sparse encoder backward and "
        "decoder; ReLU: one fused step). False runs the plain dense autograd step they are tested against.",
    )
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = Field(
        default="geometric_median", description="Initial decoder bias from a data sample."
    )
    b_dec_init_samples: int = Field(default=8192, gt=0, description="Sample size for b_dec init.")
    encoder_init_norm: float | None = Field(
        default=None,
        gt=0,
        description="Initial encoder: W_enc = encoder_init_norm · W_decᵀ, the decoder rows random unit vectors. "
        "None: 0.1 for L1-type SAEs (relu, gated), 1 (tied) otherwise. With a tied encoder, a ReLU SAE of "
        "d_sae = 8d starts with half its latents on and a reconstruction about 4.5 times the (centred) input, "
        "and learns far more slowly (README, 'Learning as fast as the peers'); 0.1 makes it 0.45 times. Decoder rows stay unit norm (SPEC "
        "§5), so this is the start that small-norm decoder rows with W_enc = W_decᵀ (Anthropic's April 2024 "
        "update, SAELens' decoder_init_norm 0.1, dictionary_learning) reach once one step has renormalised them.",
    )
    normalize_decoder: bool = Field(
        default=True,
        description="Keep decoder rows at unit norm (projection of their gradient + renormalisation).",
    )
    freeze_decoder: bool = Field(
        default=False,
        description="Keep W_dec at its seeded random unit-norm initialisation for the whole run (no gradient, "
        "no optimizer step, no renormalisation); b_dec, the encoder and every other parameter train as usual. "
        "This is the random-decoder baseline (SPEC §5): same width and sparsity, trained encoder.",
    )
    dead_window_fraction: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="Dead-latent window as a fraction of the run: a latent that has not fired for "
        "round(dead_window_fraction · n_steps) steps (at least 1) of batch_size tokens counts as dead, for "
        "AuxK and the logged dead fraction. Scaling with the run makes AuxK act in short runs too (150 steps: "
        "a window of 15 steps), as SAELens' window in steps does; dead_tokens_threshold overrides it.",
    )
    dead_tokens_threshold: int | None = Field(
        default=None,
        gt=0,
        description="Absolute dead-latent window in tokens (e.g. OpenAI's 10,000,000); None: "
        "dead_window_fraction of the run's tokens.",
    )
    sparsity_coefficient: float = Field(
        default=1.0,
        ge=0,
        description="lambda: L1 weight (relu, gated) or L0 weight (jumprelu). Unused by topk/batchtopk.",
    )
    sparsity_warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up of lambda from 0.")
    p_annealing: PAnnealConfig | None = Field(
        default=None, description="Anneal the sparsity exponent p (relu and gated only)."
    )
    aux_k: int | None = Field(
        default=None,
        gt=0,
        description="Dead latents used by AuxK (topk/batchtopk); None: d_sae // 2 of the SAE being trained "
        "(so an expanded SAE of J·d_sae latents gets J·d_sae // 2).",
    )
    aux_coefficient: float = Field(default=1 / 32, ge=0, description="Weight of the AuxK loss.")
    jumprelu_bandwidth: float = Field(default=0.05, gt=0, description="Width epsilon of the rectangle kernel.")
    jumprelu_init_threshold: float = Field(default=0.01, gt=0, description="Initial JumpReLU threshold.")
    batchtopk_threshold_rate: float = Field(
        default=0.01, gt=0, le=1, description="EMA rate of BatchTopK's inference threshold."
    )
    bootstrap: bool = Field(
        default=False,
        description="True bagging: each member trains on its own bootstrap resample of the tokens "
        "(drawn from its seed). Off by default, as in the paper's naive bagging.",
    )
    checkpoint_every: int | None = Field(
        default=None, gt=0, description="Write a resumable checkpoint every this many steps."
    )
    log_every: int = Field(default=50, gt=0, description="Record training statistics every this many steps.")

    @property
    def dead_window_tokens(self) -> int:
        """Tokens without a firing after which a latent counts as dead (see dead_window_fraction)."""
        if self.dead_tokens_threshold is not None:
            return self.dead_tokens_threshold
        return max(round(self.dead_window_fraction * self.n_steps), 1) * self.batch_size

    def dead_window_description(self) -> str:
        """The dead-latent window in words, e.g. "15,360 tokens (15 steps of 1,024; 0.1 of the run)"."""
        if self.dead_tokens_threshold is not None:
            return f"{self.dead_tokens_threshold:,} tokens"
        steps = self.dead_window_tokens // self.batch_size
        return f"{self.dead_window_tokens:,} tokens ({steps} steps of {self.batch_size:,}; {self.dead_window_fraction:g} of the run)"

    def initial_encoder_norm(self, sparsity: str) -> float:
        """encoder_init_norm, or its default for an SAE whose ``sparsity`` kind is "l1", "l0" or "k"."""
        if self.encoder_init_norm is not None:
            return self.encoder_init_norm
        return 0.1 if sparsity == "l1" else 1.0

    def auxk_latents(self, d_sae: int) -> int:
        """aux_k, or d_sae // 2 of the SAE being trained (at least 1)."""
        return self.aux_k if self.aux_k is not None else max(d_sae // 2, 1)

    @model_validator(mode="after")
    def _check_schedule(self) -> "TrainConfig":
        if self.warmup_steps >= self.n_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be smaller than n_steps={self.n_steps}")
        if self.p_annealing is not None:
            end = self.p_annealing.end_step if self.p_annealing.end_step is not None else self.n_steps - 1
            if not self.p_annealing.start_step <= end < self.n_steps:
                raise ValueError(
                    f"p_annealing needs start_step <= end_step < n_steps; got start_step="
                    f"{self.p_annealing.start_step}, end_step={end}, n_steps={self.n_steps}"
                )
        return self
