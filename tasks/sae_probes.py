"""The sae-probes benchmark (Kantamneni et al., *Are Sparse Autoencoders Useful?*) as labelled sets.

The PyPI package ``sae-probes`` (installed with ``--no-deps``; never imported here, it
pulls heavy dependencies) ships 113 binary classification datasets as
``data/cleaned_data/<n>_<tag>.csv.zst`` (columns ``prompt``, ``target``), listed in
``data/probing_datasets_MASTER.csv.zst`` (rows whose ``Data type`` is "Binary
Classification"). Both are read with ``zstandard`` and validated by
:mod:`data_contracts.sae_probes`.

- Probing (:func:`probing_sets`): each task becomes a balanced labelled_probing set named
  ``sae_probes.<tag>``; a task is named in the config by its tag (``glue_sst2``), its
  numbered file name (``92_glue_sst2``) or ``all`` (every binary task).
- SCR (:func:`joined_scr_frame`, :func:`planted_scr_frame`): two tasks over the same
  prompts give a target y and a spurious z (the historical-figure names carry is_male,
  is_american, is_politician); or a spurious cue (:data:`PLANTED_CUE`) is planted at the
  start of the texts of z = 1, so its ground truth is known.

Every file repeats prompts (up to two thirds of some); a prompt is kept once, and a prompt
with two different targets is dropped, so a text never lands in train and test.
"""

from __future__ import annotations

import io
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from data_contracts.sae_probes import validate_sae_probes
from sae_core.models import package_dir

PACKAGE = "sae_probes"
LISTING_FILE = "probing_datasets_MASTER.csv.zst"
BINARY_TYPE = "Binary Classification"
ALL_TASKS = "all"
DATASET_PREFIX = "sae_probes."
#: planted at the start of every z = 1 text of a planted SCR set (the start survives the token cap)
PLANTED_CUE = "Breaking news:"


def data_dir() -> Path:
    """``sae_probes/data`` of the installed package (found without importing it)."""
    try:
        return package_dir(PACKAGE) / "data"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the sae-probes benchmark needs the package sae-probes: `pip install --no-deps sae-probes==0.4.2` "
            "(or remove the sae_probes_tasks and scr_sae_probes entries from the downstream config)"
        ) from err


def read_zst_csv(path: Path) -> pd.DataFrame:
    """A zstd-compressed CSV file as a frame (every column as read by pandas)."""
    import zstandard

    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    return pd.read_csv(io.BytesIO(data))


@lru_cache(maxsize=1)
def listing() -> pd.DataFrame:
    """The binary tasks: tag, file (relative to :func:`data_dir`), number; validated
    (contract sae_probes_listing), sorted by number."""
    path = data_dir() / LISTING_FILE
    master = read_zst_csv(path)
    binary = master[master["Data type"] == BINARY_TYPE]
    files = binary["Dataset save name"].astype(str) + ".zst"
    numbers = files.str.extract(r"cleaned_data/([0-9]+)_", expand=False)
    frame = pd.DataFrame({"tag": binary["Dataset Tag"].astype(str).to_numpy(), "file": files.to_numpy(),
                          "number": pd.to_numeric(numbers, errors="coerce").to_numpy()})
    validate_sae_probes(frame, "sae_probes_listing", path)
    return frame.astype({"number": int}).sort_values("number").reset_index(drop=True)


def resolve_tasks(names: list[str]) -> list[str]:
    """The tags of ``names`` (tag, numbered file name '<n>_<tag>' or 'all'), in the given
    order without repeats. Raises ValueError naming the unknown ones."""
    table = listing()
    by_numbered = {f"{n}_{t}": t for n, t in zip(table["number"], table["tag"])}
    tags: list[str] = []
    unknown = []
    for name in names:
        if name == ALL_TASKS:
            found = table["tag"].tolist()
        elif name in set(table["tag"]):
            found = [name]
        elif name in by_numbered:
            found = [by_numbered[name]]
        else:
            unknown.append(name)
            continue
        tags += [t for t in found if t not in tags]
    if unknown:
        raise ValueError(f"unknown sae-probes tasks {unknown}; name a binary task by its tag (e.g. glue_sst2), its file "
                         f"name (92_glue_sst2) or 'all'; the {len(table)} tags: {', '.join(table['tag'])}")
    return tags


@lru_cache(maxsize=None)
def _task_rows(tag: str) -> pd.DataFrame:
    """One task's cleaned rows (unvalidated; :func:`read_tasks` validates what it returns)."""
    path = data_dir() / listing().set_index("tag").loc[tag, "file"]
    if not path.is_file():
        raise FileNotFoundError(f"sae-probes file {path} of task {tag!r} is missing; reinstall sae-probes")
    return _clean(read_zst_csv(path), tag)


def _clean(frame: pd.DataFrame, tag: str) -> pd.DataFrame:
    """task, row, prompt, target (text): repeated prompts kept once, conflicting ones dropped."""
    out = pd.DataFrame({"task": tag, "row": np.arange(len(frame)), "prompt": frame["prompt"], "target": frame["target"]})
    out = out[out["prompt"].notna() & out["target"].notna()]
    out = out.assign(prompt=out["prompt"].astype(str), target=out["target"].astype(str))
    out = out[out["prompt"].str.contains(r"\w", regex=True)]
    conflicting = out.groupby("prompt")["target"].transform("nunique") > 1
    return out[~conflicting].drop_duplicates("prompt", keep="first")


def read_tasks(tags: list[str]) -> pd.DataFrame:
    """The cleaned rows of ``tags`` in one frame (task, row, prompt, target), validated
    once (contract sae_probes_tasks). Raises ContractViolation naming the files."""
    table = listing().set_index("tag")
    frame = pd.concat([_task_rows(t) for t in tags], ignore_index=True)
    names = [table.loc[t, "file"] for t in tags]
    validate_sae_probes(frame, "sae_probes_tasks", f"{data_dir()}/{{{', '.join(names)}}}" if len(names) > 1 else data_dir() / names[0])
    return frame


def dataset_name(tag: str) -> str:
    """The probing table's dataset name of a task: 'sae_probes.<tag>' (spaces and odd characters -> '_')."""
    return DATASET_PREFIX + re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)


def is_benchmark_dataset(name: str) -> bool:
    """Whether a probing table's dataset is a sae-probes task."""
    return str(name).startswith(DATASET_PREFIX)


def _doc_id(tag: str, row: int) -> str:
    return f"{DATASET_PREFIX}{tag}#{row}"


def probing_sets(names: list[str], max_per_class: int, seed: int) -> dict[str, pd.DataFrame]:
    """Balanced labelled_probing frames of the named tasks, by dataset name; each task
    drawn with its own seed (seed + its number), so adding a task changes no other."""
    from tasks.labelled import balanced_split

    if not names:
        return {}
    tags = resolve_tasks(names)
    numbers = dict(zip(listing()["tag"], listing()["number"]))
    rows = read_tasks(tags)
    parts = dict(tuple(rows.groupby("task", sort=False)))
    out = {}
    for tag in tags:
        part = parts[tag]
        frame = pd.DataFrame({"doc_id": [_doc_id(tag, r) for r in part["row"]], "text": part["prompt"].to_numpy(),
                              "label": part["target"].to_numpy()})
        name = dataset_name(tag)
        out[name] = balanced_split(frame, sorted(frame["label"].unique()), max_per_class, seed + int(numbers[tag]), name)
    return out


def _binary(values: pd.Series, tag: str) -> pd.Series:
    """A task's targets as 0/1: the second of its two sorted values is 1 ('1', 'True', ...)."""
    classes = sorted(values.unique())
    return (values == classes[1]).astype(int).rename(f"{tag}={classes[1]}")


def joined_scr_frame(y_task: str, z_task: str) -> pd.DataFrame:
    """The prompts two tasks share, with y from ``y_task`` and z from ``z_task``: the
    source frame of an SCR set (doc_id, document, text, label, spurious, y, z).

    label / spurious name the attribute values ('hist_fig_ismale=1' or '=0'); each
    prompt is its own document.
    """
    y_tag, z_tag = resolve_tasks([y_task])[0], resolve_tasks([z_task])[0]
    rows = read_tasks([y_tag, z_tag])
    y_rows, z_rows = rows[rows["task"] == y_tag], rows[rows["task"] == z_tag]
    joined = y_rows.merge(z_rows, on="prompt", suffixes=("_y", "_z"))
    if joined.empty:
        raise ValueError(f"sae-probes tasks {y_tag} and {z_tag} share no prompt; an SCR set needs two labels of the same texts")
    y = _binary(joined["target_y"], y_tag)
    z = _binary(joined["target_z"], z_tag)
    doc_ids = [_doc_id(y_tag, r) for r in joined["row_y"]]
    return pd.DataFrame({
        "doc_id": doc_ids, "document": doc_ids, "text": joined["prompt"].to_numpy(),
        "label": [f"{y_tag}={v}" for v in joined["target_y"]], "spurious": [f"{z_tag}={v}" for v in joined["target_z"]],
        "y": y.to_numpy(), "z": z.to_numpy(),
    })


def planted_scr_frame(task: str, seed: int) -> pd.DataFrame:
    """A task's prompts with a planted spurious cue: z is drawn at random (seeded, half
    the prompts of each class), and every z = 1 text starts with :data:`PLANTED_CUE`.

    Returns the source frame of an SCR set (doc_id, document, text, label, spurious, y, z);
    doc ids carry the cue ('#cue'), so a cued text never shares an id with its plain one.
    """
    tag = resolve_tasks([task])[0]
    rows = read_tasks([tag])
    y = _binary(rows["target"], tag).to_numpy()
    rng = np.random.default_rng(seed)
    z = np.zeros(len(rows), dtype=int)
    for value in (0, 1):
        idx = np.flatnonzero(y == value)
        z[rng.permutation(idx)[: len(idx) // 2]] = 1
    texts = [f"{PLANTED_CUE} {t}" if cue else t for t, cue in zip(rows["prompt"], z)]
    doc_ids = [_doc_id(tag, r) + ("#cue" if cue else "") for r, cue in zip(rows["row"], z)]
    return pd.DataFrame({
        "doc_id": doc_ids, "document": doc_ids, "text": texts, "label": [f"{tag}={v}" for v in rows["target"]],
        "spurious": np.where(z == 1, "cue", "no cue"), "y": y, "z": z,
    })
