"""Config sections that stand apart from the stages' own: the device setting every stage takes, where units of work run
(``orchestration``) and SAELens folders the train stage imports (``train.imported``);
:mod:`tasks.config` puts them into the pipeline's config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sae_core.devices import DEVICE_SETTINGS, check_device_setting

#: where a stage runs its tensors (sae_core.devices): auto = the first CUDA device if any, else the CPU
DeviceSetting = Annotated[str, AfterValidator(check_device_setting)]


def device_field(what: str):
    """The ``device`` field of a stage section."""
    return Field(default="auto", description=f"Device of {what} ({DEVICE_SETTINGS}); auto: CUDA when torch sees it, else the CPU.")


def read_yaml_mapping(file: str | Path, what: str, holds: str) -> dict:
    """The mapping a YAML config file holds; a ValueError naming
    ``what`` and the file when it is missing, is not YAML or holds something else than a mapping of ``holds``."""
    import yaml

    file = Path(file)
    if not file.is_file():
        raise ValueError(f"{what} {file} does not exist")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{what} {file} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {file} must hold a mapping of {holds}, got {type(raw).__name__}")
    return raw


class Strict(BaseModel):
    """A config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ImportedSAE(Strict):
    """A SAELens-format folder (cfg.json + sae_weights.safetensors: a pretrained SAE a user
    downloaded, or one trained with SAELens) that the train stage imports as a model, so
    evaluate, downstream and report treat it like the SAEs trained here (SPEC §13)."""

    path: str = Field(description="The SAELens folder (what sae_lens' SAE.save_model writes).")
    role: Literal["single", "bagging"] = Field(
        default="single",
        description="single: the SAE is one model, method 'imported' (models/imported/run=<run>); bagging: a member of "
        "the bagging ensemble of run <run>, method 'imported_bagging' (members in the order listed, α = 1/J).",
    )
    run: int = Field(default=0, ge=0, description="The run r it belongs to (several runs give stability metrics across them).")
    hook_name: str | None = Field(
        default=None, description="If set, the folder's cfg.json must name this hook (metadata.hook_name), or the import fails."
    )
    layer: int | None = Field(
        default=None, ge=0, description="If set, the extraction's layer (extract.layer) must be this one, or the import fails."
    )


# --------------------------------------------------------------------------- orchestration

#: stages whose work fans out into units (tasks.units); the others run in the flow's process
UNIT_STAGES = ("extract", "train", "evaluate")


class Resources(Strict):
    """What one unit of a stage asks of a worker (Ray: task options; Dask: worker resources)."""

    cpus: float = Field(default=1, gt=0, description="CPU cores per unit, for placement (Ray num_cpus; Dask: the local cluster's "
                        "threads per worker); torch's threads are orchestration.threads.")
    gpus: float = Field(default=0, ge=0, description="GPUs per unit; fractions share a GPU (0.5: two units per GPU, as the paper's authors ran). "
                        "Ray: num_gpus; Dask: the worker resource 'GPU' (start workers with --resources GPU=N).")


class OrchestrationConfig(Strict):
    """Where the units of work run (SPEC §9, §12). Results never depend on it: it is in no cache key or fingerprint."""

    runner: Literal["local", "process", "ray", "dask"] = Field(
        default="local",
        description="local: every unit in the flow's process, one after another. process: a pool of worker processes (Prefect's "
        "ProcessPoolTaskRunner). ray / dask: Prefect's RayTaskRunner / DaskTaskRunner, on the cluster at `address` or on a local "
        "cluster of `workers` processes.",
    )
    workers: int = Field(default=2, ge=1, description="Worker processes of the process pool or of a local Ray/Dask cluster.")
    address: str | None = Field(default=None, description="An existing cluster: Ray's address (ray://host:10001 or auto), or the "
                                "Dask scheduler's (tcp://host:8786). None starts a local one.")
    resources: dict[Literal["extract", "train", "evaluate"], Resources] = Field(
        default_factory=dict, description="Per-stage resources of one unit (default: 1 CPU, no GPU)."
    )
    threads: int | None = Field(default=None, ge=1, description="torch's intra-op threads in every unit (and in the flow's "
                                "process). None: the flow process's own count, so units compute exactly what the local runner does; "
                                "another count changes the float rounding of some matmuls (the models then differ in their last bits).")
    retries: int = Field(default=2, ge=0, description="Prefect retries of a failed unit (a worker lost mid-unit is also "
                         "rescheduled by Ray/Dask themselves); a retried unit gives the same result.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options of an object-store run directory "
                                            "(e.g. {endpoint_url: ..., key: ..., secret: ...}); credentials from the environment otherwise.")
    cache_dir: str | None = Field(default=None, description="Local mirror of an object-store run directory (default "
                                  "$SAE_ENSEMBLES_CACHE or ~/.cache/sae-ensembles/mirrors/<hash of the URL>).")

    def resources_of(self, stage: str) -> Resources:
        return self.resources.get(stage, Resources())
