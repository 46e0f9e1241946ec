"""Units of work: how a stage hands independent pieces of itself to whatever runs them (SPEC §9, §12).

A stage that can fan out (training per (method, run), evaluation per model) describes each
piece as a :class:`Unit` — a module-level function, its keyword arguments, the run-dir
paths it reads and the ones it writes — and gives the list to a :class:`UnitExecutor`.
It gets back each unit's small, picklable result (a manifest: rows, paths, notes), in the
order it gave them.

The stage never knows what runs the units. :class:`InProcess` (the default, the ``local``
runner) calls them one after another in this process, which is what the stages did before
units existed. ``flows.orchestration`` runs them as Prefect tasks on a process pool, a Ray
cluster or a Dask cluster: each unit then reads its inputs from the run directory's
store (pulled to the worker's mirror when the run directory is on object storage), calls
the same function, and publishes what it wrote. A unit's result may not depend on where
it ran: seeds, fingerprints and outputs are functions of its arguments alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

#: what a unit reports when it ends (in the order the units were given)
UnitDone = Callable[["Unit", Any], None]


@dataclass(frozen=True)
class Unit:
    """One independent piece of a stage.

    function: a module-level function ``f(run_dir: Path, **kwargs)`` (pickled by reference to
        the workers, so it must be importable there); its result must be small and picklable.
    kwargs: its arguments (pydantic configs, tuples, numbers: picklable).
    label: what the UI and the logs call it, e.g. ``train bagging/run=0``.
    reads / writes: run-dir-relative paths (files or directories) it reads and writes; an
        executor on object storage pulls ``reads`` before and publishes ``writes`` after.
    cost: relative size (e.g. member-steps), for progress.
    """

    function: Callable[..., Any]
    kwargs: dict[str, Any]
    label: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    cost: float = 1.0


class UnitExecutor(Protocol):
    """Runs a stage's units; ``flows.orchestration`` has the Prefect task-runner one."""

    #: True when units run in this process, one after another (they may then share state the
    #: stage built once, e.g. an activation split already in memory)
    in_process: bool

    def run(self, stage: str, units: Sequence[Unit], on_done: UnitDone | None = None) -> list[Any]:
        """Run every unit (retrying per the executor's policy); results in the order of ``units``.

        Raises a unit's error: in process at once, on a task runner once the other units
        finished or failed (their outputs are kept, so a rerun reuses them).
        """
        ...


@dataclass
class InProcess:
    """The ``local`` runner: each unit in this process, in order."""

    run_dir: Path
    in_process: bool = field(default=True, init=False)

    def run(self, stage: str, units: Sequence[Unit], on_done: UnitDone | None = None) -> list[Any]:
        results = []
        for unit in units:
            result = unit.function(Path(self.run_dir), **unit.kwargs)
            if on_done is not None:
                on_done(unit, result)
            results.append(result)
        return results


def executor_or_default(executor: UnitExecutor | None, run_dir: str | Path) -> UnitExecutor:
    return InProcess(Path(run_dir)) if executor is None else executor
