"""The result types of :mod:`neurostore.query`: small dataclasses whose ``to_json()`` gives the
documented JSON objects (``docs/query.md``); tables and plots read them, nothing here computes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import analysis as an
from .errors import NeurostoreError


def check_count(value: int | None, option: str) -> None:
    """Counts of neurons or rows (``--top``, ``--k``, ``--sensitive-top``) are at least 1."""
    if value is not None and (isinstance(value, bool) or value < 1):
        raise NeurostoreError(f"{option} {value}: expected a count of at least 1")


def _clean(values: Any) -> Any:
    """NaN / inf become None so the JSON is strict."""
    arr = np.asarray(values, dtype=np.float64)
    return [None if not np.isfinite(v) else float(v) for v in arr.ravel()] if arr.ndim == 1 else [_clean(r) for r in arr]


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
    provenance: dict = field(default_factory=dict)

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
        out["provenance"] = self.provenance
        return out


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
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"site": self.site, "layer": self.layer, "by": self.by, "mode": self.mode, "zscore": self.zscore}
        if self.groups is None:
            out.update(variance=_clean(self.variance), f=_clean(self.f), top=[[n, v] for n, v in self.top])
        else:
            out["groups"] = self.groups
            out["variance"] = {g: _clean(self.variance[i]) for i, g in enumerate(self.groups)}
            out["f"] = None if self.f is None else {g: _clean(self.f[i]) for i, g in enumerate(self.groups)}
            out["top"] = {g: [[n, v] for n, v in self.top[i]] for i, g in enumerate(self.groups)}
        out["provenance"] = self.provenance
        return out


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
    provenance: dict = field(default_factory=dict)

    def top_neurons(self, group: str, k: int) -> dict[str, list[int]]:
        """Per language, the ``k`` neurons with the highest ``M`` for ``group`` (highest first)."""
        check_count(k, "--top")
        if group not in self.groups:
            raise NeurostoreError(f"--label {group}: the store has {', '.join(self.groups)}")
        e = self.groups.index(group)
        return {l: [n for n, _ in an.top_k(self.M[i, e], k)] for i, l in enumerate(self.langs) if self.count[i, e] > 0}

    def to_json(self) -> dict:
        return {
            "site": self.site, "layer": self.layer, "by": self.by, "zscore": self.zscore, "langs": self.langs,
            "groups": self.groups, "count": self.count.tolist(), "M": [[_clean(v) for v in per] for per in self.M],
            "provenance": self.provenance,
        }


@dataclass
class Correlation:
    site: str
    layer: int
    method: str
    across: list[str]
    groups: list[str]
    matrices: np.ndarray  # [groups, L, L]
    mean: np.ndarray  # [L, L]
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "site": self.site, "layer": self.layer, "method": self.method, "across": self.across, "groups": self.groups,
            "matrices": {g: _clean(self.matrices[i]) for i, g in enumerate(self.groups)}, "mean": _clean(self.mean),
            "provenance": self.provenance,
        }


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
    provenance: dict = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        return {g: {"polyglot": len(self.polyglot[g]), **{l: len(v) for l, v in self.monolingual[g].items()}} for g in self.groups}

    def to_json(self) -> dict:
        return {
            "site": self.site, "layer": self.layer, "threshold": self.threshold, "polyglot": self.polyglot,
            "monolingual": self.monolingual, "counts": self.counts(),
            "sensitive": {"neurons": self.sensitive, "shares": self.shares}, "provenance": self.provenance,
        }


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
    provenance: dict = field(default_factory=dict)

    def per_layer(self) -> dict[str, list[int]]:
        """Number of a language's neurons in each layer (in ``layers`` order)."""
        return {l: [sum(1 for ly, _ in v if ly == layer) for layer in self.layers] for l, v in self.neurons.items()}

    def to_json(self) -> dict:
        return {
            "site": self.site, "layer": self.layers, "layers": self.layers, "threshold": self.threshold,
            "filter_rate": self.filter_rate, "top_rate": self.top_rate,
            "neurons": {l: [[a, b] for a, b in v] for l, v in self.neurons.items()}, "provenance": self.provenance,
        }


@dataclass
class SelectedNeurons:
    """The result of :func:`select` (the neuron selector; the row selection is :class:`~neurostore.plan.Selection`)."""

    site: str
    layers: list[int]
    by: str
    method: str
    selected: dict[str, list[tuple[int, int, float]]]
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "site": self.site, "layer": self.layers if len(self.layers) > 1 else self.layers[0], "layers": self.layers,
            "by": self.by, "method": self.method,
            "selected": {g: [[a, b, c] for a, b, c in v] for g, v in self.selected.items()},
            "provenance": self.provenance,
        }


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


@dataclass
class TopExamples:
    """:func:`top_examples` with where they came from (the JSON of ``query top-examples``)."""

    site: str
    layer: int
    neuron: int
    examples: list[Example]
    provenance: dict = field(default_factory=dict)

    COLUMNS = ("row", "value", "lang", "label", "doc", "position", "token_id", "kind", "token", "left", "right", "text")

    def to_json(self) -> dict:
        return {
            "site": self.site, "layer": self.layer, "neuron": self.neuron,
            "examples": [{c: getattr(e, c) for c in self.COLUMNS} for e in self.examples],
            "provenance": self.provenance,
        }
