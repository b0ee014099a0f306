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
    cache     read and write the store's statistics cache (default True)

Or resolved once and passed on: ``plan=neurostore.plan.resolve(store, site, layer, rows=..., by=...,
lang=..., label=..., where=..., token_kind=...)`` replaces the selection keywords (its ``by`` must be
the analysis's), ``run=RunOptions(scheduler, workers, cache)`` the last three.

Results are small dataclasses (:mod:`neurostore.results`) with ``to_json()`` giving the documented JSON objects. Definitions:
``docs/query.md``. Neuron ids are 0-based indices along the width axis.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from . import analysis as an
from . import chunks as ch
from . import moments as mo
from . import sketch as sk
from . import statsonly
from .errors import NeurostoreError
from .provenance import provenance
from .plan import ALL, MISSING, Plan, RunOptions, Selection, check_site, default_rows, resolve
from .results import (
    CONTEXT_CHARS,
    Correlation,
    Example,
    GroupMeans,
    GroupStats,
    Lape,
    Polyglot,
    SelectedNeurons,
    TopExamples,
    VarianceResult,
    check_count,
)
from .store import TOKEN_KINDS, Store


# ----------------------------------------------------------------------------------------------
# the plan: options resolved once (neurostore.plan), then read by the pass, the cache and the checks


def selection(
    store: Store, site: str, layers: Sequence[int] | int | None = None, *, rows: str | None = None,
    by: str | None = "label", lang: Sequence[str] | None = None, label: Sequence[str] | None = None,
    where: dict[str, Sequence[str]] | None = None, token_kind: Sequence[str] | None = None,
) -> Selection:
    """The checked :class:`~neurostore.plan.Selection` of these options (see :func:`neurostore.plan.resolve`)."""
    return resolve(store, site, layers, rows=rows, by=by, lang=lang, label=label, where=where, token_kind=token_kind).selection


def _planned(store: Store, plan: Plan | None, site: str, layers: Any, *, by: str | None, single: bool = False, **keys: Any) -> Plan:
    """The plan a caller resolved (checked against what this analysis groups by), or the plan of
    these options. ``single``: one layer (None: the last stored) rather than a list (None: all)."""
    if plan is None:
        if single:
            check_site(store, site)
            layers = store.layer_number(site, layers)
        return resolve(store, site, layers, by=by, **keys)
    if plan.store is not store:
        raise NeurostoreError("plan: resolved for another store; resolve it with this store")
    if plan.by != by:
        raise NeurostoreError(f"plan: groups by {plan.by!r}, this analysis needs by={by!r}")
    return plan


def _opts(run: RunOptions | None, scheduler: Any, workers: int | None, cache: bool = True) -> RunOptions:
    return run or RunOptions(scheduler, workers, cache)


def _values(mom: mo.GroupMoments, zscore: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n [L, E], mean [L, E, layers, D], m2) of z (or of the raw activations)."""
    if zscore:
        zmean, zm2 = an.zscore_moments(mom.count, mom.mean, mom.m2)
        return mom.count, zmean, zm2
    return mom.count, mom.mean, mom.m2


# ----------------------------------------------------------------------------------------------
# refusals: an analysis that would print numbers meaning nothing raises instead (docs/query.md)


def _noun(by: str | None) -> str:
    return {"label": "labels", "lang": "languages"}.get(by or "", f"values of {by!r}" if by else "groups")


def _one(by: str | None) -> str:
    return {"label": "label", "lang": "language"}.get(by or "", f"{by} value" if by else "group")


def _no_lang_zscore(by: str | None, zscore: bool, what: str) -> None:
    """z-scoring within language makes every language's mean z 0 and variance 1 by construction."""
    if by == "lang" and zscore:
        raise NeurostoreError(
            f"{what} --by lang with z-scoring within language: every language's mean z is 0 (and its "
            "variance 1) by construction; add --no-zscore, or group by another column (--by label)"
        )


def _require_column(store: Store, column: str, what: str) -> None:
    """Refuse when no sentence of the store has a value in ``column`` (e.g. the corpus column of the
    labels was not found at extraction, so every code is -1)."""
    if store.categories(column) and (store.doc_column(column) >= 0).any():
        return
    if column == "label":
        hint = "extract --label-col COLUMN records them (the corpus column holding the labels)"
    elif column == "lang":
        hint = "extract --lang-col COLUMN (a corpus column) or --lang CODE (per file) records them"
    else:
        hint = "group by another column (--by label)"
    raise NeurostoreError(f"{what}: the store has no {_noun(column)} (every sentence's {column} is missing); {hint}")


def _doc_counts(plan: Plan) -> tuple[np.ndarray, list[str], list[str]]:
    """Sentences per finest group ``[langs, groups]`` from the plan's sentence groups (no pass): a
    group without sentences has no rows, so the checks below can refuse before reading activations."""
    gid, langs, groups = plan.codes, plan.langs, plan.groups
    count = np.bincount(gid[gid >= 0], minlength=len(langs) * len(groups)).reshape(len(langs), len(groups))
    return count, langs, groups


def _usable(
    count: np.ndarray, langs: Sequence[str], groups: Sequence[str], *, what: str, by: str | None,
    filtered: bool, min_groups: int = 1, min_langs: int = 1, zscore: bool = False, per_lang: bool = False,
    group_langs: bool = False, alt: str = "", warn: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Which languages and groups of ``count [langs, groups]`` an analysis may use, or a refusal.

    ``min_groups`` / ``min_langs``: groups of ``by`` / languages with rows that must remain.
    ``zscore``: a language with rows of one group only is left out (z-scored within its language,
    that group's mean is 0 and its variance 1 by construction); ``per_lang``: the same for analyses
    per language over groups. ``group_langs``: a group with rows in one language only is left out
    (cross-lingual analyses). Returns (languages kept, groups kept, the warning lines).
    """
    have = np.asarray(count) > 0
    scope = "the selection" if filtered else "the store"
    widen = "widen --lang/--label/--where" if filtered else ""
    if not have.any():
        raise NeurostoreError(f"{what}: no rows selected" + (f" ({widen})" if filtered else f" (no row has a {_one(by)})"))

    def few(kind: str, names: Sequence[str], ok: np.ndarray, need: int) -> NeurostoreError:
        got = [n for n, o in zip(names, ok) if o]
        fix = " or ".join(x for x in (f"keep more {kind} ({widen})" if filtered else "", alt) if x) or f"extract a corpus with more {kind}"
        listed = f" ({', '.join(got)})" if got else ""
        if dropped:
            listed += f" after leaving out {'; '.join(dropped)}"
            fix += " or add --no-zscore" if zscore else ""
        return NeurostoreError(f"{what} needs at least {need} {kind} with rows; {scope} has {len(got)}{listed}: {fix}")

    notes: list[str] = []
    dropped: list[str] = []  # the same, shorter, for a refusal
    lang_ok, group_ok = have.any(axis=1), have.any(axis=0)
    if group_ok.sum() < min_groups:
        raise few(_noun(by), groups, group_ok, min_groups)
    if zscore or per_lang:
        thin = lang_ok & (have.sum(axis=1) < 2)
        if thin.any():
            names = ", ".join(l for l, t in zip(langs, thin) if t)
            why = (f"rows of one {_one(by)} only, whose mean z is 0 by construction" if zscore
                   else f"rows of one {_one(by)} only, nothing varies over {_noun(by)} there")
            notes.append(f"left out language {names}: {why}" + ("; --no-zscore keeps such languages" if zscore else ""))
            dropped.append(f"{names} ({why})")
            lang_ok = lang_ok & ~thin
            if not lang_ok.any():
                tail = ("; z-scored within language such a language's one mean is 0 by construction: keep more "
                        f"{_noun(by)} or add --no-zscore") if zscore else f": keep more {_noun(by)}"
                raise NeurostoreError(f"{what}: no language has rows of 2 or more {_noun(by)}{tail}")
            have = have & lang_ok[:, None]
            group_ok = have.any(axis=0)
            if group_ok.sum() < min_groups:
                raise few(_noun(by), groups, group_ok, min_groups)
    if lang_ok.sum() < min_langs:
        raise few("languages", langs, lang_ok, min_langs)
    if group_langs:
        thin = group_ok & (have.sum(axis=0) < 2)
        if thin.any():
            notes.append(f"left out {_one(by)} {', '.join(g for g, t in zip(groups, thin) if t)}: rows in one language only, nothing to compare")
            group_ok = group_ok & ~thin
            if not group_ok.any():
                raise NeurostoreError(f"{what}: no {_one(by)} has rows in 2 or more languages: keep more languages")
    if warn:
        for note in notes:
            warnings.warn(note, stacklevel=3)
    return lang_ok, group_ok, notes


def _check(plan: Plan, mom: mo.GroupMoments | None = None, **need: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """:func:`_usable` on the sentence counts before the pass (``mom`` None: refusals only) or on
    the pass's row counts."""
    if mom is None:
        return _usable(*_doc_counts(plan), filtered=plan.filtered, warn=False, **need)
    return _usable(mom.count, mom.langs, mom.groups, filtered=plan.filtered, **need)


def _keep_langs(lang_ok: np.ndarray, n: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Left-out languages become empty groups (count 0, zeros), which every analysis skips."""
    keep = lang_ok[:, None]
    out = [np.where(keep, n, 0)]
    for a in arrays:
        out.append(np.where(keep.reshape(keep.shape + (1,) * (a.ndim - 2)), a, 0))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# group moments as a table


def _group_stats(mom: mo.GroupMoments, layer: int, langs: list[str], groups: list[str], count, mean, m2, pos, vmin, vmax, hist) -> GroupStats:
    nb = count[..., None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(nb > 0, mean, np.nan)
        std = np.where(nb > 0, np.sqrt(m2 / np.where(nb > 0, nb, 1)), np.nan)
        pa = np.where(nb > 0, pos / np.where(nb > 0, nb, 1), np.nan)
    qs = sk.quantiles(hist, vmin, vmax, (0.1, 0.5, 0.9)) if hist is not None else [None] * 3
    sel = mom.selection
    return GroupStats(sel.site, layer, sel.rows, sel.by, langs, groups, count, m, std, pa, *qs)


def stats(
    store: Store, site: str = "resid", layer: int | None = None, *, by: str | None = "label",
    quantiles: bool = True, rows: str | None = None, lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True, plan: Plan | None = None,
    run: RunOptions | None = None,
) -> GroupStats:
    """Per (language, group) and neuron: count, mean, std (ddof 0), P(act > 0), approximate
    P10/P50/P90 of the raw activations of one layer."""
    plan = _planned(store, plan, site, layer, single=True, rows=rows, by=by, lang=lang, label=label, where=where)
    layer = plan.layers[0]
    if by is not None:
        _require_column(store, by, "stats")
    _check(plan, what="stats", by=by)
    if quantiles and statsonly.is_stats_only(store) and not statsonly.settings(store)["sketch"]:
        quantiles = False  # extracted --stats-only --no-sketch: no quantiles to show
    mom = mo.group_moments(store, plan, quantiles=quantiles, run=_opts(run, scheduler, workers, cache))
    _check(plan, mom, what="stats", by=by)
    i = 0
    out = _group_stats(
        mom, layer, mom.langs, mom.groups, mom.count, mom.mean[:, :, i], mom.m2[:, :, i], mom.pos[:, :, i],
        mom.vmin[:, :, i], mom.vmax[:, :, i], None if mom.hist is None else mom.hist[:, :, i],
    )
    out.provenance = provenance(store, plan.selection, "stats", quantiles=quantiles)
    return out


STATS = ("mean", "std", "p_active", "p10", "p50", "p90")


def group_values(
    store: Store, site: str, layer: int, by: str, group: str, stat: str = "mean", *,
    rows: str | None = None, scheduler: Any = None, workers: int | None = None, cache: bool = True,
    run: RunOptions | None = None,
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
    quant = stat in ("p10", "p50", "p90")
    check_site(store, site)
    plan = resolve(store, site, store.layer_number(site, layer), rows=rows, by=None if by == "lang" else by)
    mom = mo.group_moments(store, plan, quantiles=quant, run=_opts(run, scheduler, workers, cache))
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
    return sk.quantiles(hist, vmin, vmax, ({"p10": 0.1, "p50": 0.5, "p90": 0.9}[stat],))[0]


# ----------------------------------------------------------------------------------------------
# variance


def variance(
    store: Store, site: str = "resid", layer: int | None = None, *, by: str = "label",
    per: str | None = None, within: bool = False, zscore: bool = True, top: int | None = 20,
    rows: str | None = None, lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True, plan: Plan | None = None,
    run: RunOptions | None = None,
) -> VarianceResult:
    """Per neuron, the population variance over ``by`` groups of the group means of z (rows of all
    languages pooled) and the one-way ANOVA F; ``per="lang"``: the same within each language;
    ``within=True``: per group, the variance of z over that group's rows. ``top`` ranks neurons by
    variance (highest first).

    Refused (:class:`NeurostoreError`): fewer than 2 groups with rows (``within``: 1), ``by="lang"``
    with z-scoring, a store without values in ``by``, ``top < 1``. Left out with a warning: with
    z-scoring (or ``per="lang"``), a language with rows of one group only."""
    if per not in (None, "lang"):
        raise NeurostoreError(f"--per {per}: only --per lang is supported")
    check_count(top, "--top")
    mode = "within" if within else "per" if per == "lang" else "by"
    what = {"within": f"variance within each {_one(by)}", "per": f"variance over {_one(by)} means per language",
            "by": f"variance over {_one(by)} means"}[mode]
    _no_lang_zscore(by, zscore, "variance")
    plan = _planned(store, plan, site, layer, single=True, rows=rows, by=by, lang=lang, label=label, where=where)
    layer = plan.layers[0]
    _require_column(store, by, what)
    if per == "lang":
        _require_column(store, "lang", what)
    need = dict(what=what, by=by, min_groups=1 if within else 2, zscore=zscore, per_lang=mode == "per",
                alt="" if within else f"use --within {by} for the spread inside one {_one(by)}")
    _check(plan, **need)
    mom = mo.group_moments(store, plan, run=_opts(run, scheduler, workers, cache))
    lang_ok, group_ok, notes = _check(plan, mom, **need)
    n, mean, m2 = _keep_langs(lang_ok, *_values(mom, zscore))
    mean, m2 = mean[:, :, 0], m2[:, :, 0]  # [L, E, D]
    prov = provenance(store, plan.selection, "variance", notes, mode=mode, per=per, zscore=zscore, top=top)
    if within:
        if per == "lang":
            cells = [(f"{lg}/{g}", n[li, ei], m2[li, ei]) for li, lg in enumerate(mom.langs) for ei, g in enumerate(mom.groups)]
        else:
            n_e, _, m2_e = an.combine(n, mean, m2, axis=0)
            cells = list(zip(mom.groups, n_e, m2_e))
        # a group of one row has variance 0 for every neuron: its "top" would be neuron order
        single = [name for name, count, _ in cells if count == 1]
        if single:
            note = f"left out {', '.join(single)}: one row only, no spread to measure"
            if all(count < 2 for _, count, _ in cells):
                raise NeurostoreError(f"{what}: every {_one(by)} has fewer than 2 rows: keep more rows (widen --lang/--label/--where)")
            warnings.warn(note, stacklevel=2)
            prov["notes"].append(note)
        kept = [(name, an.within_variance(count, ss)) for name, count, ss in cells if count >= 2]
        var, names = np.stack([v for _, v in kept]), [name for name, _ in kept]
        tops = [an.top_k(v, top) for v in var]
        return VarianceResult(site, layer, by, "within", zscore, var, None, tops, names, prov)
    if per == "lang":
        kept = np.flatnonzero(lang_ok)
        pairs = [an.between_variance(n[li], mean[li], m2[li]) for li in kept]
        var = np.stack([p[0] for p in pairs])
        f = np.stack([p[1] for p in pairs])
        return VarianceResult(site, layer, by, "per", zscore, var, f, [an.top_k(v, top) for v in var], [mom.langs[li] for li in kept], prov)
    n_e, mean_e, m2_e = an.combine(n, mean, m2, axis=0)
    var, f = an.between_variance(n_e, mean_e, m2_e)
    return VarianceResult(site, layer, by, "by", zscore, var, f, an.top_k(var, top), None, prov)


# ----------------------------------------------------------------------------------------------
# M[l, e, d] and what derives from it


def group_means(
    store: Store, site: str = "resid", layer: int | None = None, *, by: str = "label", zscore: bool = True,
    rows: str | None = None, lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True, plan: Plan | None = None,
    run: RunOptions | None = None,
) -> GroupMeans:
    """``M[l, e, d]``: the mean of z over the rows of language l and group e, for the languages and
    groups with rows. With z-scoring, 2 groups with rows are needed, and a language with rows of
    one group only is left out (its mean z is 0 by construction), with a warning."""
    return _group_means(store, site, layer, what="group means", by=by, zscore=zscore, rows=rows, lang=lang,
                        label=label, where=where, run=_opts(run, scheduler, workers, cache), plan=plan)[0]


def _group_means(store: Store, site: str, layer: int | None, *, what: str, by: str, zscore: bool, rows, lang, label,
                 where, run: RunOptions, plan: Plan | None = None, cross_lingual: bool = False, min_groups: int = 1,
                 **params: Any) -> tuple[GroupMeans, Plan]:
    """:func:`group_means` with the refusals of ``what`` (and the plan it read); ``cross_lingual``:
    needs 2 languages, and groups with rows in one language only are left out."""
    _no_lang_zscore(by, zscore, what)
    if cross_lingual and by == "lang":
        raise NeurostoreError(f"{what} --by lang: the languages are what {what} compares; group by another column (--by label)")
    plan = _planned(store, plan, site, layer, single=True, rows=rows, by=by, lang=lang, label=label, where=where)
    layer = plan.layers[0]
    _require_column(store, by, what)
    if cross_lingual:
        _require_column(store, "lang", what)
    need = dict(what=what, by=by, zscore=zscore, min_groups=max(min_groups, 2 if zscore else 1),
                min_langs=2 if cross_lingual else 1, group_langs=cross_lingual)
    _check(plan, **need)
    mom = mo.group_moments(store, plan, run=run)
    lang_ok, group_ok, notes = _check(plan, mom, **need)
    n, mean, _ = _values(mom, zscore)
    M = an.group_means(n, mean[:, :, 0])[lang_ok][:, group_ok]
    prov = provenance(store, plan.selection, what if cross_lingual else "group_means", notes, zscore=zscore, **params)
    return GroupMeans(site, layer, by, zscore, [l for l, ok in zip(mom.langs, lang_ok) if ok],
                      [g for g, ok in zip(mom.groups, group_ok) if ok], n[lang_ok][:, group_ok], M, prov), plan


def correlate(
    store: Store, site: str = "resid", layer: int | None = None, *, by: str = "label", across: str = "lang",
    method: str = "spearman", zscore: bool = True, rows: str | None = None, lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True, plan: Plan | None = None,
    run: RunOptions | None = None,
) -> Correlation:
    """For each group e and languages a, b: Spearman's rho (or cosine) between ``M[a, e, :]`` and
    ``M[b, e, :]`` over the neurons; plus the mean matrix over groups (NaN entries skipped).

    Refused: fewer than 2 languages with rows, ``by="lang"``, z-scoring with fewer than 2 groups.
    Left out with a warning: groups with rows in one language only; with z-scoring, languages with
    rows of one group only."""
    if across != "lang":
        raise NeurostoreError(f"--across {across}: only --across lang is supported")
    if method not in ("spearman", "cosine"):
        raise NeurostoreError(f"--method {method}: expected spearman or cosine")
    gm, _ = _group_means(store, site, layer, what="correlate", by=by, zscore=zscore, rows=rows, lang=lang, label=label,
                      where=where, run=_opts(run, scheduler, workers, cache), plan=plan, cross_lingual=True, across=across,
                      method=method)
    mats = an.correlation_matrices(gm.M, method)
    return Correlation(site, gm.layer, method, gm.langs, gm.groups, mats, an.nanmean_matrices(mats), gm.provenance)


def polyglot(
    store: Store, site: str = "resid", layer: int | None = None, *, threshold: float = 0.5, by: str = "label",
    sensitive_top: int = 100, zscore: bool = True, rows: str | None = None, lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True, plan: Plan | None = None,
    run: RunOptions | None = None,
) -> Polyglot:
    """Polyglot neurons (``M > threshold`` in every language with rows of the group) and
    monolingual ones (above it in one language only), per group; and among the ``sensitive_top``
    highest-variance neurons, the share that is polyglot / monolingual (any language) / other.

    Refused: fewer than 2 languages or 2 groups with rows, ``by="lang"``, ``sensitive_top < 1``.
    Left out with a warning: groups with rows in one language only; with z-scoring, languages with
    rows of one group only."""
    check_count(sensitive_top, "--sensitive-top")
    run = _opts(run, scheduler, workers, cache)
    gm, plan = _group_means(store, site, layer, what="polyglot", by=by, zscore=zscore, rows=rows, lang=lang, label=label,
                      where=where, run=run, plan=plan, cross_lingual=True, min_groups=2,
                      threshold=threshold, sensitive_top=sensitive_top)
    sets = an.polyglot_sets(gm.M, gm.count, threshold)
    var = variance(store, site, gm.layer, by=by, zscore=zscore, top=sensitive_top, plan=plan, run=run)
    sensitive = [n for n, _ in var.top]
    poly = {g: sets.polyglot[e].tolist() for e, g in enumerate(gm.groups)}
    # a language without rows of a group has no monolingual neurons of it to count: it is absent
    mono = {g: {l: sets.monolingual[e][li].tolist() for li, l in enumerate(gm.langs) if gm.count[li, e] > 0} for e, g in enumerate(gm.groups)}
    shares = {}
    S = set(sensitive)
    for e, g in enumerate(gm.groups):
        p = S & set(poly[g])
        m = S & set().union(*[set(v) for v in mono[g].values()]) - p
        k = max(len(S), 1)
        shares[g] = {"polyglot": len(p) / k, "monolingual": len(m) / k, "other": (len(S) - len(p) - len(m)) / k}
    return Polyglot(site, gm.layer, threshold, gm.langs, gm.groups, poly, mono, sensitive, shares, gm.provenance)


# ----------------------------------------------------------------------------------------------
# activation probability: LAPE and selectors


def lape(
    store: Store, site: str = "mlp", layers: Sequence[int] | None = None, *, filter_rate: float = 0.95,
    top_rate: float = 0.01, rows: str = "tokens", lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True, plan: Plan | None = None,
    run: RunOptions | None = None,
) -> Lape:
    """Language-specific neurons by LAPE (token rows, all stored layers of ``site`` by default).
    Refused: fewer than 2 languages with rows (the entropy over one language is 0 for every neuron)."""
    plan = _planned(store, plan, site, layers, rows=rows, by=None, lang=lang, label=label, where=where)
    if not 0 < filter_rate <= 1:
        raise NeurostoreError(f"--filter-rate {filter_rate}: expected a share in (0, 1]")
    if not 0 < top_rate <= 1:
        raise NeurostoreError(f"--top-rate {top_rate}: expected a share in (0, 1]")
    _require_column(store, "lang", "lape")
    need = dict(what="lape", by=None, min_langs=2)
    _check(plan, **need)
    neurons = len(plan.layers) * plan.width
    if round(top_rate * neurons) < 1:  # an empty result, whatever the data
        raise NeurostoreError(f"--top-rate {top_rate}: keeps 0 of the {neurons} neurons (round(rate x neurons)); use at least {1 / neurons:.2g}")
    mom = mo.group_moments(store, plan, run=_opts(run, scheduler, workers, cache))
    have, _, notes = _check(plan, mom, **need)
    names = [l for l, h in zip(mom.langs, have) if h]
    P = mom.pos[have, 0] / mom.count[have, 0][:, None, None]
    res = an.lape(P, filter_rate, top_rate)
    out = {l: [(mom.layers[int(res.kept[i, 0])], int(res.kept[i, 1])) for i in res.members[k]] for k, l in enumerate(names)}
    prov = provenance(store, plan.selection, "lape", notes, filter_rate=filter_rate, top_rate=top_rate, threshold=res.threshold)
    return Lape(site, list(mom.layers), names, res.threshold, filter_rate, top_rate, out, P, res.H, prov)


def select(
    store: Store, site: str = "resid", layers: Sequence[int] | int | None = None, *, by: str = "label",
    method: str = "frequency", top: int | None = None, zscore: bool = True, filter_rate: float = 0.95,
    rows: str | None = None, lang=None, label=None, where=None,
    scheduler: Any = None, workers: int | None = None, cache: bool = True, plan: Plan | None = None,
    run: RunOptions | None = None,
) -> SelectedNeurons:
    """Group-sensitive neurons over all stored layers of ``site`` (or ``layers``): per group of
    ``by`` (pooled over languages), ``top`` triples (layer, neuron, score). frequency, entropy and
    contrast use P(activation > 0) of the raw activations; magnitude uses z (or raw with
    ``zscore=False``). actprob90 keeps every neuron above the group's 90th percentile of
    P(activation > 0) (``top`` caps it; ``top=None`` is 20 for the other methods).

    Refused: fewer than 2 groups with rows (every score compares groups), ``top < 1``,
    ``method="magnitude"`` with ``by="lang"`` and z-scoring. With z-scoring, magnitude leaves out a
    language with rows of one group only (warning)."""
    if method not in an.SELECT_METHODS:
        raise NeurostoreError(f"--method {method}: expected one of {', '.join(an.SELECT_METHODS)}")
    top = top if top is not None or method == "actprob90" else 20
    if top is not None:
        check_count(top, "--top")
    if not 0 < filter_rate <= 1:
        raise NeurostoreError(f"--filter-rate {filter_rate}: expected a share in (0, 1]")
    z = zscore and method == "magnitude"  # the other selectors read P(x > 0) of the raw activations
    if method == "actprob90" and rows is None and store.meta.get("tokens"):
        rows = "tokens"  # Act-Prob-90p is defined on token rows
    _no_lang_zscore(by, z, "select --method magnitude")
    plan = _planned(store, plan, site, layers, rows=rows, by=None if by == "lang" else by, lang=lang, label=label, where=where)
    _require_column(store, by, f"select --method {method}")
    need = dict(what=f"select --method {method}", by=by, min_groups=2, zscore=z and by != "lang")

    def check(count: np.ndarray, langs: list[str], groups: list[str], warn: bool = True) -> tuple:
        if by == "lang":  # the languages are the groups
            return _usable(count.T, [ALL], langs, filtered=plan.filtered, warn=warn, **need)
        return _usable(count, langs, groups, filtered=plan.filtered, warn=warn, **need)

    check(*_doc_counts(plan), warn=False)
    mom = mo.group_moments(store, plan, run=_opts(run, scheduler, workers, cache))
    lang_ok, _, notes = check(mom.count, mom.langs, mom.groups)
    n, mean, m2 = _values(mom, zscore)
    pos = mom.pos
    if by != "lang":
        n, mean, m2, pos = _keep_langs(lang_ok, n, mean, m2, pos)
    axis = 1 if by == "lang" else 0  # merge the other key
    n_g, mean_g, _ = an.combine(n, mean, m2, axis=axis)
    pos_g = pos.sum(axis=axis)
    names = mom.langs if by == "lang" else mom.groups
    picked = an.select(method, n_g, pos_g, mean_g, top, filter_rate)
    out = {g: [(mom.layers[a], b, c) for a, b, c in picked[i]] for i, g in enumerate(names) if n_g[i] > 0}
    # zscore as applied: only magnitude reads z, the other selectors P(x > 0) of the raw activations
    extra = {}
    if method == "actprob90":  # the percentile each group's neurons passed, in the JSON
        t90 = an.actprob_thresholds(n_g, pos_g)
        extra = {"percentile": an.ACTPROB_PERCENTILE, "thresholds": {g: float(t90[i]) for i, g in enumerate(names) if n_g[i] > 0}}
    prov = provenance(store, plan.selection, "select", notes, by=by, method=method, top=top, zscore=z, filter_rate=filter_rate, **extra)
    return SelectedNeurons(site, list(mom.layers), by, method, out, prov)


# ----------------------------------------------------------------------------------------------
# top examples


def top_examples(
    store: Store, site: str = "resid", layer: int | None = None, neuron: int = 0, *, k: int = 20,
    rows: str | None = None, lang=None, label=None, where=None, token_kind: Sequence[str] | None = None,
    scheduler: Any = None, workers: int | None = None, plan: Plan | None = None, run: RunOptions | None = None,
) -> list[Example]:
    """The ``k`` rows (tokens by default when stored, else sentences) where one neuron is highest,
    with their sentence, and for tokens the token and its neighbours in the sentence (from the
    character offsets stored at extraction: no tokenizer is loaded). Reads that neuron's layer
    once (one pass over its chunks)."""
    check_count(k, "--k")
    if rows is None:
        rows = "tokens" if store.meta["tokens"] else default_rows(store)
    plan = _planned(store, plan, site, layer, single=True, rows=rows, by=None, lang=lang, label=label, where=where, token_kind=token_kind)
    rows = plan.rows
    if not 0 <= neuron < plan.width:
        raise NeurostoreError(f"--neuron {neuron}: site {site!r} has neurons 0-{plan.width - 1}")
    found = mo.top_rows(store, plan, neuron, k, run=_opts(run, scheduler, workers))
    label_codes, lang_codes = store.doc_column("label"), store.doc_column("lang")
    labels, langs = store.categories("label"), store.categories("lang")
    starts = store.doc_column("token_start") if rows == "tokens" else None
    docs = [int(np.searchsorted(starts, row, side="right") - 1) if rows == "tokens" else int(row) for row, _ in found]
    texts = _pick_rows(store, "docs/text", "committed_docs", docs)  # only the k rows, never a whole column
    out = []
    for i, ((row, value), doc) in enumerate(zip(found, docs)):
        out.append(Example(
            int(row), doc, float(value),
            langs[lang_codes[doc]] if lang_codes[doc] >= 0 else MISSING,
            labels[label_codes[doc]] if label_codes[doc] >= 0 else MISSING,
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


def top_examples_result(store: Store, site: str = "resid", layer: int | None = None, neuron: int = 0, **options: Any) -> TopExamples:
    """:func:`top_examples` (same keywords) as a result with its provenance."""
    check_count(options.get("k"), "--k")
    plan = options.pop("plan", None)
    if plan is None:
        keys = {k: v for k, v in options.items() if k not in ("k", "scheduler", "workers", "run")}
        keys["rows"] = keys.get("rows") or ("tokens" if store.meta["tokens"] else default_rows(store))
        check_site(store, site)
        plan = resolve(store, site, store.layer_number(site, layer), by=None, **keys)
    examples = top_examples(store, site, layer, neuron, plan=plan, **options)
    prov = provenance(store, plan.selection, "top_examples", neuron=neuron, k=options.get("k", top_examples.__kwdefaults__["k"]))
    return TopExamples(site, plan.layers[0], neuron, examples, prov)


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
