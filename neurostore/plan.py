"""What a query reads, resolved and checked once: the row selection and the run options.

A :class:`Selection` names the rows and groups (site, layers, rows, grouping column, filters, token
kinds): small, hashable, the key of the statistics cache. A :class:`Plan` is a selection checked
against one opened store, with what the pass needs from the per-sentence tables (the group of every
sentence, the language and group names, the stored layer positions), so the pass, the cache, the
refusals and the top rows read it instead of resolving the selection again. :class:`RunOptions`
say how a pass runs (scheduler, workers, cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from .errors import NeurostoreError
from .store import TOKEN_KINDS, Store, check_quantity

MISSING = "(missing)"
ALL = "(all)"


@dataclass(frozen=True)
class Selection:
    """Which rows and groups a pass reduces. ``rows`` is ``"tokens"`` or a pooling name;
    ``token_kind``: the kinds of token rows kept (``store.TOKEN_KINDS`` names; None: every row);
    ``quantity``: the values read, activations or relevances (``store.QUANTITIES``)."""

    site: str
    layers: tuple[int, ...]
    rows: str = "mean"
    by: str | None = "label"
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()
    token_kind: tuple[str, ...] | None = None
    quantity: str = "activation"

    def with_layers(self, layers: Sequence[int]) -> "Selection":
        return replace(self, layers=tuple(int(x) for x in layers))


@dataclass(frozen=True)
class RunOptions:
    """How a pass runs: ``scheduler`` None (local threads), a ``distributed.Client`` or a scheduler
    address; ``workers`` local threads (None: the CPU count); ``cache`` read and write the store's
    statistics cache."""

    scheduler: Any = None
    workers: int | None = None
    cache: bool = True


@dataclass(frozen=True, eq=False)
class Plan:
    """A :class:`Selection` checked against ``store``: ``codes`` is the group of every committed
    sentence (-1 = left out; group = lang x len(groups) + by), ``indices`` the positions of the
    selected layers along the stored layer axis."""

    store: Store
    selection: Selection
    codes: np.ndarray = field(repr=False)
    langs: list[str]
    groups: list[str]
    indices: tuple[int, ...]
    width: int

    @property
    def site(self) -> str:
        return self.selection.site

    @property
    def layers(self) -> tuple[int, ...]:
        return self.selection.layers

    @property
    def rows(self) -> str:
        return self.selection.rows

    @property
    def by(self) -> str | None:
        return self.selection.by

    @property
    def token_kind(self) -> tuple[str, ...] | None:
        return self.selection.token_kind

    @property
    def filtered(self) -> bool:
        return bool(self.selection.filters)

    def with_layers(self, layers: Sequence[int]) -> "Plan":
        sel = self.selection.with_layers(layers)
        return replace(self, selection=sel, indices=tuple(self.store.layer_index(sel.site, x) for x in sel.layers))


def plan_for(store: Store, sel: Selection | Plan) -> Plan:
    """``sel`` checked against ``store`` (a plan is returned as it is)."""
    if isinstance(sel, Plan):
        return sel
    sel = site_rows(store, sel)
    check_quantity(store.metas, store.paths, sel.quantity)
    _check_rows(store, sel)
    codes, langs, groups = group_codes(store, sel)
    indices = tuple(store.layer_index(sel.site, layer) for layer in sel.layers)
    return Plan(store, sel, codes, langs, groups, indices, int(store.site(sel.site)["width"]))


def resolve(
    store: Store, site: str, layers: Sequence[int] | int | None = None, *, rows: str | None = None,
    by: str | None = "label", lang: Sequence[str] | None = None, label: Sequence[str] | None = None,
    where: dict[str, Sequence[str]] | None = None, token_kind: Sequence[str] | None = None, quantity: str | None = None,
) -> Plan:
    """Check the query options against the store once and build its :class:`Plan`.

    ``layers``: None (every stored layer), one layer or a list (negatives count back from the last
    stored layer); ``rows``: "tokens" or a stored pooling (default: :func:`default_rows`);
    ``token_kind`` (or ``where["token_kind"]``, the way the query functions pass it on) keeps token
    rows of these kinds only."""
    check_site(store, site)
    rows = rows or default_rows(store)
    where = dict(where or {})
    asked = [*([quantity] if quantity else []), *(where.pop("quantity", None) or [])]  # where["quantity"]: as token_kind travels
    if len(set(asked)) > 1:
        raise NeurostoreError(f"--quantity: give one quantity, not {', '.join(sorted(set(asked)))}")
    quantity = asked[0] if asked else "activation"
    check_quantity(store.metas, store.paths, quantity)
    if rows == "tokens":
        if not store.meta["tokens"]:
            raise NeurostoreError("--tokens: the store holds pooled vectors only (extracted with --no-tokens)")
    elif rows not in store.meta["pool"]:
        stored = ", ".join(store.meta["pool"]) or "none"
        raise NeurostoreError(f"--pool {rows}: pooling not in the store (stored: {stored})")
    kinds = token_kinds(store, rows, [*(token_kind or []), *(where.pop("token_kind", None) or [])])
    filters: dict[str, list[str]] = {}
    if lang:
        filters["lang"] = list(lang)
    if label:
        filters["label"] = list(label)
    for column, values in where.items():
        filters.setdefault(column, []).extend(values)
    if layers is None:
        picked = list(store.site(site)["layers"])
    else:
        picked = [store.layer_number(site, x) for x in ([layers] if isinstance(layers, int) else layers)]
    sel = Selection(
        site=site, layers=tuple(picked), rows=rows, by=by,
        filters=tuple(sorted((c, tuple(sorted(set(v)))) for c, v in filters.items())), token_kind=kinds, quantity=quantity,
    )
    return plan_for(store, sel)  # validates the grouping and filter columns now, with clear errors


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


def site_rows(store: Store, sel: Selection) -> Selection:
    """A site with values on token rows of one kind only (``audio.resid``: the audio encoder, on the
    audio rows) reads those rows: the default becomes that kind, any other kind is refused."""
    only = store.site(sel.site).get("rows") if sel.site in store.sites else None
    if not only or sel.rows != "tokens":
        return sel
    if sel.token_kind is None or only in sel.token_kind:  # --skip-special keeps them
        return replace(sel, token_kind=(only,))
    raise NeurostoreError(
        f"--token-kind {','.join(sel.token_kind)}: site {sel.site} holds values on {only} token rows only; "
        f"leave the option out or give --token-kind {only}"
    )


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


# ----------------------------------------------------------------------------------------------
# grouping and filters (small per-sentence tables, in memory)


def group_codes(store: Store, sel: Selection) -> tuple[np.ndarray, list[str], list[str]]:
    """Group index of every committed sentence (-1 = left out), language names, group names."""
    lang = store.doc_column("lang").astype(np.int64)
    lang_names = store.categories("lang")
    if (lang < 0).any():
        lang = np.where(lang < 0, len(lang_names), lang)
        lang_names = lang_names + [MISSING]
    if sel.by is None:
        by, by_names = np.zeros_like(lang), [ALL]
    else:
        by_names = _categorical(store, sel.by, "--by")
        by = store.doc_column(sel.by).astype(np.int64)
    gid = np.where(by >= 0, lang * len(by_names) + by, -1)
    for column, values in sel.filters:
        names = _categorical(store, column, _filter_option(column))
        codes = store.doc_column(column)
        wanted = []
        for v in values:
            if v not in names:
                raise NeurostoreError(
                    f"{_filter_option(column)} {v}: column {column!r} has no value {v!r} (values: {', '.join(names)})"
                )
            wanted.append(names.index(v))
        gid = np.where(np.isin(codes, wanted), gid, -1)
    return gid.astype(np.int64), lang_names, by_names


def _filter_option(column: str) -> str:
    return f"--{column}" if column in ("lang", "label") else f"--where {column}"


def _categorical(store: Store, column: str, option: str) -> list[str]:
    try:
        return store.categories(column)
    except NeurostoreError:
        known = [k for k in store.groups[0]["docs"].array_keys() if "categories" in store.groups[0][f"docs/{k}"].attrs]
        raise NeurostoreError(
            f"{option}: the store has no categorical column {column!r} (categorical: {', '.join(sorted(known))})"
        ) from None


def _check_rows(store: Store, sel: Selection) -> None:
    """The errors of ``store.acts`` / ``store.pooled`` (no token rows, unknown site or pooling)
    without building their dask arrays: importing ``dask.array`` alone costs ~0.5 s of a query."""
    store.site(sel.site)
    if sel.rows == "tokens":
        if not store.meta["tokens"]:
            store.acts(sel.site)
    elif sel.rows not in store.meta["pool"]:
        store.pooled(sel.site, sel.rows)
