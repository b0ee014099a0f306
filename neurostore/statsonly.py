"""Stats-only stores: their statistics written at each commit, and read back by the query layer.

A store extracted with ``--stats-only`` (the store feature ``stats_only``) has the per-sentence and
per-token tables of a full store (text, labels, languages, token ids, kinds, offsets: ~17 bytes a
token) but no activation arrays. In their place, per site and row kind (``tokens`` or a pooling),
the statistics of every *cell* (:mod:`neurostore.live`), one entry per layer in the layout of the
query cache (:mod:`neurostore.cache`: ``count, mean, m2, pos, vmin, vmax, hist``) plus each
neuron's top-k rows::

    stats/<entry>/<site>/<rows>/cells          [C, 3] int32  token kind, language, label codes of each cell
                                                             (-1: missing, or a grouping not kept)
    stats/<entry>/<site>/<rows>/<layer>/count  [C] int64
                                 .../mean, m2  [C, width] float64   (m2: sum of squared deviations)
                                 .../pos       [C, width] int64     (values > 0)
                                 .../vmin, vmax [C, width] float64
                                 .../hist      [C, width, 128] uint32  (the quantile sketch; absent with --no-sketch)
                                 .../top_value, top_row [C, width, k]  highest values first, ties by lowest row;
                                                             rows index the part's token rows (or sentences), -1 = none

``meta["stats"]`` names the committed entry; a commit writes a new entry and then names it in the
same metadata write that records the committed sentences, so the statistics always describe
exactly the committed rows (an entry no metadata names is a leftover of a kill, removed on
resume). These statistics are the store's data: a damaged one is a :class:`Fault`, never
recomputed. Queries read them through :func:`moments` and :func:`top_rows`, which merge cells
(Chan's formula, the query pass's own ``merge_into``) into the groups a plan asks for, or refuse a
plan that needs rows the store does not keep.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

import numpy as np

from . import chunks as ch
from . import moments as mo
from . import store as st
from .errors import Fault, NeurostoreError
from .plan import MISSING, Plan

if TYPE_CHECKING:
    import zarr

FEATURE = "stats_only"
GROUPINGS = ("lang", "label")
DEFAULT_GROUPS = ("lang", "label")
DEFAULT_K = 20
MOMENTS = ("count", "mean", "m2", "pos", "vmin", "vmax")
FULL = "a full extraction (extract without --stats-only)"


def is_stats_only(store: st.Store) -> bool:
    return any(FEATURE in (m.get("features") or []) for m in store.metas)


def parse_groups(value: Any) -> list[str]:
    """``--groups``: the groupings whose cells are kept (a subset of ``GROUPINGS``)."""
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value or []) if v.strip()]
    if not names:
        raise NeurostoreError(f"--groups: give one or more of {', '.join(GROUPINGS)}")
    for name in names:
        if name not in GROUPINGS:
            raise NeurostoreError(f"--groups {name}: a stats-only extraction keeps statistics per {' and/or '.join(GROUPINGS)}; "
                                  f"other columns need {FULL}")
    return [g for g in GROUPINGS if g in names]


def settings(store: st.Store) -> dict:
    """``{"groups", "k", "sketch"}`` of a stats-only store (the same in every part)."""
    return store.meta["stats"]


# ----------------------------------------------------------------------------------------------
# writing (the extractor, at each commit)


def entry_name(seq: int) -> str:
    return f"c{seq:06d}"


def write(group: zarr.Group, name: str, streams: dict[tuple[str, str], tuple[np.ndarray, list[int], list[dict]]], crc: bool) -> None:
    """Write the entry ``stats/<name>``: per (site, rows) its cell table and one group per layer."""
    codecs = st.table_codecs(crc)
    for (site, rows), (cells, layers, entries) in streams.items():
        base = f"stats/{name}/{site}/{rows}"
        arr = group.create_array(f"{base}/cells", data=np.ascontiguousarray(cells, dtype=np.int32), compressors=codecs,
                                 dimension_names=st.stat_dims("cells", 2, ("cell",)))
        arr.attrs.update({"columns": ["kind", "lang", "label"]})
        for layer, entry in zip(layers, entries):
            for key, value in entry.items():
                value = np.ascontiguousarray(value)
                group.create_array(f"{base}/{layer}/{key}", data=value, compressors=codecs,
                                   dimension_names=st.stat_dims(key, value.ndim, ("cell",)))


def drop_other_entries(group: zarr.Group, keep: str | None) -> None:
    """Remove every stats entry but ``keep`` (superseded ones, and a kill's leftover)."""
    try:
        stats = group["stats"]
    except KeyError:
        return
    for name in list(stats.group_keys()):
        if name == keep:
            continue
        folder = st.local_folder(group, f"stats/{name}")
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            del stats[name]
    st.consolidate(group)  # the consolidated metadata written at the commit still lists the dropped entries


def read_entries(group: zarr.Group, meta: dict, site: str, rows: str, layers: list[int]) -> tuple[np.ndarray, list[dict]] | None:
    """The committed cells and per-layer entries of one stream (a resume continues from them)."""
    name = (meta.get("stats") or {}).get("entry")
    if name is None:
        return None
    base = f"stats/{name}/{site}/{rows}"
    cells = _read(group, f"{base}/cells")
    entries = []
    for layer in layers:
        sub = group[f"{base}/{layer}"]
        entries.append({key: _read(group, f"{base}/{layer}/{key}") for key in sub.array_keys()})
    return cells, entries


def _read(group: zarr.Group, path: str, index: Any = Ellipsis) -> np.ndarray:
    try:
        return np.asarray(group[path][index])
    except KeyError:
        raise Fault(f"{_where(group)}: the stats-only store lacks {path}; the store is damaged: extract it again") from None
    except Exception as err:  # noqa: BLE001 - a checksum mismatch, a truncated chunk, bad metadata
        if isinstance(err, NeurostoreError):
            raise
        raise Fault(f"{_where(group)}: {path}: {ch._why(err)}; a stats-only store's statistics are its data, never recomputed: "
                    "extract it again") from None


def _where(group: Any) -> str:
    root = getattr(group.store, "root", None)
    return str(root) if root is not None else str(group.store)


# ----------------------------------------------------------------------------------------------
# reading: which cells a plan merges, or a refusal


def check(store: st.Store, plan: Plan, *, quantiles: bool = False, what: str = "this query") -> None:
    """Refuse, in one line, a plan the kept statistics cannot answer exactly."""
    kept = settings(store)["groups"]
    sel = plan.selection
    if sel.by is not None and sel.by not in kept:
        raise NeurostoreError(
            f"--by {sel.by}: this stats-only store keeps statistics per {', '.join(kept)} only; "
            f"{'extract --stats-only --groups lang,label' if sel.by in GROUPINGS else FULL} answers it"
        )
    for column, _ in sel.filters:
        if column not in kept:
            option = f"--{column}" if column in GROUPINGS else f"--where {column}"
            raise NeurostoreError(
                f"{option}: this stats-only store keeps statistics per {', '.join(kept)} only; "
                f"{'extract --stats-only --groups lang,label' if column in GROUPINGS else FULL} answers it"
            )
    if "lang" not in kept and len(plan.langs) > 1:
        raise NeurostoreError(
            f"{what}: this stats-only store did not keep languages apart (--groups {','.join(kept)}) and the corpus has "
            f"{len(plan.langs)}; extract --stats-only --groups lang,label answers it"
        )
    if quantiles and not settings(store)["sketch"]:
        raise NeurostoreError(f"{what}: quantiles need the sketch, which this stats-only store was extracted without (--no-sketch); "
                              "extract --stats-only without --no-sketch answers it")


def _targets(store: st.Store, plan: Plan, cells: np.ndarray) -> np.ndarray:
    """The plan's group (lang x len(groups) + by) of each cell, -1 where the plan leaves it out."""
    sel = plan.selection
    kind, lang, label = cells[:, 0].astype(np.int64), cells[:, 1].astype(np.int64), cells[:, 2].astype(np.int64)
    keep = np.ones(len(cells), bool)
    if sel.token_kind is not None:
        names = list(store.groups[0]["tokens/kind"].attrs.get("categories", st.TOKEN_KINDS))
        keep &= np.isin(kind, [names.index(k) for k in sel.token_kind if k in names])
    if "lang" in settings(store)["groups"]:
        lang_index = np.where(lang >= 0, lang, plan.langs.index(MISSING) if MISSING in plan.langs else -1)
    else:
        lang_index = np.zeros(len(cells), np.int64)
    keep &= lang_index >= 0
    if sel.by is None:
        by_index = np.zeros(len(cells), np.int64)
    else:  # check(): by is a kept grouping
        by_index = lang if sel.by == "lang" else label
        keep &= by_index >= 0
    for column, values in sel.filters:
        names = store.categories(column)
        codes = lang if column == "lang" else label
        keep &= np.isin(codes, [names.index(v) for v in values])
    return np.where(keep, lang_index * len(plan.groups) + by_index, -1)


def _cells(store: st.Store, part: int, cells: np.ndarray) -> np.ndarray:
    """A part's cell table with its language and label codes as the store's (a collection merges
    the members' category names: :meth:`Store.recode`)."""
    cells = np.array(cells)
    cells[:, 1] = store.recode("docs/lang", part, cells[:, 1])
    cells[:, 2] = store.recode("docs/label", part, cells[:, 2])
    return cells


def moments(store: st.Store, plan: Plan, quantiles: bool = False) -> mo.GroupMoments:
    """The plan's grouped statistics merged from the stored cells (no pass over activations)."""
    check(store, plan, quantiles=quantiles)
    sel = plan.selection
    n_groups = len(plan.langs) * len(plan.groups)
    accs = [mo.empty_partial(n_groups, plan.width, quantiles) for _ in sel.layers]
    for i, (group, meta) in enumerate(zip(store.groups, store.metas)):
        name = meta["stats"].get("entry")
        if name is None:
            continue
        base = f"stats/{name}/{sel.site}/{sel.rows}"
        targets = _targets(store, plan, _cells(store, i, _read(group, f"{base}/cells")))
        picked = np.flatnonzero(targets >= 0)
        if not len(picked):
            continue
        for j, layer in enumerate(sel.layers):
            keys = MOMENTS + (("hist",) if quantiles else ())
            e = {key: _read(group, f"{base}/{layer}/{key}") for key in keys}
            if not quantiles:
                e["hist"] = None
            for c in picked.tolist():
                part = {key: (None if v is None else v[c:c + 1]) for key, v in e.items()}
                mo.merge_into(accs[j], part, np.array([targets[c]]))
    out = mo._assemble(sel, plan.langs, plan.groups, accs, quantiles)
    out.from_cache = [True] * len(sel.layers)
    return out


def check_k(store: st.Store, k: int) -> int:
    """``k`` examples are at most the rows kept per neuron (returned); more is one line."""
    kept_k = settings(store)["k"]
    if k > kept_k:
        raise NeurostoreError(
            f"--k {k}: this stats-only store kept the top {kept_k} rows per neuron; ask for at most {kept_k}, "
            f"or extract again with --stats-only --k {k}, or in full (without --stats-only)"
        )
    return kept_k


def top_rows(store: st.Store, plan: Plan, neuron: int, k: int) -> list[tuple[int, float]]:
    """:func:`neurostore.moments.top_rows` from the kept top-k lists: the union of the selected
    cells' lists holds the plan's top ``k`` (each list is ranked the same way), so it is exact for
    any ``k`` up to the kept one."""
    check(store, plan, what="top-examples")
    check_k(store, k)
    sel = plan.selection
    layer = sel.layers[0]
    values, rows = [], []
    shift = 0
    for i, (group, meta) in enumerate(zip(store.groups, store.metas)):
        name = meta["stats"].get("entry")
        part_rows = meta["committed_tokens" if sel.rows == "tokens" else "committed_docs"]
        if name is not None:
            base = f"stats/{name}/{sel.site}/{sel.rows}"
            targets = _targets(store, plan, _cells(store, i, _read(group, f"{base}/cells")))
            picked = np.flatnonzero(targets >= 0)
            if len(picked):
                v = _read(group, f"{base}/{layer}/top_value", (slice(None), neuron))[picked]
                r = _read(group, f"{base}/{layer}/top_row", (slice(None), neuron))[picked]
                ok = r >= 0
                values.append(v[ok])
                rows.append(r[ok] + shift)
        shift += part_rows
    if not values:
        return []
    best_v, best_r = mo._best(np.concatenate(values), np.concatenate(rows), k)
    return [(int(r), float(v)) for v, r in zip(best_v, best_r)]


def verify(path: str, group: zarr.Group, meta: dict) -> list[str]:
    """Read every array of the committed entry (checksums included); one line per damaged one."""
    name = (meta.get("stats") or {}).get("entry")
    if name is None:
        return []
    problems = []
    base = group[f"stats/{name}"]
    for sub_path, arr in _arrays(base, f"stats/{name}"):
        try:
            np.asarray(arr[...])
        except Exception as err:  # noqa: BLE001 - codecs fail in many ways (checksum, truncated, I/O)
            problems.append(f"{path}: {sub_path}: {ch._why(err)}")
    return problems


def _arrays(group: Any, prefix: str) -> list[tuple[str, Any]]:
    out = [(f"{prefix}/{k}", a) for k, a in sorted(group.arrays(), key=lambda kv: kv[0])]
    for k, sub in sorted(group.groups(), key=lambda kv: kv[0]):
        out += _arrays(sub, f"{prefix}/{k}")
    return out
