"""Concept detection by sparse probing (SPEC §7), for any SAE-like object.

An SAE-like object has ``encode(a: [B, d]) -> [B, m]`` and ``W_dec: [m, d]`` (a single
SAE is an :class:`~sae_core.ensemble.Ensemble` with J = 1; :class:`IdentityDictionary`
makes the raw activations one too, for the baseline). Documents are mean-pooled over
their (non-special) tokens; a probe is a scikit-learn logistic regression on
standardised features, one-vs-rest per class, on the k latents whose pooled means
differ most between the class and the rest on the train split.

Ensembles are encoded once: pooled member codes ``[J, N, m]`` give every prefix
J' = 1..J by re-weighting (:func:`prefix_pooled_codes`), which equals encoding with
``Ensemble.prefix(J')`` because mean pooling is linear (tested).

Encoding runs on the dictionary's device (``device=None``: where its parameters are);
token batches are moved there, the pooled codes come back to the CPU. Probes fit on the
CPU (scikit-learn): every function taking ``np.ndarray | Tensor`` accepts a tensor on any
device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from sae_core.devices import resolve_device, to_device
from sae_core.numerics import NORM_EPS


NEWTON_MAX_FEATURES = 64  # fit_probe: Newton's method up to this many features, lbfgs above
NEWTON_TOL = 1e-10  # newton_logistic: stop when every gradient entry is below this
NEWTON_MAX_ITER = 100
NEWTON_MIN_STEP = 1e-12  # newton_logistic: a Newton step this small ends the iteration
NEWTON_MIN_SCALE = 1e-6  # newton_logistic: the smallest fraction of a Newton step tried


class SAELike(Protocol):
    """What probing and SCR need of an SAE: codes and the dictionary."""

    def encode(self, a: Tensor) -> Tensor: ...

    @property
    def W_dec(self) -> Tensor: ...


class IdentityDictionary:
    """The raw activations as a dictionary: codes c = a, W_dec = I_d (the neuron baseline).

    Ablating "latent" i of it zeroes neuron i: a' = a − a_i e_i.
    """

    def __init__(self, d: int) -> None:
        self.d = d

    def encode(self, a: Tensor) -> Tensor:
        """[B, d] -> [B, d] (the activations themselves)."""
        return a

    @property
    def W_dec(self) -> Tensor:
        """I_d: [d, d]."""
        return torch.eye(self.d)


def as_array(x: np.ndarray | Tensor, dtype=np.float64) -> np.ndarray:
    """``x`` as a numpy array of ``dtype``; a tensor is detached and brought to the CPU first."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def encoding_device(sae, activations: Tensor | np.ndarray, device: str | torch.device | None) -> torch.device:
    """Where ``sae`` encodes: ``device`` if given (an SAE module is moved there, in place),
    else the device of its parameters (``sae.device``), else that of the activations (a
    dictionary without parameters, such as :class:`IdentityDictionary`)."""
    if device is not None:
        target = resolve_device(device)
        if isinstance(sae, torch.nn.Module):
            sae.to(target)
        return target
    own = getattr(sae, "device", None)
    if isinstance(own, torch.device):
        return own
    return activations.device if isinstance(activations, Tensor) else torch.device("cpu")


# ----------------------------------------------------------------------- pooling
def mean_pool(values: Tensor | np.ndarray, doc_index: Tensor | np.ndarray, n_docs: int) -> Tensor:
    """Mean over each document's tokens: pooled[n] = (1/|T_n|) Σ_{t ∈ T_n} values[t].

    values: [T, m] per-token values; doc_index: [T] document of each token in 0..n_docs−1.
    Returns [n_docs, m] float32 on the device of ``values``. A document without tokens
    raises (its mean is undefined).
    """
    values = torch.as_tensor(values, dtype=torch.float32)
    index = torch.as_tensor(doc_index, dtype=torch.long).to(values.device)
    if values.ndim != 2 or index.shape != (values.shape[0],):
        raise ValueError(f"values must be [T, m] and doc_index [T]; got {tuple(values.shape)} and {tuple(index.shape)}")
    counts = torch.bincount(index, minlength=n_docs).float()
    if counts.shape[0] > n_docs:
        raise ValueError(f"doc_index holds {int(index.max())}, outside 0..{n_docs - 1}")
    if bool((counts == 0).any()):
        raise ValueError(f"document {int((counts == 0).nonzero()[0])} has no tokens to pool")
    sums = torch.zeros(n_docs, values.shape[1], device=values.device).index_add_(0, index, values)
    return sums / counts[:, None]


@torch.no_grad()
def pooled_codes(
    sae: SAELike, activations: Tensor | np.ndarray, doc_index: Tensor | np.ndarray, n_docs: int, batch_size: int = 4096,
    device: str | torch.device | None = None,
) -> Tensor:
    """Mean-pooled codes per document: pool(encode(a)) -> [n_docs, m], on the CPU.

    activations: [T, d] token activations; doc_index: [T]. Tokens are encoded in batches
    of ``batch_size`` and summed into the documents, so memory stays at [batch, m].
    ``device``: where to encode and sum (:func:`encoding_device`; None: the SAE's own;
    else the SAE is moved there).
    """
    a = torch.as_tensor(activations, dtype=torch.float32)
    device = encoding_device(sae, a, device)
    index = to_device(torch.as_tensor(doc_index, dtype=torch.long), device)
    sums: Tensor | None = None
    for start in range(0, a.shape[0], batch_size):
        codes = sae.encode(to_device(a[start : start + batch_size], device)).float()
        if sums is None:
            sums = torch.zeros(n_docs, codes.shape[1], device=device)
        sums.index_add_(0, index[start : start + batch_size], codes)
    if sums is None:
        raise ValueError("no tokens to encode")
    counts = torch.bincount(index, minlength=n_docs).float()
    if bool((counts == 0).any()):
        raise ValueError(f"document {int((counts == 0).nonzero()[0])} has no tokens to pool")
    return (sums / counts[:, None]).cpu()


@torch.no_grad()
def pooled_member_codes(
    ensemble, activations: Tensor | np.ndarray, doc_index: Tensor | np.ndarray, n_docs: int, batch_size: int = 4096,
    device: str | torch.device | None = None,
) -> Tensor:
    """Each member's own mean-pooled codes (without α): [J, n_docs, m], on the CPU.

    ``ensemble.member_codes(a)`` gives [J, B, m] (boosting members read their residuals).
    Encoding once here serves every prefix through :func:`prefix_pooled_codes`.
    ``device``: where to encode and sum (None: the ensemble's own; else it is moved there).
    """
    a = torch.as_tensor(activations, dtype=torch.float32)
    device = encoding_device(ensemble, a, device)
    index = to_device(torch.as_tensor(doc_index, dtype=torch.long), device)
    J, k = ensemble.n_members, ensemble.member_cfg.d_sae
    sums = torch.zeros(J, n_docs, k, device=device)
    for start in range(0, a.shape[0], batch_size):
        codes = ensemble.member_codes(to_device(a[start : start + batch_size], device)).float()  # [J, B, m]
        sums.index_add_(1, index[start : start + batch_size], codes)
    counts = torch.bincount(index, minlength=n_docs).float()
    if bool((counts == 0).any()):
        raise ValueError(f"document {int((counts == 0).nonzero()[0])} has no tokens to pool")
    return (sums / counts[None, :, None]).cpu()


def prefix_pooled_codes(pooled_members: Tensor, alpha: Tensor) -> Tensor:
    """Pooled codes of a prefix ensemble, [α_1 c̄^(1); …; α_n c̄^(n)]: [J, N, m] -> [N, n·k].

    alpha = ``ensemble.prefix_alpha(n)`` (the one definition of a prefix's weights);
    equal to ``pooled_codes(ensemble.prefix(n), ...)`` since pooling is
    linear; its dictionary is ``ensemble.W_dec[: n·k]``.
    """
    n = alpha.shape[0]
    scaled = pooled_members[:n] * alpha.to(pooled_members.device)[:, None, None]
    return scaled.permute(1, 0, 2).reshape(pooled_members.shape[1], n * pooled_members.shape[2])


# ----------------------------------------------------------------------- probes
@dataclass
class LinearProbe:
    """A logistic-regression probe on standardised features: p(y=1|x) = σ(w·(x−μ)/s + b).

    mean, scale: [m] standardisation fitted on the train rows; coef: [m]; intercept: scalar.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def decision(self, x: np.ndarray | Tensor) -> np.ndarray:
        """w·(x−μ)/s + b: [N, m] -> [N]."""
        x = as_array(x)
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def predict(self, x: np.ndarray | Tensor) -> np.ndarray:
        """1 where the decision is positive: [N, m] -> [N] int."""
        return (self.decision(x) > 0).astype(np.int64)

    def accuracy(self, x: np.ndarray | Tensor, y: np.ndarray) -> float:
        """Fraction of rows predicted right: mean(predict(x) == y)."""
        return float(np.mean(self.predict(x) == np.asarray(y)))

    @property
    def direction(self) -> np.ndarray:
        """The probe's weight in the unstandardised feature space, w / s: [m]."""
        return self.coef / self.scale


def _logistic_objective(Z: np.ndarray, y: np.ndarray, beta: np.ndarray, C: float) -> tuple[float, np.ndarray]:
    """(objective, η = Z β) of :func:`newton_logistic`."""
    eta = Z @ beta
    return float(C * (np.logaddexp(0.0, eta) - y * eta).sum() + 0.5 * beta[:-1] @ beta[:-1]), eta


def newton_logistic(z: np.ndarray, y: np.ndarray, C: float = 1.0, tol: float = NEWTON_TOL,
                    max_iter: int = NEWTON_MAX_ITER) -> tuple[np.ndarray, float]:
    """(w [m], b) minimising C · Σ_i [log(1 + e^{η_i}) − y_i η_i] + ½‖w‖², η = z w + b.

    The objective of scikit-learn's L2 ``LogisticRegression(C)`` (intercept not
    penalised); z: [N, m] float64, y: [N] in {0, 1}. Newton steps (the Hessian is
    C · Zᵀ diag(p(1−p)) Z + diag(1, …, 1, 0), Z = [z, 1]) with step halving until the
    objective does not increase; stops when max |gradient| < ``tol``. For the few
    features of a sparse probe this avoids scikit-learn's per-fit overhead (tested
    against it).
    """
    from scipy.special import expit

    N, m = z.shape
    Z = np.hstack([z, np.ones((N, 1))])
    penalty = np.ones(m + 1)
    penalty[-1] = 0.0
    beta = np.zeros(m + 1)
    objective, eta = _logistic_objective(Z, y, beta, C)
    eye = np.diag(penalty)
    for _ in range(max_iter):
        p = expit(eta)
        grad = C * (Z.T @ (p - y)) + penalty * beta
        if np.abs(grad).max() < tol:
            break
        hess = C * (Z.T * (p * (1.0 - p))) @ Z + eye
        step = np.linalg.solve(hess, grad)
        if np.abs(step).max() < NEWTON_MIN_STEP:
            break
        # halve the step until the objective does not increase (beyond rounding); a step
        # that cannot decrease it means the optimum is reached to machine precision
        slack = 1e-12 * max(1.0, abs(objective))
        scale = 1.0
        while scale >= NEWTON_MIN_SCALE:
            candidate = beta - scale * step
            value, candidate_eta = _logistic_objective(Z, y, candidate, C)
            if value <= objective + slack:
                break
            scale /= 2
        else:
            break
        beta, objective, eta = candidate, value, candidate_eta
    return beta[:-1].copy(), float(beta[-1])


def fit_probe(x: np.ndarray | Tensor, y: np.ndarray, *, C: float = 1.0, max_iter: int = 1000) -> LinearProbe:
    """Fit a binary L2 logistic regression on standardised x: [N, m], y: [N] in {0, 1}.

    Features with zero spread (dead latents) keep scale 1, so they contribute nothing.
    Both classes must be present (a clear error otherwise).
    """
    from sklearn.linear_model import LogisticRegression

    x = as_array(x)
    y = np.asarray(y).astype(np.int64)
    classes = np.unique(y)
    if len(classes) != 2:
        raise ValueError(f"a probe needs both classes 0 and 1 in its train rows; got {classes.tolist()}")
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > NORM_EPS, scale, 1.0)
    # Both solvers minimise the same objective (L2, unpenalised intercept). On few features
    # our Newton's method is much faster (scikit-learn's per-fit overhead dominates a sparse
    # probe: ~7 ms against well under 1 ms); on hundreds of features (the dense baseline) a
    # features × features Hessian makes Newton slower than lbfgs.
    z = (x - mean) / scale
    if x.shape[1] <= NEWTON_MAX_FEATURES:
        coef, intercept = newton_logistic(z, y.astype(np.float64), C)
        return LinearProbe(mean, scale, coef, intercept)
    model = LogisticRegression(C=C, max_iter=max_iter).fit(z, y)
    return LinearProbe(mean, scale, model.coef_[0].copy(), float(model.intercept_[0]))


def select_top_latents(x_train: np.ndarray | Tensor, y_train: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k features with the largest |mean_pos − mean_neg| on the train rows.

    mean_pos_i = mean over rows with y = 1 of x[:, i], mean_neg_i likewise for y = 0.
    x_train: [N, m]; y_train: [N] in {0, 1}. Returns [min(k, m)] int64, largest first
    (ties broken by the lower index, so the choice is deterministic).
    """
    x = x_train.detach().cpu().numpy() if isinstance(x_train, Tensor) else np.asarray(x_train)
    y = np.asarray(y_train).astype(bool)
    if y.all() or not y.any():
        raise ValueError("top-latent selection needs positive and negative train rows")
    diff = np.abs(x[y].mean(0, dtype=np.float64) - x[~y].mean(0, dtype=np.float64))
    order = np.lexsort((np.arange(len(diff)), -diff))
    return order[: min(k, len(diff))]


@dataclass(frozen=True)
class ProbeResult:
    """Test accuracy of the k-latent one-vs-rest probe for one class."""

    cls: str
    k: int
    accuracy: float
    latents: tuple[int, ...]


def one_vs_rest_rows(labels: np.ndarray, cls: str, seed: int) -> np.ndarray:
    """Rows of a balanced one-vs-rest task: every row of ``cls`` and as many others, seeded.

    Two classes: all rows (the task is already balanced by construction). Returns sorted
    row indices into ``labels``.
    """
    labels = np.asarray(labels)
    pos = np.flatnonzero(labels == cls)
    neg = np.flatnonzero(labels != cls)
    if len(np.unique(labels)) > 2 and len(neg) > len(pos):
        neg = np.sort(np.random.default_rng(seed).choice(neg, size=len(pos), replace=False))
    return np.sort(np.concatenate([pos, neg]))


def sparse_probe_accuracy(
    x_train: np.ndarray | Tensor,
    labels_train: Sequence[str] | np.ndarray,
    x_test: np.ndarray | Tensor,
    labels_test: Sequence[str] | np.ndarray,
    ks: Iterable[int],
    *,
    classes: Sequence[str] | None = None,
    seed: int = 0,
) -> list[ProbeResult]:
    """Sparse probing: per class, one-vs-rest, top-k latents by mean difference, test accuracy.

    x_train: [N, m], x_test: [M, m] pooled features (codes, or raw activations for the
    baseline); labels: class names per row. For each class c and k: rows are balanced
    (all of c, as many others, seeded) on both splits; the top-k latents by
    |mean_pos − mean_neg| on train are kept; a logistic regression on them is scored by
    accuracy on test (chance 0.5). With two classes only the first class is probed (the
    other task is its mirror image).
    """
    # kept in their own dtype: only the chosen columns are converted to float64 (exactly), below
    x_train = x_train.detach().cpu().numpy() if isinstance(x_train, Tensor) else np.asarray(x_train)
    x_test = x_test.detach().cpu().numpy() if isinstance(x_test, Tensor) else np.asarray(x_test)
    labels_train = np.asarray(labels_train).astype(str)
    labels_test = np.asarray(labels_test).astype(str)
    if classes is None:
        classes = sorted(set(labels_train.tolist()))
    if len(classes) < 2:
        raise ValueError(f"sparse probing needs at least 2 classes, got {list(classes)}")
    probed = list(classes)[:1] if len(classes) == 2 else list(classes)
    ks = sorted(set(int(k) for k in ks))
    results = []
    for ci, cls in enumerate(probed):
        tr = one_vs_rest_rows(labels_train, cls, seed + ci)
        te = one_vs_rest_rows(labels_test, cls, seed + 1000 + ci)
        y_tr = (labels_train[tr] == cls).astype(np.int64)
        y_te = (labels_test[te] == cls).astype(np.int64)
        ranked = select_top_latents(x_train[tr], y_tr, max(ks))
        # only the ranked columns are copied (not the whole [N, m] matrix once per k)
        chosen_train, chosen_test = as_array(x_train[np.ix_(tr, ranked)]), as_array(x_test[np.ix_(te, ranked)])
        for k in ks:
            probe = fit_probe(chosen_train[:, :k], y_tr)
            results.append(ProbeResult(cls, k, probe.accuracy(chosen_test[:, :k], y_te), tuple(int(i) for i in ranked[:k])))
    return results


def full_probe_accuracy(
    x_train: np.ndarray | Tensor,
    labels_train: Sequence[str] | np.ndarray,
    x_test: np.ndarray | Tensor,
    labels_test: Sequence[str] | np.ndarray,
    *,
    classes: Sequence[str] | None = None,
    seed: int = 0,
) -> list[ProbeResult]:
    """The dense reference: the same one-vs-rest tasks with every feature (k = m).

    Used on the raw activations (the baseline probe); rows as in :func:`sparse_probe_accuracy`.
    """
    x_train = as_array(x_train)
    m = x_train.shape[1]
    out = sparse_probe_accuracy(x_train, labels_train, x_test, labels_test, [m], classes=classes, seed=seed)
    return out
