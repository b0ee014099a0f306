"""Neuron-level analyses as pure functions of group moments (see ``docs/query.md``).

Inputs are the finest groups of :mod:`neurostore.moments`: ``n [langs, groups]`` and, per layer
and neuron, ``mean``/``m2``/``pos`` ``[langs, groups, ..., width]``. Nothing here reads a store.
Empty groups carry ``n = 0``; their means are NaN in the outputs and they never count as a group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import NeurostoreError


# ----------------------------------------------------------------------------------------------
# moments algebra


def _nb(n: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Counts broadcast against per-neuron arrays ``like`` (extra trailing axes)."""
    return n.reshape(n.shape + (1,) * (like.ndim - n.ndim)).astype(np.float64)


def zscore_moments(n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group moments of z, where z is x standardised within its language (axis 0 of the groups).

    Per language: ``mu`` = mean and ``s`` = population std over the language's rows; then the
    group mean of z is ``(mean - mu) / s`` and its M2 is ``m2 / s**2`` (z = 0 where s = 0).
    """
    n_l, mu_l, m2_l = combine(n, mean, m2, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.sqrt(m2_l / _nb(n_l, m2_l))
    s = np.where(np.isfinite(s), s, 0.0)
    ok = s > 0
    safe = np.where(ok, s, 1.0)[:, None]
    zmean = np.where(ok[:, None], (mean - mu_l[:, None]) / safe, 0.0)
    zm2 = np.where(ok[:, None], m2 / safe**2, 0.0)
    empty = _nb(n, mean) == 0
    return np.where(empty, 0.0, zmean), np.where(empty, 0.0, zm2)


def combine(n: np.ndarray, mean: np.ndarray, m2: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge groups along ``axis`` of the group axes: counts add, means weight by count, M2 adds
    the between-group part. Empty results have mean 0 and M2 0."""
    nb = _nb(n, mean)
    n_tot = n.sum(axis=axis)
    w = nb.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.where(w > 0, (nb * mean).sum(axis=axis) / np.where(w > 0, w, 1), 0.0)
    dev = np.where(nb > 0, mean - np.expand_dims(mu, axis), 0.0)
    return n_tot, mu, (m2 + nb * dev * dev).sum(axis=axis)


def group_means(n: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Means with NaN for empty groups (what users see as ``M``)."""
    return np.where(_nb(n, mean) > 0, mean, np.nan)


# ----------------------------------------------------------------------------------------------
# variance and ANOVA


def between_variance(n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over groups ``n [G]``, ``mean/m2 [G, ..., D]``: the population variance of the group means
    (groups with rows only, unweighted) and the one-way ANOVA F statistic.

    F = (SSB / (k - 1)) / (SSW / (N - k)); as in ``scipy.stats.f_oneway``, F = inf where SSW = 0
    < SSB and NaN where both are 0, or where k < 2 or N <= k.
    """
    have = n > 0
    k = int(have.sum())
    shape = mean.shape[1:]
    if k == 0:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    nn, mm, ss = n[have].astype(np.float64), mean[have], m2[have]
    var = mm.var(axis=0)
    N = nn.sum()
    grand = (_nb(nn, mm) * mm).sum(axis=0) / N
    ssb = (_nb(nn, mm) * (mm - grand) ** 2).sum(axis=0)
    ssw = ss.sum(axis=0)
    if k < 2 or N <= k:
        return var, np.full(shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (ssb / (k - 1)) / (ssw / (N - k))
    f = np.where(ssw > 0, f, np.where(ssb > 0, np.inf, np.nan))
    return var, f


def within_variance(n: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """Population variance of the values inside each group: ``m2 / n`` (NaN for empty groups)."""
    nb = _nb(n, m2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(nb > 0, m2 / np.where(nb > 0, nb, 1), np.nan)


def top_k(values: np.ndarray, k: int | None, largest: bool = True) -> list[tuple[int, float]]:
    """``[(index, value)]`` of the k best finite values (ties: lower index first)."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.flatnonzero(np.isfinite(v))
    key = -v[idx] if largest else v[idx]
    order = idx[np.lexsort((idx, key))]
    if k is not None:
        order = order[:k]
    return [(int(i), float(v[i])) for i in order]


# ----------------------------------------------------------------------------------------------
# cross-lingual correlation


def _rank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def correlation_matrices(M: np.ndarray, method: str = "spearman") -> np.ndarray:
    """``M [L, E, D]`` -> ``[E, L, L]``: Spearman's rho (Pearson of average ranks) or cosine
    between ``M[a, e, :]`` and ``M[b, e, :]`` over the D neurons. NaN where a vector is missing
    (empty group) or constant (rho) / zero (cosine)."""
    if method not in ("spearman", "cosine"):
        raise NeurostoreError(f"--method {method}: expected spearman or cosine")
    L, E, _ = M.shape
    out = np.full((E, L, L), np.nan)
    for e in range(E):
        vecs = []
        for a in range(L):
            v = M[a, e]
            if not np.all(np.isfinite(v)):
                vecs.append(None)
                continue
            if method == "spearman":
                r = _rank(v)
                r = r - r.mean()
                vecs.append(r)
            else:
                vecs.append(v.astype(np.float64))
        for a in range(L):
            for b in range(L):
                va, vb = vecs[a], vecs[b]
                if va is None or vb is None:
                    continue
                denom = math.sqrt(float(va @ va) * float(vb @ vb))
                out[e, a, b] = float(va @ vb) / denom if denom > 0 else np.nan
    return out


def nanmean_matrices(mats: np.ndarray) -> np.ndarray:
    """Mean over the first axis ignoring NaN (NaN where every entry is NaN)."""
    finite = np.isfinite(mats)
    cnt = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, np.where(finite, mats, 0).sum(axis=0) / np.maximum(cnt, 1), np.nan)


# ----------------------------------------------------------------------------------------------
# polyglot and monolingual neurons


@dataclass
class PolyglotSets:
    polyglot: list[np.ndarray]  # per label: neuron indices above threshold in every language with rows
    monolingual: list[list[np.ndarray]]  # per label, per language: above threshold there only


def polyglot_sets(M: np.ndarray, n: np.ndarray, threshold: float) -> PolyglotSets:
    """``M [L, E, D]`` mean z, ``n [L, E]``. For label e only the languages that have rows of e
    count; monolingual neurons need at least two such languages."""
    L, E, D = M.shape
    poly, mono = [], []
    for e in range(E):
        langs = np.flatnonzero(n[:, e] > 0)
        above = M[langs, e] > threshold if len(langs) else np.zeros((0, D), bool)
        poly.append(np.flatnonzero(above.all(axis=0)) if len(langs) else np.zeros(0, np.int64))
        per_lang = [np.zeros(0, np.int64) for _ in range(L)]
        if len(langs) >= 2:
            n_above = above.sum(axis=0)
            for j, lang in enumerate(langs):
                per_lang[lang] = np.flatnonzero(above[j] & (n_above == 1))
        mono.append(per_lang)
    return PolyglotSets(poly, mono)


# ----------------------------------------------------------------------------------------------
# activation probability: LAPE and selectors


def kth_threshold(values: np.ndarray, rate: float) -> float:
    """The k-th smallest value with k = round(N * rate) clipped to [1, N] (as in the LAPE code)."""
    flat = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if not len(flat):
        return float("nan")
    k = min(max(int(round(len(flat) * rate)), 1), len(flat))
    return float(flat[k - 1])


def probability_entropy(P: np.ndarray) -> np.ndarray:
    """``P [K, ...]`` -> entropy over K of ``p = P / sum_k P`` (p = 0 where the sum is 0)."""
    tot = P.sum(axis=0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(tot > 0, P / np.where(tot > 0, tot, 1), 0.0)
        logp = np.where(p > 0, np.log(np.where(p > 0, p, 1)), 0.0)
    return -(p * logp).sum(axis=0)


@dataclass
class LapeResult:
    P: np.ndarray  # [K, n_layers, D] activation probability per language
    H: np.ndarray  # [n_layers, D]
    threshold: float
    kept: np.ndarray  # [m, 2] (layer position, neuron) of the kept neurons, lowest entropy first
    members: list[np.ndarray]  # per language: rows of ``kept`` that belong to it


def lape(P: np.ndarray, filter_rate: float = 0.95, top_rate: float = 0.01) -> LapeResult:
    """Language Activation Probability Entropy on ``P [K, n_layers, D]``.

    t = k-th smallest P (k = round(N * filter_rate)); neurons with P <= t in every language are
    dropped; of the rest, the round(top_rate * n_layers * D) with the lowest entropy are kept (ties:
    lower layer, then lower neuron first); each belongs to every language where P > t.
    """
    if not 0 < filter_rate <= 1:
        raise NeurostoreError(f"--filter-rate {filter_rate}: expected a share in (0, 1]")
    if not 0 < top_rate <= 1:
        raise NeurostoreError(f"--top-rate {top_rate}: expected a share in (0, 1]")
    K, NL, D = P.shape
    H = probability_entropy(P)
    t = kth_threshold(P, filter_rate)
    candidate = (P > t).any(axis=0)
    n_keep = int(round(top_rate * NL * D))
    layer_i, neuron_i = np.nonzero(candidate)
    h = H[layer_i, neuron_i]
    order = np.lexsort((neuron_i, layer_i, h))[:n_keep]
    kept = np.stack([layer_i[order], neuron_i[order]], axis=1) if len(order) else np.zeros((0, 2), np.int64)
    members = [np.flatnonzero(P[k, kept[:, 0], kept[:, 1]] > t) if len(kept) else np.zeros(0, np.int64) for k in range(K)]
    return LapeResult(P, H, t, kept, members)


SELECT_METHODS = ("frequency", "entropy", "magnitude", "contrast", "actprob90")
# actprob90 keeps the neurons above this percentile of a group's activation probabilities.
ACTPROB_PERCENTILE = 90.0


def actprob_thresholds(n: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Per group ``n [G]``, ``pos [G, n_layers, D]``: the 90th percentile of P(x > 0) over all
    neurons of the layers given, ``numpy.percentile``'s default (linear) definition; NaN for an
    empty group."""
    out = np.full(len(n), np.nan)
    for g in np.flatnonzero(n > 0):
        out[g] = float(np.percentile(pos[g] / float(n[g]), ACTPROB_PERCENTILE))
    return out


def select(
    method: str, n: np.ndarray, pos: np.ndarray, mean: np.ndarray, top: int | None,
    filter_rate: float = 0.95,
) -> list[list[tuple[int, int, float]]]:
    """Emotion-sensitive neuron selectors over groups ``n [G]``, ``pos/mean [G, n_layers, D]``
    (empty groups are given no neurons). Returns per group ``[(layer position, neuron, score)]``.

    frequency: P(act > 0 | g), highest first. entropy: LAPE over groups, candidates are the neurons
    with P[g] > t (t as in :func:`lape`), lowest entropy first (score = entropy). magnitude: mean in
    g minus mean over all other rows, highest first. contrast: P[g] minus the highest P among the
    other groups, highest first. actprob90 (Act-Prob-90p): P(act > 0 | g) of the neurons whose P
    lies strictly above the group's 90th percentile over all neurons given (:func:`actprob_thresholds`;
    a neuron equal to it is out), highest first. ``top=None`` keeps every ranked neuron; ties rank
    the lower layer, then the lower neuron, first.
    """
    if method not in SELECT_METHODS:
        raise NeurostoreError(f"--method {method}: expected one of {', '.join(SELECT_METHODS)}")
    G = len(n)
    have = n > 0
    nb = _nb(n, pos)
    with np.errstate(invalid="ignore", divide="ignore"):
        P = np.where(nb > 0, pos / np.where(nb > 0, nb, 1), 0.0)
    out: list[list[tuple[int, int, float]]] = []
    if method == "entropy":
        H = probability_entropy(P[have])
        t = kth_threshold(P[have], filter_rate)
    if method == "actprob90":
        t90 = actprob_thresholds(n, pos)
    for g in range(G):
        if not have[g]:
            out.append([])
            continue
        largest = True
        if method == "frequency":
            score = P[g]
        elif method == "entropy":
            score = np.where(P[g] > t, H, np.nan)
            largest = False
        elif method == "actprob90":
            score = np.where(P[g] > t90[g], P[g], np.nan)
        elif method == "magnitude":
            rest_n = float(n.sum() - n[g])
            if rest_n <= 0:
                score = np.full(P[g].shape, np.nan)
            else:
                tot = (nb * mean).sum(axis=0)
                score = mean[g] - (tot - n[g] * mean[g]) / rest_n
        else:
            others = [h for h in range(G) if h != g and have[h]]
            score = P[g] - P[others].max(axis=0) if others else np.full(P[g].shape, np.nan)
        flat = top_k(score.ravel(), top, largest=largest)
        D = score.shape[-1]
        out.append([(i // D, i % D, v) for i, v in flat])
    return out
