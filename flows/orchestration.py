"""Units of work on Prefect's task runners: a process pool, Ray or Dask (SPEC §9, §12).

The config's ``orchestration`` section picks the runner; :func:`unit_executor` turns it
into the :class:`tasks.units.UnitExecutor` a stage hands its units to (extraction: ranges of
shards; training: one unit per (method, run); evaluation: one per model). ``local`` keeps
today's behaviour (every unit in the flow's process, one after another); the others submit
each unit as a Prefect task (``<stage>-unit``, named after the unit) to

- ``process``: :class:`prefect.task_runners.ProcessPoolTaskRunner` (spawned processes, so
  CUDA-safe);
- ``ray``: ``prefect_ray.RayTaskRunner`` on the cluster at ``address`` or a local one of
  ``workers`` CPUs; a unit's resources become Ray task options (``num_cpus``, ``num_gpus``,
  fractions allowed) and Ray re-runs a unit whose worker died;
- ``dask``: ``prefect_dask.DaskTaskRunner`` on the scheduler at ``address`` or a local
  cluster of ``workers`` processes; GPUs become the worker resource ``GPU`` and the
  scheduler reschedules a unit whose worker died.

A unit task opens the run directory's store (:mod:`flows.storage`) on its worker, pulls
what the unit reads (a no-op on a shared filesystem), calls the unit's function on the
worker's copy of the run directory and publishes what it wrote. Prefect retries a failed
unit ``orchestration.retries`` times. Nothing here changes a result: a unit's output is a
function of its arguments (seeds, fingerprints, data) alone.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from prefect import task

from flows.storage import RunStore
from tasks.config_sections import UNIT_STAGES, OrchestrationConfig, Resources
from tasks.units import Unit, UnitDone, UnitExecutor

log = logging.getLogger(__name__)


@task(name="unit", persist_result=False, retry_delay_seconds=1)
def run_unit(function: Callable[..., Any], kwargs: dict[str, Any], run_dir: str, reads: tuple[str, ...], writes: tuple[str, ...],
             cache_dir: str | None = None, storage_options: dict | None = None, threads: int | None = None) -> Any:
    """One unit on a worker: pull its inputs, run it on the worker's copy of the run directory, publish its outputs.

    threads: torch's intra-op threads (``orchestration.threads``, default the flow process's count):
    the float rounding of some matmuls depends on it, so every unit uses the same count whatever
    its worker (Ray, for one, sets OMP_NUM_THREADS to a task's num_cpus)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    store = RunStore.open(run_dir, cache_dir=cache_dir, storage_options=storage_options)
    store.pull(reads)
    result = function(store.local, **kwargs)
    store.push(writes)
    return result


def task_runner(orch: OrchestrationConfig):
    """The Prefect task runner ``orch`` names (not started); None for ``local``."""
    if orch.runner == "local":
        return None
    if orch.runner == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=orch.workers)
    cpus = max([orch.resources_of(s).cpus for s in UNIT_STAGES])
    if orch.runner == "ray":
        from prefect_ray import RayTaskRunner

        if orch.address:
            return RayTaskRunner(address=orch.address)
        # a local cluster: room for `workers` units of the largest CPU request at once
        return RayTaskRunner(init_kwargs={"num_cpus": int(orch.workers * cpus), "include_dashboard": False, "log_to_driver": True})
    if orch.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if orch.address:
            return DaskTaskRunner(address=orch.address)
        kwargs: dict[str, Any] = {"n_workers": orch.workers, "threads_per_worker": max(1, int(cpus)), "processes": True,
                                  "dashboard_address": None}
        gpus = _local_gpus()
        if gpus:
            kwargs["resources"] = {"GPU": gpus}
        return DaskTaskRunner(cluster_kwargs=kwargs)
    raise ValueError(f"unknown orchestration.runner {orch.runner!r}; use local, process, ray or dask")


def _flow_threads() -> int:
    import torch

    return torch.get_num_threads()


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _resources(orch: OrchestrationConfig, stage: str):
    """The context a unit of ``stage`` is submitted in, so the engine places it by its resources."""
    r: Resources = orch.resources_of(stage)
    if orch.runner == "ray":
        from prefect_ray.context import remote_options

        return remote_options(num_cpus=r.cpus, num_gpus=r.gpus)
    if orch.runner == "dask" and r.gpus:
        import dask

        return dask.annotate(resources={"GPU": r.gpus})
    return contextlib.nullcontext()


@dataclass
class TaskRunnerExecutor:
    """Runs a stage's units as Prefect tasks on ``orch``'s task runner (see the module docstring)."""

    orch: OrchestrationConfig
    store: RunStore
    in_process: bool = field(default=False, init=False)

    def run(self, stage: str, units: Sequence[Unit], on_done: UnitDone | None = None) -> list[Any]:
        if not units:
            return []
        from prefect.futures import as_completed

        runner = task_runner(self.orch)
        results: list[Any] = [None] * len(units)
        errors: list[tuple[Unit, BaseException]] = []
        with runner:
            futures = {}
            for i, unit in enumerate(units):
                unit_task = run_unit.with_options(name=f"{stage}-unit", task_run_name=unit.label, retries=self.orch.retries)
                parameters = {"function": unit.function, "kwargs": unit.kwargs, "run_dir": self.store.url, "reads": unit.reads,
                              "writes": unit.writes, "cache_dir": self.orch.cache_dir, "storage_options": self.orch.storage_options or None,
                              "threads": self.orch.threads or _flow_threads()}
                with _resources(self.orch, stage):
                    futures[runner.submit(unit_task, parameters)] = i
            for future in as_completed(list(futures)):
                i = futures[future]
                try:
                    results[i] = future.result()
                except Exception as error:  # the others still finish: their work is kept
                    errors.append((units[i], error))
                    continue
                if on_done is not None:
                    on_done(units[i], results[i])
        if errors:
            unit, error = errors[0]
            more = f" ({len(errors) - 1} more units failed too)" if len(errors) > 1 else ""
            raise RuntimeError(f"{stage}: unit '{unit.label}' failed on the {self.orch.runner} runner: {error}{more}") from error
        # what the workers published is now in the store; the stage reads it from its own copy
        self.store.pull(sorted({w for unit in units for w in unit.writes}))
        return results


def unit_executor(orch: OrchestrationConfig, store: RunStore) -> UnitExecutor | None:
    """The executor of ``orch``: None for ``local`` (the stage runs its units in process,
    :class:`tasks.units.InProcess`), a Prefect task runner otherwise."""
    if orch.runner == "local":
        return None
    return TaskRunnerExecutor(orch, store)
