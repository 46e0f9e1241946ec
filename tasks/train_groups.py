"""A bagging ensemble trained as groups of members (``train.bagging_group``), each group a
unit of work, stacked into one ensemble at the end (see :mod:`tasks.train`)."""

from __future__ import annotations

import time
from pathlib import Path

from sae_core.config import SAEConfig
from sae_core.devices import resolve_device
from sae_core.ensemble import Ensemble, EnsembleInfo
from sae_core.io import load_ensemble, load_training_history, save_ensemble
from sae_core.training.ensembles import train_bagging
from tasks.config import TrainStageConfig
from tasks.train_plan import (
    CHECKPOINTS_DIR,
    SINGLE_FROM_BAGGING,
    TrainingJob,
    TrainProgress,
    UnitOutcome,
    member_config,
    seed_block,
    train_source,
)

#: where member groups of a split bagging ensemble wait to be stacked (under the checkpoints, removed at the end)
GROUPS_DIR = f"{CHECKPOINTS_DIR}/bagging-groups"


def group_relative(job: TrainingJob, members: tuple[int, ...]) -> str:
    return f"{GROUPS_DIR}/run={job.run}/members={members[0]}-{members[-1]}"


def train_bagging_members(run_dir: Path, cfg: TrainStageConfig, job: TrainingJob, members: tuple[int, ...], *, data=None) -> UnitOutcome:
    """A unit of a bagging ensemble split by ``train.bagging_group``: members ``members`` of
    ``job`` as one batched module, saved under :data:`GROUPS_DIR`; :func:`_stack_bagging` puts
    the groups together. The members are independent (own parameters, seeds, batches and
    optimizer state), so a member is what it would be trained alone in a module of the same
    size; the module's size can still change the last bits (kernel shapes), which is why the
    grouping is a train setting and part of the models' fingerprints."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    manifest, acts = data if data is not None else train_source(cfg, run_dir, device, validate=False)
    rel = group_relative(job, members)
    recipe = cfg.recipe.model_copy(update={"seed": seed_block(cfg, job.run)})
    bar = TrainProgress(len(members) * cfg.recipe.n_steps, False, None, cfg.recipe.batch_size)
    bar.model = f"bagging/run={job.run} members {members[0]}..{members[-1]}"
    trained = train_bagging(member_config(cfg, manifest.d), acts, recipe, len(members), seeds=[job.seeds[j] for j in members],
                            checkpoint_dir=run_dir / CHECKPOINTS_DIR / "bagging" / f"run={job.run}" / f"members={members[0]}-{members[-1]}",
                            callback=lambda step, sae, record: (bar.record(record) if record is not None else None, bar.advance(len(members))),
                            device=device)
    bar.close()
    save_ensemble(trained.ensemble, run_dir / rel, histories=trained.histories)
    return UnitOutcome(((rel, "group", ""),), time.perf_counter() - start)


def stack_bagging(run_dir: Path, group: list[TrainingJob], parts: list[str], sae_cfg: SAEConfig, recipe_dump: dict, data_fp: str,
                   n_rows: int) -> list[str]:
    """Bagging (and its single SAE, member 0) from the member groups ``parts``, saved as
    :func:`train_unit` saves them; returns the models written."""
    bagging = group[0]
    groups = [load_ensemble(run_dir / rel) for rel in parts]
    histories = [h for rel in parts for h in (load_training_history(run_dir / rel) or [])]
    stacked = type(groups[0].members).stack([g.member(j) for g in groups for j in range(g.n_members)])
    ens = Ensemble(stacked, "bagging")
    ens.info = EnsembleInfo(seeds=tuple(bagging.seeds), bootstrap=groups[0].info.bootstrap).updated(
        fingerprint=bagging.fingerprint(sae_cfg, recipe_dump, data_fp), run=bagging.run, method="bagging", train_tokens=n_rows)
    save_ensemble(ens, bagging.model.path(run_dir), histories=histories or None)
    written = [bagging.model.relative]
    for job in group[1:]:  # the single SAE: bagging's member 0
        single = Ensemble(ens.member(0), "single")
        single.info = EnsembleInfo(seeds=job.seeds, source=SINGLE_FROM_BAGGING).updated(
            fingerprint=job.fingerprint(sae_cfg, recipe_dump, data_fp), run=job.run, method=job.method, train_tokens=n_rows)
        save_ensemble(single, job.model.path(run_dir), histories=histories[:1] or None)
        written.append(job.model.relative)
    return written

