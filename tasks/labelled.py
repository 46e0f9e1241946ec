"""Labelled document sets of the downstream stage, built from the embedded text (SPEC §7).

Probing sets: BBC articles by topic (5 classes) and tweets by sentiment (positive vs
negative), or any file / hub dataset with ``text`` and ``label`` columns. Balanced: every
class gets the same number of documents in train and in test, a seeded sample.

The SCR set is built the way bias_in_bios labels gender: BBC articles are split into
paragraphs on blank lines; a paragraph's gender is the gender of its third-person
pronouns (he/him/his/himself vs she/her/hers/herself), and paragraphs with pronouns of
both genders or none are dropped. For a topic pair (y) the biased train split holds only
the two cells on one diagonal (y = z), oriented so that the diagonal has the larger
cells; the balanced train and test splits take equal numbers from all four cells.

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
    """An SCR cell holds fewer paragraphs than ``scr_min_cell``."""


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


def _balanced_split(frame: pd.DataFrame, classes: list[str], cap: int, seed: int, dataset: str) -> pd.DataFrame:
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
    return _balanced_split(frame, classes, max_per_class, seed, label)


@lru_cache(maxsize=1)
def bbc_paragraphs() -> pd.DataFrame:
    """BBC paragraphs with one pronoun gender: doc_id ('<article>#p<i>'), text, topic, gender.

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
                rows.append((f"{doc_id}#p{i}", para, topic, gender))
    frame = pd.DataFrame(rows, columns=["doc_id", "text", "topic", "gender"])
    return frame.drop_duplicates(subset="text", keep="first").reset_index(drop=True)


def pair_name(pair: tuple[str, str]) -> str:
    return f"{pair[0]}-{pair[1]}"


def scr_set(
    pair: tuple[str, str],
    paragraphs: pd.DataFrame,
    *,
    max_per_cell: int,
    min_cell: int,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The SCR set of one topic pair, and its cell counts.

    y = 1 for ``pair[1]``; z = 1 for the gender that ``pair[1]`` is paired with in the
    biased split, so y = z on every biased row. Per cell (seeded order): the first t go
    to test, the next o to the balanced train split, t = o = min(cap, n_min // 2) with
    n_min the smallest cell; the biased split takes min(cap, smallest diagonal cell − t)
    from each diagonal cell after its test documents (it may share documents with the
    balanced train split, never with test).

    Raises :class:`CellTooSmall` naming the pair and every cell below ``min_cell``.
    """
    a, b = pair
    topics = sorted(paragraphs["topic"].unique())
    unknown = [t for t in pair if t not in topics]
    if unknown:
        raise ValueError(f"SCR pair {pair_name(pair)}: unknown BBC topic(s) {unknown}; topics are {topics}")
    rng = np.random.default_rng(seed)
    cells: dict[tuple[str, str], pd.DataFrame] = {}
    for topic in pair:
        for gender in GENDERS:
            rows = paragraphs[(paragraphs["topic"] == topic) & (paragraphs["gender"] == gender)].sort_values("doc_id")
            cells[(topic, gender)] = rows.iloc[rng.permutation(len(rows))]
    small = {c: len(r) for c, r in cells.items() if len(r) < min_cell}
    if small:
        listed = ", ".join(f"({t}, {g}) has {n}" for (t, g), n in small.items())
        raise CellTooSmall(
            f"SCR pair {pair_name(pair)}: cell {listed} paragraphs, fewer than scr_min_cell={min_cell}; "
            "choose another topic pair or lower scr_min_cell"
        )
    n_min = min(len(r) for r in cells.values())
    t = min(max_per_cell, n_min // 2)
    o = min(max_per_cell, n_min - t)
    # orientation: pair[1] goes with the gender that makes the diagonal cells largest
    def diagonal(g1: str) -> tuple[tuple[str, str], tuple[str, str]]:
        g0 = "female" if g1 == "male" else "male"
        return (a, g0), (b, g1)

    g1 = max(GENDERS, key=lambda g: min(len(cells[c]) for c in diagonal(g)))
    diag = diagonal(g1)
    n_biased = min(max_per_cell, min(len(cells[c]) for c in diag) - t)
    parts, counts = [], []
    for (topic, gender), rows in cells.items():
        y, z = int(topic == b), int(gender == g1)
        biased = rows.iloc[t : t + n_biased] if (topic, gender) in diag else rows.iloc[:0]
        for split, chosen in (("test", rows.iloc[:t]), ("train_balanced", rows.iloc[t : t + o]), ("train_biased", biased)):
            parts.append(chosen.assign(split=split, y=y, z=z))
        counts.append(
            {"pair": pair_name(pair), "topic": topic, "gender": gender, "y": y, "z": z, "available": len(rows),
             "train_biased": len(biased), "train_balanced": o, "test": t}
        )
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.rename(columns={"topic": "label", "gender": "spurious"}).assign(dataset=f"scr_{pair_name(pair)}")
    frame = frame[["doc_id", "dataset", "text", "label", "spurious", "y", "z", "split"]]
    frame = frame.sort_values(["split", "y", "z", "doc_id"]).reset_index(drop=True)
    return frame, pd.DataFrame(counts)


@dataclass
class LabelledSets:
    """Every labelled set of one downstream config.

    probing: dataset name -> its labelled_probing frame.
    scr: pair name ('<a>-<b>') -> its labelled_scr frame.
    cells: the scr_cells table (documents per pair, topic, gender and split); empty without pairs.
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


def build_labelled_sets(cfg: DownstreamConfig) -> LabelledSets:
    """The probing sets and the SCR sets of ``cfg`` (deterministic for a given seed; the
    i-th SCR pair is drawn with seed + i)."""
    probing = {}
    for name in cfg.probing_datasets:
        frame = probing_set(name, cfg.max_documents_per_class, cfg.seed)
        probing[frame["dataset"].iloc[0]] = frame
    scr, cells = {}, []
    if cfg.scr_pairs:
        paragraphs = bbc_paragraphs()
        for i, pair in enumerate(cfg.scr_pairs):
            frame, counts = scr_set(pair, paragraphs, max_per_cell=cfg.scr_max_documents_per_cell,
                                    min_cell=cfg.scr_min_cell, seed=cfg.seed + i)
            scr[pair_name(pair)] = frame
            cells.append(counts)
    return LabelledSets(probing, scr, pd.concat(cells, ignore_index=True) if cells else pd.DataFrame())
