"""Compare neuron sets from query outputs: Jaccard overlap per group and overall, layer distributions.

Two identification methods (LAPE and Act-Prob-90p, activation and relevance, base and chat model)
are compared by how much their neuron sets overlap: |A ∩ B| / |A ∪ B| over (layer, neuron) pairs of
one site. Any query JSON that holds neurons is read (``lape``, ``select``, ``polyglot``,
``variance``), through :func:`neurostore.neurons.neuron_set_from_json`, so the sets are exactly
the ones ``intervene`` would use. No torch, no store: this reads JSON files only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import NeurostoreError
from .neurons import neuron_set_from_json

# The name of the one set of a variance JSON without groups.
ALL = "all"


@dataclass
class Sets:
    """The neuron sets of one query output: per group, ``{(layer, neuron)}``; ``overall`` their union."""

    name: str
    site: str
    analysis: str
    groups: dict[str, set[tuple[int, int]]]
    overall: set[tuple[int, int]]
    provenance: dict


def _pairs(neurons: Any) -> set[tuple[int, int]]:
    return {(layer, n) for layer, ids in neurons.layers.items() for n in ids}


def group_names(obj: dict) -> list[str]:
    """The groups a query output holds neurons for (``LABEL/LANG`` for polyglot's monolingual ones)."""
    for key in ("selected", "neurons"):
        if isinstance(obj.get(key), dict):
            return [str(g) for g in obj[key]]
    if "polyglot" in obj:
        names = [str(g) for g in obj.get("polyglot") or {}]
        for label, by_lang in (obj.get("monolingual") or {}).items():
            names += [f"{label}/{lang}" for lang in (by_lang or {})]
        return names
    if isinstance(obj.get("top"), dict):
        return [str(g) for g in obj["top"]]
    return []


def read_sets(obj: Any, name: str) -> Sets:
    """Every group's neuron set of one query output (``name`` says where it came from in errors)."""
    source = name
    if not isinstance(obj, dict):
        raise NeurostoreError(f"{source}: not a neurostore query output (a JSON object with a 'site')")
    names = group_names(obj)
    if names:
        groups = {g: _pairs(neuron_set_from_json(obj, g, source=source)) for g in names}
    else:  # one unnamed set (variance without --per/--within), or an error naming what is missing
        groups = {ALL: _pairs(neuron_set_from_json(obj, None, source=source))}
    overall = set().union(*groups.values()) if groups else set()
    if "polyglot" in obj:  # the monolingual neurons are other neurons than the polyglot ones
        overall = set().union(*(v for g, v in groups.items() if "/" not in g))
    prov = obj.get("provenance") or {}
    analysis = str(prov.get("analysis") or _kind(obj))
    method = obj.get("method") or (prov.get("parameters") or {}).get("method")
    if analysis == "select" and method:  # which selector: lape vs actprob90 is the usual comparison
        analysis = f"select {method}"
    return Sets(name, str(obj["site"]), analysis, groups, overall, prov)


def _kind(obj: dict) -> str:
    for key, kind in (("selected", "select"), ("polyglot", "polyglot"), ("neurons", "lape"), ("top", "variance")):
        if key in obj:
            return kind
    return "?"


def load(path: str | Path) -> Sets:
    """Read one query JSON file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NeurostoreError(f"{path}: no such file (give query outputs written with --format json)") from None
    except IsADirectoryError:
        raise NeurostoreError(f"{path}: a folder, not a query JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NeurostoreError(f"{path}: not a JSON file ({getattr(err, 'msg', err)}); write it with --format json") from None
    return read_sets(obj, str(path))


def jaccard(a: set, b: set) -> dict:
    """|a ∩ b| / |a ∪ b| with the sizes; None where both sets are empty."""
    inter, union = len(a & b), len(a | b)
    return {"a": len(a), "b": len(b), "intersection": inter, "union": union, "jaccard": inter / union if union else None}


def layer_distribution(pairs: set[tuple[int, int]]) -> dict[str, int]:
    counts: dict[int, int] = {}
    for layer, _ in pairs:
        counts[layer] = counts.get(layer, 0) + 1
    return {str(layer): counts[layer] for layer in sorted(counts)}


def compare(sets: Sequence[Sets]) -> dict:
    """Every pair of sets: Jaccard overall and per group both hold; each set's layer distribution
    (overall and per group). Refused: fewer than two sets, or sets of different sites."""
    from . import __version__

    if len(sets) < 2:
        raise NeurostoreError("compare needs at least two query JSON files (e.g. a lape and a select output)")
    sites = {s.site for s in sets}
    if len(sites) > 1:
        named = ", ".join(f"{s.name}: {s.site}" for s in sets)
        raise NeurostoreError(f"the sets are of different sites ({named}): neuron numbers of different sites name different neurons; compare sets of one site")
    pairs = []
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            common = [g for g in a.groups if g in b.groups]
            pairs.append({
                "a": a.name, "b": b.name,
                "overall": jaccard(a.overall, b.overall),
                "groups": {g: jaccard(a.groups[g], b.groups[g]) for g in common},
                "only_a": [g for g in a.groups if g not in b.groups],
                "only_b": [g for g in b.groups if g not in a.groups],
            })
    return {
        "site": sets[0].site,
        "sets": [
            {
                "name": s.name, "analysis": s.analysis, "n": len(s.overall),
                "groups": {g: len(v) for g, v in s.groups.items()},
                "layers": layer_distribution(s.overall),
                "group_layers": {g: layer_distribution(v) for g, v in s.groups.items()},
            }
            for s in sets
        ],
        "pairs": pairs,
        "provenance": {
            "analysis": "compare",
            "neurostore_version": __version__,
            "inputs": [{"name": s.name, "analysis": s.analysis, "store": s.provenance.get("store"),
                        "parameters": s.provenance.get("parameters")} for s in sets],
        },
    }


def run(paths: Sequence[str | Path]) -> dict:
    """``neurostore compare A.json B.json ...``: read and compare."""
    if len(paths) < 2:
        raise NeurostoreError("compare needs at least two query JSON files (e.g. a lape and a select output)")
    return compare([load(p) for p in paths])
