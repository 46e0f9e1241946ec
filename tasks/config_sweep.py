"""Configuration of the ``sweep`` flow (:mod:`flows.sweep`): a grid or a population over train keys.

A sweep starts from a base pipeline config (a YAML file or inline sections), extracts with
its ``extract`` section, and trains one SAE per (point, seed) with its ``train`` section
changed by the point's values. Keys are dotted paths into the pipeline config's train
section: ``train.k``, ``train.d_sae``, ``train.architecture``, ``train.recipe.lr``,
``train.recipe.sparsity_coefficient``, … Every point's config is built (and so validated)
when the sweep config is loaded: a bad key or value fails before anything runs, naming it.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from sae_core.config import TrainConfig
from tasks.config import PipelineConfig, TrainStageConfig
from tasks.config_sections import Strict, read_yaml_mapping
from tasks.train_plan import member_config

#: train-section keys a sweep may not set: the sweep trains one single SAE per (point, seed) itself
FIXED_TRAIN_KEYS = ("methods", "n_members", "n_runs", "bagging_group", "expanded_sizes", "compute_matched_expanded",
                    "random_decoder_sizes", "imported", "recipe")
#: recipe keys a sweep may not set: seeds come from `seeds` / the population, checkpoints from the flow
FIXED_RECIPE_KEYS = ("seed", "checkpoint_every", "log_every")
#: keys a population may perturb: they change no weight's shape, so a member can continue from another's checkpoint
PERTURBABLE_KEYS = ("train.k", "train.recipe.lr", "train.recipe.sparsity_coefficient", "train.recipe.aux_coefficient",
                    "train.recipe.grad_clip", "train.recipe.beta1")


def check_key(key: str) -> None:
    """Raise ValueError unless ``key`` is a dotted train key a sweep may set."""
    parts = key.split(".")
    train_keys = sorted(set(TrainStageConfig.model_fields) - set(FIXED_TRAIN_KEYS))
    recipe_keys = sorted(set(TrainConfig.model_fields) - set(FIXED_RECIPE_KEYS))
    if len(parts) == 2 and parts[0] == "train" and parts[1] in train_keys:
        return
    if len(parts) == 3 and parts[:2] == ["train", "recipe"] and parts[2] in recipe_keys:
        return
    raise ValueError(
        f"sweep key {key!r} is not a train setting a sweep can vary; use train.<key> with <key> one of {', '.join(train_keys)}, "
        f"or train.recipe.<key> with <key> one of {', '.join(recipe_keys)}"
    )


def point_train_config(base: TrainStageConfig, params: dict[str, Any], seed: int, n_steps: int | None = None) -> TrainStageConfig:
    """The train section of one (point, seed): ``base`` with ``params`` set, training one single SAE
    (recipe seed ``seed``: its one member is seeded ``seed``). Raises ValueError naming the key on a bad value."""
    train = base.model_dump(exclude={"imported"})
    recipe = dict(train.pop("recipe"))
    for key, value in params.items():
        check_key(key)
        parts = key.split(".")
        (recipe if parts[1] == "recipe" else train)[parts[-1]] = value
    recipe.update(seed=seed, **({"n_steps": n_steps} if n_steps else {}))
    train.update(methods=["single"], n_members=1, n_runs=1, bagging_group=None, expanded_sizes=[1],
                 compute_matched_expanded=False, random_decoder_sizes=None)
    try:
        config = TrainStageConfig(**train, recipe=TrainConfig(**recipe))
        member_config(config, 1)  # what the trainer builds: k against d_sae and the architecture
        return config
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'train'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"sweep point {params} (seed {seed}) gives an invalid train config: {problems}") from None


class SearchRange(Strict):
    """Range of one key a population searches."""

    low: float = Field(description="Smallest value.")
    high: float = Field(description="Largest value.")
    log: bool = Field(default=True, description="Draw initial values log-uniformly (else uniformly) in [low, high].")
    integer: bool = Field(default=False, description="Round values to integers (e.g. train.k).")

    @model_validator(mode="after")
    def _check(self) -> "SearchRange":
        if not self.low < self.high:
            raise ValueError(f"a search range needs low < high; got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale search range needs low > 0; got low={self.low} (set log: false)")
        return self


class PopulationConfig(Strict):
    """Population-based training (Jaderberg et al. 2017, as AutoLFADS tunes LFADS): members train side by side;
    every ``interval`` steps each is scored on the validation split, and the worst ``exploit_fraction`` continue
    from a copy of a member of the best ``exploit_fraction`` (its trainer checkpoint: weights and Adam state) with
    that member's values each multiplied by a random one of ``perturbation_factors``."""

    size: int = Field(default=8, ge=2, description="Members of the population.")
    interval: int = Field(default=100, gt=0, description="Training steps between evaluations (and exploit/explore steps).")
    rounds: int = Field(default=4, ge=1, description="Evaluation rounds: each member trains interval·rounds steps "
                        "(this replaces the base recipe's n_steps, so the lr schedule spans the whole run).")
    exploit_fraction: float = Field(default=0.25, gt=0, le=0.5, description="Fraction of members replaced each round "
                                    "(the worst), and of members they copy (the best).")
    perturbation_factors: list[float] = Field(default_factory=lambda: [0.8, 1.25], min_length=1,
                                              description="A copied value is multiplied by one of these (clipped to its range).")
    search: dict[str, SearchRange] = Field(description=f"The keys searched and their ranges: {', '.join(PERTURBABLE_KEYS)} "
                                           "(keys that change no weight's shape, so a copy can continue training).")
    seed: int = Field(default=0, description="Seed of the initial values, the copies and the perturbations.")

    @model_validator(mode="after")
    def _check(self) -> "PopulationConfig":
        if not self.search:
            raise ValueError(f"population.search is empty: name at least one key among {', '.join(PERTURBABLE_KEYS)}")
        bad = [k for k in self.search if k not in PERTURBABLE_KEYS]
        if bad:
            raise ValueError(f"population.search keys {bad} cannot be perturbed mid-run; use {', '.join(PERTURBABLE_KEYS)}")
        if any(f <= 0 for f in self.perturbation_factors):
            raise ValueError(f"perturbation_factors must be positive; got {self.perturbation_factors}")
        return self

    @property
    def n_steps(self) -> int:
        return self.interval * self.rounds

    @property
    def n_exploit(self) -> int:
        """Members replaced (and members copied) per round."""
        return max(1, int(self.size * self.exploit_fraction))


class SweepConfig(Strict):
    """A sweep: the base pipeline config, and the grid or population of train settings to try."""

    base: PipelineConfig = Field(description="The base pipeline config: a YAML file (relative to the working directory) "
                                 "or its sections inline. Its extract section makes the activations; its train section "
                                 "is the recipe every point changes; its name names the run directory, runs/<name>/.")
    mode: Literal["grid", "population"] = Field(default="grid", description="grid: every combination of the grid's values; "
                                                "population: population-based training over population.search.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted train keys (train.k, train.recipe.lr, …) to "
                                       "the values tried; a grid point is one combination (their product).")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="Seeds per grid point (one SAE each); two or "
                             "more give stability across seeds.")
    population: PopulationConfig | None = Field(default=None, description="Population settings (mode: population).")
    validation_split: Literal["train", "val", "test"] = Field(default="val", description="Split every point is scored on (keep "
                                                              "test for the final report).")
    validation_max_tokens: int | None = Field(default=None, gt=0, description="Score on at most this many tokens of it (seeded subset).")
    objective: Literal["explained_variance", "mse"] = Field(default="explained_variance", description="What ranks points and "
                                                           "population members (explained variance up, MSE down).")
    max_l0: float | None = Field(default=None, gt=0, description="Rank points whose validation L0 exceeds this below every point that "
                                 "keeps to it (so a search over k or λ cannot win by being less sparse).")
    guide_tolerance: float = Field(default=0.1, ge=0, lt=1, description="L0 guide: c_dec within this fraction of the curve's range "
                                   "of its minimum counts as flat (sae_core.l0_guide.pick_l0).")

    @field_validator("base", mode="before")
    @classmethod
    def _read_base(cls, value: Any) -> Any:
        """A path: the YAML file's sections (validated as a PipelineConfig next)."""
        if not isinstance(value, (str, Path)):
            return value
        raw = read_yaml_mapping(value, "base config file (relative to the working directory)", "sections")
        return {k: v for k, v in raw.items() if v is not None}

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        for key, values in self.grid.items():
            check_key(key)
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid key {key!r} needs a non-empty list of values; got {values!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct; got {self.seeds}")
        if self.mode == "grid" and not self.grid:
            raise ValueError("mode grid needs a grid: e.g. grid: {train.k: [8, 16, 32]}")
        if self.mode == "population":
            if self.population is None:
                raise ValueError("mode population needs a population section (size, interval, rounds, search)")
            several = [k for k, v in self.grid.items() if len(v) != 1]
            if several:
                raise ValueError(f"mode population takes one value per grid key (fixed settings of every member); {several} have more")
            for key, rng in self.population.search.items():
                if key in self.grid:
                    raise ValueError(f"{key!r} is both in the grid and in population.search; keep it in one")
                for value in (rng.low, rng.high):  # the range's ends must make valid configs
                    point_train_config(self.pipeline().train, {key: int(value) if rng.integer else value}, 0, self.population.n_steps)
        for params in self.grid_points():
            point_train_config(self.pipeline().train, params, self.seeds[0])
        return self

    def pipeline(self) -> PipelineConfig:
        """The base pipeline config."""
        return self.base

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values, in the grid's order (the last key varies fastest);
        in population mode the grid's keys are fixed settings of every member ([{}] without a grid)."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def score(self, metrics: dict[str, float]) -> float:
        """The objective as a number to maximise (−MSE for mse), below every admissible point when
        ``max_l0`` is exceeded."""
        value = metrics["explained_variance"] if self.objective == "explained_variance" else -metrics["mse"]
        if self.max_l0 is not None and metrics["l0"] > self.max_l0:
            value -= 1e6 * (1 + metrics["l0"] - self.max_l0)  # every point over the limit ranks below those under it
        return value if math.isfinite(value) else -math.inf
