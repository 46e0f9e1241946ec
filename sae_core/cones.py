"""Concept cones (Rocchi-Henry, Fel & Franchi, arXiv 2512.07355; related.md §4).

A dictionary's atoms (unit decoder rows) span a cone: their non-negative combinations. A
concept direction w (a probe's unit weight vector) is *contained* in the cone when it is such
a combination. For each concept the top-s atoms by cosine with w are offered to a
non-negative least-squares fit (``scipy.optimize.nnls``)::

    α* = argmin_{α ≥ 0} ‖w − D_Sᵀ α‖,    containment = 1 − ‖w − D_Sᵀ α*‖² = cos² of w's angle to the cone

and the atoms the fit uses (α*_i > 0) say how many latents the concept takes. Bigger
dictionaries contain more directions trivially, so a random dictionary of the same shape is
fitted alongside as the guard (:func:`random_dictionary`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: an NNLS weight above this (relative to the largest) counts as an atom used
ATOM_TOL = 1e-9


@dataclass(frozen=True)
class ConeFit:
    """containment = 1 − residual²; residual = ‖w − D_Sᵀ α*‖ (w unit, so both lie in [0, 1]);
    atoms: the dictionary rows with α*_i > 0, strongest first; weights: their α*."""

    containment: float
    residual: float
    atoms: np.ndarray
    weights: np.ndarray

    @property
    def n_atoms(self) -> int:
        return int(self.atoms.size)


def unit_atoms(dictionary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit rows of the non-zero rows, their indices) of a dictionary [n, d]."""
    D = np.asarray(dictionary, dtype=np.float64)
    if D.ndim != 2:
        raise ValueError(f"the dictionary must be [atoms, d]; got shape {D.shape}")
    norms = np.linalg.norm(D, axis=1)
    keep = np.flatnonzero(norms > 0)
    return D[keep] / norms[keep, None], keep


def cone_fit(direction: np.ndarray, dictionary: np.ndarray, candidates: int) -> ConeFit:
    """Fit the unit ``direction`` [d] in the cone of the top-``candidates`` rows of
    ``dictionary`` [n, d] by cosine (ties: lower index first)."""
    return cone_fits(np.asarray(direction, dtype=np.float64)[None], dictionary, candidates)[0]


def cone_fits(directions: np.ndarray, dictionary: np.ndarray, candidates: int) -> list[ConeFit]:
    """:func:`cone_fit` of each row of ``directions`` [C, d], the dictionary normalised once and
    every cosine in one matmul."""
    w = np.asarray(directions, dtype=np.float64)
    norms = np.linalg.norm(w, axis=1)
    if (norms == 0).any() or not np.isfinite(norms).all():
        raise ValueError("a concept direction is zero or not finite: a probe with no signal has no direction")
    atoms, index = unit_atoms(dictionary)
    if atoms.shape[1] != w.shape[1]:
        raise ValueError(f"the direction has {w.shape[1]} dimensions but the dictionary's rows have {atoms.shape[1]}")
    if candidates <= 0:
        raise ValueError(f"candidates must be positive; got {candidates}")
    w = w / norms[:, None]
    cosines = w @ atoms.T                                          # [C, n]
    return [_fit(w[c], atoms, index, cosines[c], candidates) for c in range(w.shape[0])]


def _fit(w: np.ndarray, atoms: np.ndarray, index: np.ndarray, cosine: np.ndarray, candidates: int) -> ConeFit:
    from scipy.optimize import nnls

    if candidates < cosine.size:   # the top s by cosine (ties: lower index), without sorting all n
        part = np.argpartition(-cosine, candidates - 1)[:candidates]
        threshold = cosine[part].min()
        tied = np.flatnonzero(cosine >= threshold)
        chosen = tied[np.lexsort((tied, -cosine[tied]))][:candidates]
    else:
        chosen = np.lexsort((np.arange(cosine.size), -cosine))
    alpha, residual = nnls(atoms[chosen].T, w)
    used = alpha > ATOM_TOL * max(1.0, float(alpha.max(initial=0.0)))
    order = np.argsort(-alpha[used], kind="stable")
    residual = float(min(residual, 1.0))   # α = 0 already gives 1: a fit never does worse
    return ConeFit(1.0 - residual**2, residual, index[chosen][used][order], alpha[used][order])


def random_dictionary(n_atoms: int, d: int, seed: int) -> np.ndarray:
    """n_atoms Gaussian directions, unit rows [n_atoms, d] (seeded): the guard's dictionary."""
    rows = np.random.default_rng(seed).standard_normal((n_atoms, d))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)
