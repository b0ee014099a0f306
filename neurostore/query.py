"""The query API: plain functions on an opened store (``neurostore.open(paths)``).

Every function takes the same selection keywords and runs (at most) one out-of-core pass through
:func:`neurostore.moments.group_moments`, whose result is cached in the store::

    site      "resid" | "mlp" (whatever the store holds)
    layer     a model layer number (negative counts from the last stored layer)
    rows      "tokens" or a pooling ("first" | "mean" | "last"); default "mean" when stored
    by        the grouping column ("label", "pred", any stored categorical)
    lang, label   lists of names to keep; where  {column: [names]} on any stored categorical
    token_kind    token rows of these kinds only (text, special, audio), given as
              ``where={"token_kind": [...]}`` (so every function takes it); None/absent = all rows
    zscore    standardise each neuron within each language first (default True)
    scheduler None (local threads), a ``distributed.Client`` or a scheduler address
    workers   local threads (default: CPU count)

Results are small dataclasses with ``to_json()`` giving the documented JSON objects. Definitions:
``docs/query.md``. Neuron ids are 0-based indices along the width axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import analysis as an
from . import chunks as ch
from . import moments as mo
from .errors import NeurostoreError
from .store import TOKEN_KINDS, Store, _ranges


# ----------------------------------------------------------------------------------------------
# selections


def default_rows(store: Store) -> str:
    pools = store.meta["pool"]
    if "mean" in pools:
        return "mean"
    if pools:
        return pools[0]
    return "tokens"


def check_site(store: Store, site: str) -> None:
    if site not in store.sites:
        raise NeurostoreError(f"--site {site}: not in the store (stored: {', '.join(store.sites)})")


def resolve_layer(store: Store, site: str, layer: int | None, option: str = "--layer") -> int:
    """A model layer number of ``site`` (None = the last stored layer; negatives count back)."""
    check_site(store, site)
    layers = store.site(site)["layers"]
    if layer is None:
        return layers[-1]
    if layer < 0 and -len(layers) <= layer:
        return layers[layer]
    if layer not in layers:
        raise NeurostoreError(f"{option} {layer}: site {site!r} has layers {_ranges(layers)}")
    return layer


def resolve_layers(store: Store, site: str, layers: Sequence[int] | int | None) -> list[int]:
    check_site(store, site)
    if layers is None:
        return list(store.site(site)["layers"])
    if isinstance(layers, int):
        layers = [layers]
    return [resolve_layer(store, site, x) for x in layers]


def selection(
    store: Store, site: str, layers: Sequence[int] | int | None = None, *, rows: str | None = None,
    by: str | None = "label", lang: Sequence[str] | None = None, label: Sequence[str] | None = None,
    where: dict[str, Sequence[str]] | None = None, token_kind: Sequence[str] | None = None,
) -> mo.Selection:
    """Check the options against the store and build a :class:`~neurostore.moments.Selection`.

    ``token_kind`` (or ``where["token_kind"]``, the way the query functions pass it on) keeps
    token rows of these kinds only."""
    check_site(store, site)
    rows = rows or default_rows(store)
    if rows == "tokens":
        if not store.meta["tokens"]:
            raise NeurostoreError("--tokens: the store holds pooled vectors only (extracted with --no-tokens)")
    elif rows not in store.meta["pool"]:
        stored = ", ".join(store.meta["pool"]) or "none"
        raise NeurostoreError(f"--pool {rows}: pooling not in the store (stored: {stored})")
    where = dict(where or {})
    kinds = token_kinds(store, rows, [*(token_kind or []), *(where.pop("token_kind", None) or [])])
    filters: dict[str, list[str]] = {}
    if lang:
        filters["lang"] = list(lang)
    if label:
        filters["label"] = list(label)
    for column, values in (where or {}).items():
        filters.setdefault(column, []).extend(values)
    sel = mo.Selection(
        site=site, layers=tuple(resolve_layers(store, site, layers)), rows=rows, by=by,
        filters=tuple(sorted((c, tuple(sorted(set(v)))) for c, v in filters.items())), token_kind=kinds,
    )
    mo.group_codes(store, sel)  # validates the grouping and filter columns now, with clear errors
    return sel


def token_kinds(store: Store, rows: str, kinds: Sequence[str]) -> tuple[str, ...] | None:
    """The token kinds kept (in ``TOKEN_KINDS`` order), checked against the rows and the store;
    None where every row is kept (no filter: the default, and the same cache entries)."""
    if not kinds:
        return None
    for kind in kinds:
        if kind not in TOKEN_KINDS:
            raise NeurostoreError(f"--token-kind {kind}: not a token kind (kinds: {', '.join(TOKEN_KINDS)})")
    if rows != "tokens":
        raise NeurostoreError(
            f"--token-kind/--skip-special: they filter token rows, and these rows are pooled sentences (--pool {rows}); add --tokens or drop the option"
        )
    kept = tuple(k for k in TOKEN_KINDS if k in kinds)
    if len(kept) == len(TOKEN_KINDS):
        return None
    for path, meta in zip(store.paths, store.metas):
        if "token_kind" not in (meta.get("features") or []):
            raise NeurostoreError(
                f"{path}: the store does not record token kinds (tokens/kind; written by neurostore {meta.get('neurostore_version', '?')});"
                " extract it again with this version to use --token-kind or --skip-special"
            )
    return kept


def _moments(store: Store, sel: mo.Selection, quantiles: bool = False, **run: Any) -> mo.GroupMoments:
    return mo.group_moments(store, sel, quantiles=quantiles, **run)


def _run_opts(scheduler: Any, workers: int | None, cache: bool) -> dict:
    return {"scheduler": scheduler, "workers": workers, "cache": cache}


def _values(mom: mo.GroupMoments, zscore: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n [L, E], mean [L, E, layers, D], m2) of z (or of the raw activations)."""
    if zscore:
        zmean, zm2 = an.zscore_moments(mom.count, mom.mean, mom.m2)
        return mom.count, zmean, zm2
    return mom.count, mom.mean, mom.m2


def _clean(values: Any) -> Any:
    """NaN / inf become None so the JSON is strict."""
    arr = np.asarray(values, dtype=np.float64)
    return [None if not np.isfinite(v) else float(v) for v in arr.ravel()] if arr.ndim == 1 else [_clean(r) for r in arr]


# ----------------------------------------------------------------------------------------------
# group moments as a table


@dataclass
class GroupStats:
    """The raw group table of one layer: arrays ``[langs, groups, D]`` (quantiles may be None)."""

    site: str
    layer: int
    rows: str
    by: str | None
    langs: list[str]
    groups: list[str]
    count: np.ndarray  # [langs, groups]
    mean: np.ndarray
    std: np.ndarray
    p_active: np.ndarray
    p10: np.ndarray | None = None
    p50: np.ndarray | None = None
    p90: np.ndarray | None = None

    COLUMNS = ("lang", "group", "neuron", "count", "mean", "std", "p_active", "p10", "p50", "p90")

    def table(self, neurons: Sequence[int] | None = None) -> list[list[Any]]:
        D = self.mean.shape[-1]
        picks = range(D) if neurons is None else neurons
        out = []
        for li, lang in enumerate(self.langs):
            for gi, grp in enumerate(self.groups):
                for d in picks:
                    q = [None if self.p10 is None else float(a[li, gi, d]) for a in (self.p10, self.p50, self.p90)] if self.p10 is not None else [None] * 3
                    out.append([lang, grp, int(d), int(self.count[li, gi]), float(self.mean[li, gi, d]), float(self.std[li, gi, d]), float(self.p_active[li, gi, d]), *q])
        return out

    def to_json(self) -> dict:
        out = {
            "site": self.site, "layer": self.layer, "rows": self.rows, "by": self.by, "langs": self.langs,
            "groups": self.groups, "count": self.count.tolist(),
        }
        for key in ("mean", "std", "p_active", "p10", "p50", "p90"):
            value = getattr(self, key)
            out[key] = None if value is None else [[_clean(v) for v in per_lang] for per_lang in value]
        return out


def _group_stats(mom: mo.GroupMoments, layer: int, langs: list[str], groups: list[str], count, mean, m2, pos, vmin, vmax, hist) -> GroupStats:
    nb = count[..., None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(nb > 0, mean, np.nan)
        std = np.where(nb > 0, np.sqrt(m2 / np.where(nb > 0, nb, 1)), np.nan)
        pa = np.where(nb > 0, pos / np.where(nb > 0, nb, 1), np.nan)
    qs = an.quantiles(hist, vmin, vmax, (0.1, 0.5, 0.9)) if hist is not None else [None] * 3
    sel = mom.selection
    return GroupStats(sel.site, layer, sel.rows, sel.by, langs, groups, count, m, std, pa, *qs)


def stats(
    store: Store, site: str = "resid", layer: int | None = None, *, by: str | None = "label",
    quantiles: bool = True, rows: str | None = None, lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True,
) -> GroupStats:
    """Per (language, group) and neuron: count, mean, std (ddof 0), P(act > 0), approximate
    P10/P50/P90 of the raw activations of one layer."""
    layer = resolve_layer(store, site, layer)
    sel = selection(store, site, layer, rows=rows, by=by, lang=lang, label=label, where=where)
    mom = _moments(store, sel, quantiles=quantiles, **_run_opts(scheduler, workers, cache))
    i = 0
    return _group_stats(
        mom, layer, mom.langs, mom.groups, mom.count, mom.mean[:, :, i], mom.m2[:, :, i], mom.pos[:, :, i],
        mom.vmin[:, :, i], mom.vmax[:, :, i], None if mom.hist is None else mom.hist[:, :, i],
    )


STATS = ("mean", "std", "p_active", "p10", "p50", "p90")


def group_values(
    store: Store, site: str, layer: int, by: str, group: str, stat: str = "mean", *,
    rows: str | None = None, scheduler: Any = None, workers: int | None = None, cache: bool = True,
) -> np.ndarray:
    """Per-neuron ``stat`` of the raw activations of one group, ``np.ndarray[D]`` (float64).

    ``by`` is the grouping column ("label", "pred", ...) or "lang"; ``group`` is one of its names
    (a label name is pooled over every language; with ``by="lang"`` a language is pooled over all
    its rows). ``stat``: mean, std, p_active (share > 0), p10, p50, p90 (approximate, see
    :mod:`neurostore.moments`). Read from the cached group statistics when present; this is what
    ``neurostore intervene`` uses to set neurons to a group's mean / P10 / P90. NaN if the group
    has no rows.
    """
    if stat not in STATS:
        raise NeurostoreError(f"stat {stat!r}: expected one of {', '.join(STATS)}")
    layer = resolve_layer(store, site, layer)
    quant = stat in ("p10", "p50", "p90")
    sel = selection(store, site, layer, rows=rows, by=None if by == "lang" else by)
    mom = _moments(store, sel, quantiles=quant, **_run_opts(scheduler, workers, cache))
    names = mom.langs if by == "lang" else mom.groups
    if group not in names:
        raise NeurostoreError(f"group {group!r}: column {by!r} has {', '.join(names)}")
    j = names.index(group)
    take = (lambda a: a[j]) if by == "lang" else (lambda a: a[:, j])
    n = take(mom.count)  # [k] finest groups to merge
    mean, m2 = take(mom.mean)[:, 0], take(mom.m2)[:, 0]
    n_tot, mu, m2_tot = an.combine(n, mean, m2, axis=0)
    if n_tot == 0:
        return np.full(mom.width, np.nan)
    if stat == "mean":
        return mu
    if stat == "std":
        return np.sqrt(m2_tot / n_tot)
    if stat == "p_active":
        return take(mom.pos)[:, 0].sum(axis=0) / n_tot
    hist = take(mom.hist)[:, 0].astype(np.uint64).sum(axis=0)
    vmin, vmax = take(mom.vmin)[:, 0].min(axis=0), take(mom.vmax)[:, 0].max(axis=0)
    return an.quantiles(hist, vmin, vmax, ({"p10": 0.1, "p50": 0.5, "p90": 0.9}[stat],))[0]


# ----------------------------------------------------------------------------------------------
# variance


@dataclass
class VarianceResult:
    """``variance``/``f``: ``[D]`` (``--by``), or ``[G, D]`` with ``groups`` (``--per lang``:
    one row per language; ``--within``: one row per group, ``f`` None). ``top``: ``[(neuron,
    value)]`` per row (a single list for ``[D]``)."""

    site: str
    layer: int
    by: str
    mode: str  # "by" | "per" | "within"
    zscore: bool
    variance: np.ndarray
    f: np.ndarray | None
    top: Any
    groups: list[str] | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"site": self.site, "layer": self.layer, "by": self.by, "mode": self.mode, "zscore": self.zscore}
        if self.groups is None:
            out.update(variance=_clean(self.variance), f=_clean(self.f), top=[[n, v] for n, v in self.top])
        else:
            out["groups"] = self.groups
            out["variance"] = {g: _clean(self.variance[i]) for i, g in enumerate(self.groups)}
            out["f"] = None if self.f is None else {g: _clean(self.f[i]) for i, g in enumerate(self.groups)}
            out["top"] = {g: [[n, v] for n, v in self.top[i]] for i, g in enumerate(self.groups)}
        return out


def variance(
    store: Store, site: str = "resid", layer: int | None = None, *, by: str = "label",
    per: str | None = None, within: bool = False, zscore: bool = True, top: int | None = 20,
    rows: str | None = None, lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True,
) -> VarianceResult:
    """Per neuron, the population variance over ``by`` groups of the group means of z (rows of all
    languages pooled) and the one-way ANOVA F; ``per="lang"``: the same within each language;
    ``within=True``: per group, the variance of z over that group's rows. ``top`` ranks neurons by
    variance (highest first)."""
    if per not in (None, "lang"):
        raise NeurostoreError(f"--per {per}: only --per lang is supported")
    layer = resolve_layer(store, site, layer)
    sel = selection(store, site, layer, rows=rows, by=by, lang=lang, label=label, where=where)
    mom = _moments(store, sel, **_run_opts(scheduler, workers, cache))
    n, mean, m2 = _values(mom, zscore)
    mean, m2 = mean[:, :, 0], m2[:, :, 0]  # [L, E, D]
    if within:
        if per == "lang":
            rows_, names = [], []
            for li, lg in enumerate(mom.langs):
                for ei, g in enumerate(mom.groups):
                    rows_.append(an.within_variance(n[li, ei], m2[li, ei]))
                    names.append(f"{lg}/{g}")
            var = np.stack(rows_)
        else:
            n_e, _, m2_e = an.combine(n, mean, m2, axis=0)
            var, names = an.within_variance(n_e, m2_e), list(mom.groups)
        tops = [an.top_k(v, top) for v in var]
        return VarianceResult(site, layer, by, "within", zscore, var, None, tops, names)
    if per == "lang":
        pairs = [an.between_variance(n[li], mean[li], m2[li]) for li in range(len(mom.langs))]
        var = np.stack([p[0] for p in pairs])
        f = np.stack([p[1] for p in pairs])
        return VarianceResult(site, layer, by, "per", zscore, var, f, [an.top_k(v, top) for v in var], list(mom.langs))
    n_e, mean_e, m2_e = an.combine(n, mean, m2, axis=0)
    var, f = an.between_variance(n_e, mean_e, m2_e)
    return VarianceResult(site, layer, by, "by", zscore, var, f, an.top_k(var, top))


# ----------------------------------------------------------------------------------------------
# M[l, e, d] and what derives from it


@dataclass
class GroupMeans:
    """``M [langs, groups, D]``: mean of z (or raw) per language and group; NaN for empty groups."""

    site: str
    layer: int
    by: str
    zscore: bool
    langs: list[str]
    groups: list[str]
    count: np.ndarray
    M: np.ndarray

    def top_neurons(self, group: str, k: int) -> dict[str, list[int]]:
        """Per language, the ``k`` neurons with the highest ``M`` for ``group`` (highest first)."""
        if group not in self.groups:
            raise NeurostoreError(f"--label {group}: the store has {', '.join(self.groups)}")
        e = self.groups.index(group)
        return {l: [n for n, _ in an.top_k(self.M[i, e], k)] for i, l in enumerate(self.langs) if self.count[i, e] > 0}

    def to_json(self) -> dict:
        return {
            "site": self.site, "layer": self.layer, "by": self.by, "zscore": self.zscore, "langs": self.langs,
            "groups": self.groups, "count": self.count.tolist(), "M": [[_clean(v) for v in per] for per in self.M],
        }


def group_means(
    store: Store, site: str = "resid", layer: int | None = None, *, by: str = "label", zscore: bool = True,
    rows: str | None = None, lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True,
) -> GroupMeans:
    """``M[l, e, d]``: the mean of z over the rows of language l and group e."""
    layer = resolve_layer(store, site, layer)
    sel = selection(store, site, layer, rows=rows, by=by, lang=lang, label=label, where=where)
    mom = _moments(store, sel, **_run_opts(scheduler, workers, cache))
    n, mean, _ = _values(mom, zscore)
    return GroupMeans(site, layer, by, zscore, list(mom.langs), list(mom.groups), n, an.group_means(n, mean[:, :, 0]))


@dataclass
class Correlation:
    site: str
    layer: int
    method: str
    across: list[str]
    groups: list[str]
    matrices: np.ndarray  # [groups, L, L]
    mean: np.ndarray  # [L, L]

    def to_json(self) -> dict:
        return {
            "site": self.site, "layer": self.layer, "method": self.method, "across": self.across, "groups": self.groups,
            "matrices": {g: _clean(self.matrices[i]) for i, g in enumerate(self.groups)}, "mean": _clean(self.mean),
        }


def correlate(
    store: Store, site: str = "resid", layer: int | None = None, *, by: str = "label", across: str = "lang",
    method: str = "spearman", zscore: bool = True, rows: str | None = None, lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True,
) -> Correlation:
    """For each group e and languages a, b: Spearman's rho (or cosine) between ``M[a, e, :]`` and
    ``M[b, e, :]`` over the neurons; plus the mean matrix over groups (NaN entries skipped)."""
    if across != "lang":
        raise NeurostoreError(f"--across {across}: only --across lang is supported")
    if method not in ("spearman", "cosine"):
        raise NeurostoreError(f"--method {method}: expected spearman or cosine")
    gm = group_means(store, site, layer, by=by, zscore=zscore, rows=rows, lang=lang, label=label, where=where,
                     scheduler=scheduler, workers=workers, cache=cache)
    mats = an.correlation_matrices(gm.M, method)
    return Correlation(site, gm.layer, method, gm.langs, gm.groups, mats, an.nanmean_matrices(mats))


@dataclass
class Polyglot:
    site: str
    layer: int
    threshold: float
    langs: list[str]
    groups: list[str]
    polyglot: dict[str, list[int]]
    monolingual: dict[str, dict[str, list[int]]]
    sensitive: list[int]
    shares: dict[str, dict[str, float]]

    def counts(self) -> dict[str, dict[str, int]]:
        return {g: {"polyglot": len(self.polyglot[g]), **{l: len(v) for l, v in self.monolingual[g].items()}} for g in self.groups}

    def to_json(self) -> dict:
        return {
            "site": self.site, "layer": self.layer, "threshold": self.threshold, "polyglot": self.polyglot,
            "monolingual": self.monolingual, "counts": self.counts(),
            "sensitive": {"neurons": self.sensitive, "shares": self.shares},
        }


def polyglot(
    store: Store, site: str = "resid", layer: int | None = None, *, threshold: float = 0.5, by: str = "label",
    sensitive_top: int = 100, zscore: bool = True, rows: str | None = None, lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True,
) -> Polyglot:
    """Polyglot neurons (``M > threshold`` in every language with rows of the group) and
    monolingual ones (above it in one language only), per group; and among the ``sensitive_top``
    highest-variance neurons, the share that is polyglot / monolingual (any language) / other."""
    gm = group_means(store, site, layer, by=by, zscore=zscore, rows=rows, lang=lang, label=label, where=where,
                     scheduler=scheduler, workers=workers, cache=cache)
    sets = an.polyglot_sets(gm.M, gm.count, threshold)
    var = variance(store, site, gm.layer, by=by, zscore=zscore, top=sensitive_top, rows=rows, lang=lang, label=label,
                   where=where, scheduler=scheduler, workers=workers, cache=cache)
    sensitive = [n for n, _ in var.top]
    poly = {g: sets.polyglot[e].tolist() for e, g in enumerate(gm.groups)}
    mono = {g: {l: sets.monolingual[e][li].tolist() for li, l in enumerate(gm.langs)} for e, g in enumerate(gm.groups)}
    shares = {}
    S = set(sensitive)
    for e, g in enumerate(gm.groups):
        p = S & set(poly[g])
        m = S & set().union(*[set(v) for v in mono[g].values()]) - p
        k = max(len(S), 1)
        shares[g] = {"polyglot": len(p) / k, "monolingual": len(m) / k, "other": (len(S) - len(p) - len(m)) / k}
    return Polyglot(site, gm.layer, threshold, gm.langs, gm.groups, poly, mono, sensitive, shares)


# ----------------------------------------------------------------------------------------------
# activation probability: LAPE and selectors


@dataclass
class Lape:
    site: str
    layers: list[int]
    langs: list[str]
    threshold: float
    filter_rate: float
    top_rate: float
    neurons: dict[str, list[tuple[int, int]]]  # lang -> [(layer, neuron)]
    P: np.ndarray = field(repr=False)  # [langs, layers, D]
    H: np.ndarray = field(repr=False)

    def per_layer(self) -> dict[str, list[int]]:
        """Number of a language's neurons in each layer (in ``layers`` order)."""
        return {l: [sum(1 for ly, _ in v if ly == layer) for layer in self.layers] for l, v in self.neurons.items()}

    def to_json(self) -> dict:
        return {
            "site": self.site, "layer": self.layers, "layers": self.layers, "threshold": self.threshold,
            "filter_rate": self.filter_rate, "top_rate": self.top_rate,
            "neurons": {l: [[a, b] for a, b in v] for l, v in self.neurons.items()},
        }


def lape(
    store: Store, site: str = "mlp", layers: Sequence[int] | None = None, *, filter_rate: float = 0.95,
    top_rate: float = 0.01, rows: str = "tokens", lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True,
) -> Lape:
    """Language-specific neurons by LAPE (token rows, all stored layers of ``site`` by default)."""
    sel = selection(store, site, layers, rows=rows, by=None, lang=lang, label=label, where=where)
    mom = _moments(store, sel, **_run_opts(scheduler, workers, cache))
    have = mom.count[:, 0] > 0
    names = [l for l, h in zip(mom.langs, have) if h]
    if not names:
        raise NeurostoreError("lape: no rows selected")
    P = mom.pos[have, 0] / mom.count[have, 0][:, None, None]
    res = an.lape(P, filter_rate, top_rate)
    out = {l: [(mom.layers[int(res.kept[i, 0])], int(res.kept[i, 1])) for i in res.members[k]] for k, l in enumerate(names)}
    return Lape(site, list(mom.layers), names, res.threshold, filter_rate, top_rate, out, P, res.H)


@dataclass
class Selected:
    site: str
    layers: list[int]
    by: str
    method: str
    selected: dict[str, list[tuple[int, int, float]]]

    def to_json(self) -> dict:
        return {
            "site": self.site, "layer": self.layers if len(self.layers) > 1 else self.layers[0], "layers": self.layers,
            "by": self.by, "method": self.method,
            "selected": {g: [[a, b, c] for a, b, c in v] for g, v in self.selected.items()},
        }


def select(
    store: Store, site: str = "resid", layers: Sequence[int] | int | None = None, *, by: str = "label",
    method: str = "frequency", top: int = 20, zscore: bool = True, filter_rate: float = 0.95,
    rows: str | None = None, lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True,
) -> Selected:
    """Group-sensitive neurons over all stored layers of ``site`` (or ``layers``): per group of
    ``by`` (pooled over languages), ``top`` triples (layer, neuron, score). frequency, entropy and
    contrast use P(activation > 0) of the raw activations; magnitude uses z (or raw with
    ``zscore=False``)."""
    if method not in an.SELECT_METHODS:
        raise NeurostoreError(f"--method {method}: expected one of {', '.join(an.SELECT_METHODS)}")
    sel = selection(store, site, layers, rows=rows, by=None if by == "lang" else by, lang=lang, label=label, where=where)
    mom = _moments(store, sel, **_run_opts(scheduler, workers, cache))
    n, mean, m2 = _values(mom, zscore)
    axis = 1 if by == "lang" else 0  # merge the other key
    n_g, mean_g, _ = an.combine(n, mean, m2, axis=axis)
    pos_g = mom.pos.sum(axis=axis)
    names = mom.langs if by == "lang" else mom.groups
    picked = an.select(method, n_g, pos_g, mean_g, top, filter_rate)
    out = {g: [(mom.layers[a], b, c) for a, b, c in picked[i]] for i, g in enumerate(names)}
    return Selected(site, list(mom.layers), by, method, out)


# ----------------------------------------------------------------------------------------------
# top examples


# Characters of the sentence shown on each side of a token.
CONTEXT_CHARS = 40


@dataclass
class Example:
    row: int
    doc: int
    value: float
    lang: str
    label: str
    text: str
    position: int | None = None  # token position inside the sentence (token rows)
    token_id: int | None = None
    kind: str | None = None  # text, special or audio (stores that record token kinds)
    token: str | None = None  # the token as written in the sentence, or a special token's string
    left: str | None = None  # up to CONTEXT_CHARS characters before the token ("…" where cut)
    right: str | None = None  # likewise after it

    def context(self) -> str:
        """``left [token] right`` for a token whose place is known, else the sentence."""
        if self.token is None or self.left is None:
            return self.text
        return f"{self.left}[{self.token}]{self.right}"


def top_examples(
    store: Store, site: str = "resid", layer: int | None = None, neuron: int = 0, *, k: int = 20,
    rows: str | None = None, lang=None, label=None, where=None, token_kind: Sequence[str] | None = None,
    scheduler: Any = None, workers: int | None = None,
) -> list[Example]:
    """The ``k`` rows (tokens by default when stored, else sentences) where one neuron is highest,
    with their sentence, and for tokens the token and its neighbours in the sentence (from the
    character offsets stored at extraction: no tokenizer is loaded). Reads that neuron's layer
    once (one pass over its chunks)."""
    layer = resolve_layer(store, site, layer)
    width = store.site(site)["width"]
    if not 0 <= neuron < width:
        raise NeurostoreError(f"--neuron {neuron}: site {site!r} has neurons 0-{width - 1}")
    if rows is None:
        rows = "tokens" if store.meta["tokens"] else default_rows(store)
    sel = selection(store, site, layer, rows=rows, by=None, lang=lang, label=label, where=where, token_kind=token_kind)
    keep_docs = mo.group_codes(store, sel)[0] >= 0
    found = mo.top_rows(store, sel, neuron, k, keep_docs, scheduler=scheduler, workers=workers)
    label_codes, lang_codes = store.doc_column("label"), store.doc_column("lang")
    labels, langs = store.categories("label"), store.categories("lang")
    starts = store.doc_column("token_start") if rows == "tokens" else None
    docs = [int(np.searchsorted(starts, row, side="right") - 1) if rows == "tokens" else int(row) for row, _ in found]
    texts = _pick_rows(store, "docs/text", "committed_docs", docs)  # only the k rows, never a whole column
    out = []
    for i, ((row, value), doc) in enumerate(zip(found, docs)):
        out.append(Example(
            int(row), doc, float(value),
            langs[lang_codes[doc]] if lang_codes[doc] >= 0 else mo.MISSING,
            labels[label_codes[doc]] if label_codes[doc] >= 0 else mo.MISSING,
            str(texts[i]),
        ))
    if rows == "tokens":
        _place_tokens(store, out, [int(row - starts[doc]) for (row, _), doc in zip(found, docs)])
    return out


def _place_tokens(store: Store, examples: list[Example], positions: list[int]) -> None:
    """Fill position, token id, kind, token and context of token-row examples from the stored
    token tables (kinds and offsets where the store records them)."""
    rows = [e.row for e in examples]
    ids = _pick_rows(store, "tokens/token_id", "committed_tokens", rows)
    has = [set(m.get("features") or []) for m in store.metas]
    kinds = _pick_rows(store, "tokens/kind", "committed_tokens", rows) if all("token_kind" in f for f in has) else None
    spans = _pick_rows(store, "tokens/offsets", "committed_tokens", rows) if all("token_offsets" in f for f in has) else None
    names, special = list(TOKEN_KINDS), {}
    if kinds is not None:
        attrs = store.groups[0]["tokens/kind"].attrs
        names, special = list(attrs.get("categories", TOKEN_KINDS)), dict(attrs.get("special_tokens") or {})
    for i, e in enumerate(examples):
        e.position, e.token_id = positions[i], int(ids[i])
        e.kind = names[int(kinds[i])] if kinds is not None else None
        a, b = (int(x) for x in spans[i]) if spans is not None else (-1, -1)
        if not 0 <= a <= b <= len(e.text):  # no offsets (a slow tokenizer, an older store): name specials only
            e.token = special.get(str(e.token_id)) if e.kind == "special" else None
            continue
        if e.kind == "special" and a == b:
            e.token = special.get(str(e.token_id), f"<special {e.token_id}>")
        else:
            piece = e.text[a:b]
            if piece.strip():  # byte-level and sentencepiece tokens carry their leading space
                a += len(piece) - len(piece.lstrip())
                b -= len(piece) - len(piece.rstrip())
            e.token = e.text[a:b]
        lo, hi = max(0, a - CONTEXT_CHARS), min(len(e.text), b + CONTEXT_CHARS)
        e.left = ("…" if lo > 0 else "") + e.text[lo:a].replace("\n", " ")
        e.right = e.text[b:hi].replace("\n", " ") + ("…" if hi < len(e.text) else "")


def _pick_rows(store: Store, name: str, rows_key: str, indices: Sequence[int]) -> list:
    """Values of a 1-D table at global row ``indices`` (over all parts), read row by row."""
    bounds = np.cumsum([0] + [m[rows_key] for m in store.metas])
    out = []
    for index in indices:
        p = int(np.searchsorted(bounds, index, side="right") - 1)
        row = int(index - bounds[p])
        out.append(ch.read_zarr(store.groups[p][name], row, row, row + 1))
    return out


# ----------------------------------------------------------------------------------------------
# neuron sets for interventions


def neuron_set_from_json(obj: dict, group: str | None = None) -> tuple[str, dict[int, list[int]]]:
    """Read the neurons of any query JSON output as ``(site, {layer: [neuron, ...]})``.

    - ``variance``: its ``top`` (with ``--per``/``--within``, ``group`` picks the language/group);
    - ``polyglot``: ``group="joy"`` -> polyglot neurons of joy; ``group="joy/en"`` -> monolingual
      neurons of joy in en; no group -> the union of all polyglot neurons;
    - ``lape``: ``group`` = a language (no group -> the union over languages);
    - ``select``: ``group`` = a group name (no group -> the union).
    Raises :class:`NeurostoreError` if the object is not one of these or the group is unknown.
    """
    from .neurons import neuron_set_from_json as parse

    neurons = parse(obj, group, source="the query JSON")
    return neurons.site, neurons.layers
