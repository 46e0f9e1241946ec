"""Labelled document sets of the downstream stage, built from the embedded text (SPEC §7).

Probing sets: BBC articles by topic (5 classes) and tweets by sentiment (positive vs
negative), or any file / hub dataset with ``text`` and ``label`` columns. Balanced: every
class gets the same number of documents in train and in test, a seeded sample.

SCR sets (:func:`scr_split`): the biased train split holds only the two cells on one
diagonal (y = z); the balanced train and test splits take equal numbers from all four
cells. Splits take whole documents: every row of a document (a BBC article's paragraphs)
lands in one split, so no split shares a document with another. Sources:

- BBC topic pairs, built the way bias_in_bios labels gender: articles are split into
  paragraphs on blank lines; a paragraph's gender is the gender of its third-person
  pronouns (he/him/his/himself vs she/her/hers/herself), and paragraphs with pronouns of
  both genders or none are dropped; the diagonal is oriented so that its cells are the
  larger ones.
- the sae-probes benchmark (:mod:`tasks.sae_probes`): two labels of the same names, or
  a spurious cue planted into one half of a task's texts.

:func:`build_labelled_sets` gathers every set a downstream config asks for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from tasks.config import CorpusSource, DownstreamConfig
from tasks.sources import load_source

MALE_PRONOUNS = frozenset({"he", "him", "his", "himself"})
FEMALE_PRONOUNS = frozenset({"she", "her", "hers", "herself"})
GENDERS = ("male", "female")
TWEET_CLASSES = ("negative", "positive")
MIN_PARAGRAPH_WORDS = 8
_WORD = re.compile(r"[a-z]+")


class CellTooSmall(ValueError):
    """An SCR cell holds fewer rows than ``scr_min_cell``."""


def pronoun_gender(text: str) -> str | None:
    """'male' or 'female' when every gendered pronoun of ``text`` has that gender, else None."""
    words = _WORD.findall(text.lower())
    male = any(w in MALE_PRONOUNS for w in words)
    female = any(w in FEMALE_PRONOUNS for w in words)
    if male == female:  # both (mixed) or neither
        return None
    return "male" if male else "female"


@lru_cache(maxsize=2)
def _source(name: str) -> pd.DataFrame:
    return load_source(CorpusSource(name=name, label_column="label"))


def balanced_split(frame: pd.DataFrame, classes: list[str], cap: int, seed: int, dataset: str) -> pd.DataFrame:
    """n = min(cap, smallest class // 2) documents per class in train and in test, seeded."""
    counts = frame["label"].value_counts()
    missing = [c for c in classes if counts.get(c, 0) < 2]
    if missing:
        raise ValueError(f"probing set {dataset!r}: classes {missing} have fewer than 2 documents (counts {counts.to_dict()})")
    n = min(cap, min(int(counts[c]) for c in classes) // 2)
    rng = np.random.default_rng(seed)
    parts = []
    for c in classes:
        rows = frame[frame["label"] == c].sort_values("doc_id")
        pick = rows.iloc[np.sort(rng.permutation(len(rows))[: 2 * n])]
        order = rng.permutation(2 * n)
        parts.append(pick.iloc[order[:n]].assign(split="train"))
        parts.append(pick.iloc[order[n:]].assign(split="test"))
    out = pd.concat(parts, ignore_index=True).assign(dataset=dataset)
    return out[["doc_id", "dataset", "text", "label", "split"]].sort_values(["split", "label", "doc_id"]).reset_index(drop=True)


def probing_set(name: str, max_per_class: int, seed: int) -> pd.DataFrame:
    """A balanced probing set (doc_id, dataset, text, label, split ∈ {train, test}).

    ``bbc``: 5 topics; ``tweets``: positive vs negative (neutral left out); anything else
    is read through :func:`tasks.sources.load_source` with columns ``text`` and ``label``.
    """
    frame = _source(name) if name in ("bbc", "tweets") else load_source(CorpusSource(name=name, label_column="label"))
    frame = frame[frame["text"].str.contains(r"\w", regex=True)]
    if name == "tweets":
        frame = frame[frame["label"].isin(TWEET_CLASSES)]
    classes = sorted(frame["label"].unique().tolist())
    if len(classes) < 2:
        raise ValueError(f"probing set {name!r} needs at least 2 labels; found {classes}")
    label = "bbc" if name == "bbc" else "tweets" if name == "tweets" else re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return balanced_split(frame, classes, max_per_class, seed, label)


@lru_cache(maxsize=1)
def bbc_paragraphs() -> pd.DataFrame:
    """BBC paragraphs with one pronoun gender: doc_id ('<article>#p<i>'), document (the
    article), text, topic, gender.

    Paragraphs are the blank-line-separated blocks of each article (the first is the
    headline); shorter than MIN_PARAGRAPH_WORDS words or repeated texts are dropped.
    """
    articles = _source("bbc")
    rows = []
    for doc_id, text, topic in articles[["doc_id", "text", "label"]].itertuples(index=False):
        for i, para in enumerate(re.split(r"\n\s*\n", text)):
            para = " ".join(para.split())
            if len(para.split()) < MIN_PARAGRAPH_WORDS:
                continue
            gender = pronoun_gender(para)
            if gender is not None:
                rows.append((f"{doc_id}#p{i}", doc_id, para, topic, gender))
    frame = pd.DataFrame(rows, columns=["doc_id", "document", "text", "topic", "gender"])
    return frame.drop_duplicates(subset="text", keep="first").reset_index(drop=True)


def pair_name(pair: tuple[str, str]) -> str:
    return f"{pair[0]}-{pair[1]}"


SCR_SOURCE_COLUMNS = ["doc_id", "document", "text", "label", "spurious", "y", "z"]
CELL_COLUMNS = ["pair", "label", "spurious", "y", "z", "available", "train_biased", "train_balanced", "test"]


def split_quotas(counts: dict[tuple[int, int], int], cap: int) -> tuple[int, int]:
    """(t, b): rows per cell for test and for balanced train (t each), and per diagonal
    cell for biased train (b). Off-diagonal cells give 2t, diagonal ones 2t + b, b ≥ t."""
    off = min(counts[(0, 1)], counts[(1, 0)])
    diag = min(counts[(0, 0)], counts[(1, 1)])
    t = min(cap, off // 2, diag // 3)
    return t, min(cap, diag - 2 * t)


def scr_split(
    source: pd.DataFrame, name: str, *, max_per_cell: int, min_cell: int, seed: int, unit: str = "rows", kind: str = "pair"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split an SCR source frame (SCR_SOURCE_COLUMNS; y = z is the biased diagonal) by
    whole documents into train_biased, train_balanced and test; returns the labelled_scr
    frame and its cell counts (CELL_COLUMNS).

    Per (y, z) cell: t rows to test and t to the balanced train split, and b rows of each
    diagonal cell to the biased one (:func:`split_quotas`, at most ``max_per_cell``); z
    is recoded (1 − z) when the other diagonal gives a larger t.
    Documents are visited in a seeded order; a document goes to the first split (test,
    balanced, biased) whose quota still takes one of its rows, with every row that fits
    (its other rows are dropped), so no document is in two splits. Cells then are cut to
    equal counts (the two diagonal cells of the biased split to equal counts).

    Raises :class:`CellTooSmall` naming the set and every cell below ``min_cell`` (counted
    in ``unit``; ``kind`` names what to choose instead).
    """
    cells = [(y, z) for y in (0, 1) for z in (0, 1)]
    counts = source.groupby(["y", "z"]).size().to_dict()
    flipped = {(y, 1 - z): n for (y, z), n in counts.items()}
    if all(c in counts for c in cells) and split_quotas(flipped, max_per_cell)[0] > split_quotas(counts, max_per_cell)[0]:
        # the other diagonal leaves more rows per cell: z = 1 is the other spurious value
        source, counts = source.assign(z=1 - source["z"]), flipped
    names = source.groupby(["y", "z"])[["label", "spurious"]].first()
    small = {c: counts.get(c, 0) for c in cells if counts.get(c, 0) < min_cell}
    if small:
        listed = ", ".join(
            f"({names.loc[c, 'label']}, {names.loc[c, 'spurious']}) has {n}" if c in names.index else f"(y={c[0]}, z={c[1]}) has 0"
            for c, n in small.items()
        )
        raise CellTooSmall(
            f"SCR pair {name}: cell {listed} {unit}, fewer than scr_min_cell={min_cell}; "
            f"choose another {kind} or lower scr_min_cell"
        )
    t, b = split_quotas(counts, max_per_cell)
    quota = {"test": dict.fromkeys(cells, t), "train_balanced": dict.fromkeys(cells, t),
             "train_biased": {c: (b if c[0] == c[1] else 0) for c in cells}}
    rng = np.random.default_rng(seed)
    documents = np.sort(source["document"].unique())
    order = {d: i for i, d in enumerate(documents[rng.permutation(len(documents))])}
    ordered = source.assign(_order=source["document"].map(order)).sort_values(["_order", "doc_id"])
    keys = list(zip(ordered["y"].tolist(), ordered["z"].tolist()))
    bounds = np.flatnonzero(np.diff(ordered["_order"].to_numpy(), prepend=-1, append=len(documents)))
    split: list[str | None] = [None] * len(ordered)
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # the rows of one document
        for name_ in ("test", "train_balanced", "train_biased"):
            left = dict(quota[name_])
            taken = []
            for i in range(lo, hi):
                if left[keys[i]] > 0:
                    left[keys[i]] -= 1
                    taken.append(i)
            if taken:
                quota[name_] = left
                for i in taken:
                    split[i] = name_
                break
    frame = ordered.assign(split=split).dropna(subset=["split"]).drop(columns="_order")
    # equal cells: test and balanced over the four cells, biased over its diagonal
    parts = []
    for name_, part in frame.groupby("split"):
        n = part.groupby(["y", "z"]).size().min()
        parts.append(part.groupby(["y", "z"], group_keys=False).head(n))
    frame = pd.concat(parts)
    cell_rows = []
    for (y, z) in cells:
        in_cell = frame[(frame["y"] == y) & (frame["z"] == z)]
        cell_rows.append({"pair": name, "label": names.loc[(y, z), "label"], "spurious": names.loc[(y, z), "spurious"], "y": y, "z": z,
                          "available": counts[(y, z)], **{s: int((in_cell["split"] == s).sum()) for s in ("train_biased", "train_balanced", "test")}})
    frame = frame.assign(dataset=f"scr_{name}")[["doc_id", "document", "dataset", "text", "label", "spurious", "y", "z", "split"]]
    frame = frame.astype({"y": int, "z": int}).sort_values(["split", "y", "z", "doc_id"]).reset_index(drop=True)
    return frame, pd.DataFrame(cell_rows, columns=CELL_COLUMNS)


def bbc_scr_source(pair: tuple[str, str], paragraphs: pd.DataFrame) -> pd.DataFrame:
    """The SCR source frame of a BBC topic pair: y = 1 for ``pair[1]``; z = 1 for the
    gender that ``pair[1]`` is paired with in the biased split, chosen so that the
    diagonal (y = z) cells are the larger ones."""
    a, b = pair
    topics = sorted(paragraphs["topic"].unique())
    unknown = [t for t in pair if t not in topics]
    if unknown:
        raise ValueError(f"SCR pair {pair_name(pair)}: unknown BBC topic(s) {unknown}; topics are {topics}")
    rows = paragraphs[paragraphs["topic"].isin(pair)]
    size = rows.groupby(["topic", "gender"]).size()

    def diagonal_min(g1: str) -> int:
        g0 = "female" if g1 == "male" else "male"
        return min(int(size.get((a, g0), 0)), int(size.get((b, g1), 0)))

    g1 = max(GENDERS, key=diagonal_min)
    return pd.DataFrame({
        "doc_id": rows["doc_id"], "document": rows["document"], "text": rows["text"], "label": rows["topic"],
        "spurious": rows["gender"], "y": (rows["topic"] == b).astype(int), "z": (rows["gender"] == g1).astype(int),
    })


def scr_set(
    pair: tuple[str, str],
    paragraphs: pd.DataFrame,
    *,
    max_per_cell: int,
    min_cell: int,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The SCR set of one BBC topic pair and its cell counts (:func:`bbc_scr_source`
    split by whole articles with :func:`scr_split`)."""
    return scr_split(bbc_scr_source(pair, paragraphs), pair_name(pair), max_per_cell=max_per_cell, min_cell=min_cell, seed=seed,
                     unit="paragraphs", kind="topic pair")


@dataclass
class LabelledSets:
    """Every labelled set of one downstream config.

    probing: dataset name -> its labelled_probing frame.
    scr: pair name -> its labelled_scr frame ('<a>-<b>' for BBC topics, '<y task>-vs-<z task>'
    for two sae-probes labels, 'planted-<task>' for a planted cue).
    cells: the scr_cells table (rows per pair, cell and split); empty without pairs.
    """

    probing: dict[str, pd.DataFrame]
    scr: dict[str, pd.DataFrame]
    cells: pd.DataFrame

    def documents(self) -> pd.DataFrame:
        """Every distinct document (doc_id, text), sorted by id."""
        frames = [f[["doc_id", "text"]] for f in [*self.probing.values(), *self.scr.values()]]
        docs = pd.concat(frames, ignore_index=True).drop_duplicates("doc_id").sort_values("doc_id").reset_index(drop=True)
        clash = pd.concat(frames).drop_duplicates().groupby("doc_id")["text"].nunique()
        if (clash > 1).any():
            raise ValueError(f"document ids reused for different texts across datasets: {clash[clash > 1].index[:3].tolist()}")
        return docs


def joined_pair_name(y_task: str, z_task: str) -> str:
    return f"{y_task}-vs-{z_task}"


def planted_pair_name(task: str) -> str:
    return f"planted-{task}"


def build_labelled_sets(cfg: DownstreamConfig) -> LabelledSets:
    """The probing sets and the SCR sets of ``cfg`` (deterministic for a given seed; the
    i-th SCR set is drawn with seed + i, BBC pairs first, then the sae-probes ones)."""
    from tasks import sae_probes

    probing = {}
    for name in cfg.probing_datasets:
        frame = probing_set(name, cfg.max_documents_per_class, cfg.seed)
        probing[frame["dataset"].iloc[0]] = frame
    # (source, its name, how its rows and what to choose instead are called in errors); the cheap BBC sets first,
    # so a config error there surfaces before the benchmark is read
    sources: list[tuple[str, pd.DataFrame, str, str]] = []
    if cfg.scr_pairs:
        paragraphs = bbc_paragraphs()
        sources += [(pair_name(p), bbc_scr_source(p, paragraphs), "paragraphs", "topic pair") for p in cfg.scr_pairs]
    sources += [(joined_pair_name(y, z), sae_probes.joined_scr_frame(y, z), "texts", "pair of tasks") for y, z in cfg.scr_sae_probes]
    sources += [(planted_pair_name(t), sae_probes.planted_scr_frame(t, cfg.seed), "texts", "task") for t in cfg.scr_planted]
    scr, cells = {}, []
    for i, (name, source, unit, kind) in enumerate(sources):
        frame, counts = scr_split(source, name, max_per_cell=cfg.scr_max_documents_per_cell, min_cell=cfg.scr_min_cell,
                                  seed=cfg.seed + i, unit=unit, kind=kind)
        scr[name] = frame
        cells.append(counts)
    probing.update(sae_probes.probing_sets(cfg.sae_probes_tasks, cfg.sae_probes_documents_per_class, cfg.seed))
    return LabelledSets(probing, scr, pd.concat(cells, ignore_index=True) if cells else pd.DataFrame())
