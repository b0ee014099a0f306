"""Where a query result came from, recorded next to its numbers (``"provenance"`` in every JSON).

Built in one place from the :class:`~neurostore.moments.Selection` the pass reduced (every field
of it, so a field added there is recorded without touching this module) plus the analysis' own
parameters, so that a number read months later still says which store, model, rows, grouping,
filters, z-scoring and thresholds produced it, and with which neurostore.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

# Selection fields that ``describe`` words itself; any other field is shown as ``name value``.
_WORDED = ("site", "layers", "rows", "by", "filters")


def _plain(name: str, value: Any) -> Any:
    """JSON-ready values: tuples become lists, the filter pairs a ``{column: [values]}`` mapping."""
    if name == "filters" and isinstance(value, (tuple, list)):
        return {str(c): _plain("", v) for c, v in value}
    if isinstance(value, (tuple, list)):
        return [_plain("", v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain("", v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def provenance(store: Any, sel: Any, analysis: str, notes: Sequence[str] = (), **parameters: Any) -> dict:
    """The provenance record of one result.

    ``store``: the opened store (one or several parts); ``sel``: the ``moments.Selection`` of the
    pass (every dataclass field is copied); ``analysis``: the query's name; ``notes``: what was left
    out and why (the warning lines, so the JSON says it too); ``parameters``: the analysis' own
    options (z-scoring, thresholds, rates, method, top, k ...).
    """
    from . import __version__

    meta = store.meta
    model = meta.get("model") or {}
    selection = {f.name: _plain(f.name, getattr(sel, f.name)) for f in dataclasses.fields(sel)}
    return {
        "analysis": analysis,
        "neurostore_version": __version__,
        "store": {
            "paths": [str(p) for p in store.paths],
            "model": model.get("name"),
            "model_path": model.get("path"),
            "store_dtype": meta.get("store_dtype"),
            "extracted_by": meta.get("neurostore_version"),
            "docs": int(store.n_docs),
            "tokens": int(store.n_tokens),
            "complete": bool(store.complete),
        },
        "selection": selection,
        "parameters": {k: _plain(k, v) for k, v in parameters.items()},
        "notes": list(notes),
    }


def rows_words(rows: str | None) -> str:
    if rows == "tokens":
        return "token rows"
    return f"{rows}-pooled sentences" if rows else "sentences"


def describe(prov: dict) -> str:
    """A table or figure title's account of the rows behind it: site, layer(s), pooling, grouping,
    filters and z-scoring, e.g. ``resid layer 5, mean-pooled sentences, lang en,es, z within lang``."""
    sel = prov.get("selection", {})
    params = prov.get("parameters", {})
    layers = sel.get("layers") or []
    where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {_span(layers)}" if layers else ""
    parts = [" ".join(x for x in (str(sel.get("site", "")), where) if x), rows_words(sel.get("rows"))]
    for column, values in (sel.get("filters") or {}).items():
        parts.append(f"{column} {','.join(map(str, values))}")
    for name, value in sel.items():
        if name not in _WORDED and value not in (None, False, (), [], {}) and (name, value) != ("quantity", "activation"):
            parts.append(f"{name} {','.join(map(str, value)) if isinstance(value, list) else value}")
    if "zscore" in params:
        parts.append("z within language" if params["zscore"] else "raw activations")
    return ", ".join(p for p in parts if p)


def _span(layers: Sequence[int]) -> str:
    layers = list(layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))
