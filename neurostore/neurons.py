"""Neuron sets: read them from any query JSON or a ``layer:neuron`` list; draw random controls.

Kept apart from :mod:`neurostore.intervene` so that the query layer can use it without torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import NeurostoreError
from .store import SITES




@dataclass
class NeuronSet:
    """Neurons of one site: ``{layer: sorted neuron indices}``, with where they came from."""

    site: str
    layers: dict[int, list[int]]
    group: str | None = None
    source: str = ""

    @property
    def n(self) -> int:
        return sum(len(v) for v in self.layers.values())

    def per_layer(self) -> dict[int, int]:
        return {layer: len(v) for layer, v in sorted(self.layers.items()) if v}

    def describe(self) -> dict:
        return {
            "site": self.site,
            "n": self.n,
            "per_layer": {str(k): v for k, v in self.per_layer().items()},
            "group": self.group,
            "source": self.source,
        }


def _collect(pairs: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    layers: dict[int, set[int]] = {}
    for layer, neuron in pairs:
        layers.setdefault(int(layer), set()).add(int(neuron))
    return {layer: sorted(ns) for layer, ns in sorted(layers.items())}


def parse_neuron_list(text: str, site: str | None) -> NeuronSet:
    """``"11:523,11:87"`` (layer:neuron pairs) for ``site``."""
    if site is None:
        raise NeurostoreError(f"--neurons {text!r}: a layer:neuron list needs --site (resid or mlp)")
    _check_site(site, "--site")
    pairs = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*:\s*(\d+)", part)
        if not m:
            raise NeurostoreError(f"--neurons {text!r}: {part!r} is not layer:neuron (e.g. 11:523)")
        pairs.append((int(m[1]), int(m[2])))
    return NeuronSet(site, _collect(pairs), source="--neurons")


def _check_site(site: Any, where: str) -> str:
    if site not in SITES:
        raise NeurostoreError(f"{where}: site {site!r} is not one of {', '.join(SITES)}")
    return site


def _pick(mapping: Any, group: str | None, what: str, source: str) -> tuple[str | None, list]:
    """The entry ``group`` of ``mapping``; without a group, the union of all entries (as the query layer does)."""
    if not isinstance(mapping, dict) or not mapping:
        raise NeurostoreError(f"{source}: {what!r} is empty or not an object")
    if group is None:
        if len(mapping) == 1:
            return next(iter(mapping.items()))
        merged: list = []
        for values in mapping.values():
            if not isinstance(values, list):
                raise NeurostoreError(f"{source}: {what!r} entries should be lists")
            merged.extend(values)
        return None, merged
    if group not in mapping:
        names = ", ".join(map(str, mapping))
        raise NeurostoreError(f"--group {group!r} is not in {source} ({what}: {names})")
    return group, mapping[group]


def _ints(values: Any, source: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise NeurostoreError(f"{source}: {what} should be a list of neuron numbers") from None
    if any(v < 0 for v in out):
        raise NeurostoreError(f"{source}: {what} holds a negative neuron number")
    return out


def _rows(values: Any, source: str, what: str, width: int) -> list[tuple[int, int]]:
    """``[[layer, neuron, ...], ...]`` -> (layer, neuron) pairs."""
    try:
        pairs = [(int(row[0]), int(row[1])) for row in values]
        if any(len(row) < 2 or len(row) > width for row in values):
            raise ValueError
    except (TypeError, ValueError, IndexError, KeyError):
        raise NeurostoreError(f"{source}: {what} should be a list of [layer, neuron{', score' if width == 3 else ''}] rows") from None
    if any(layer < 0 or neuron < 0 for layer, neuron in pairs):
        raise NeurostoreError(f"{source}: {what} holds a negative layer or neuron number")
    return pairs


def neuron_set_from_json(obj: Any, group: str | None = None, source: str = "the JSON") -> NeuronSet:
    """A neuron set from any ``neurostore query ... --format json`` output.

    ``variance`` (``top``; a ``--per``/``--within`` output has one ``top`` per group),
    ``polyglot`` (``polyglot``; ``group="LABEL/LANG"`` for the monolingual neurons), ``lape``
    (``neurons`` by language) and ``select`` (``selected`` by group). ``group`` picks the entry
    where the JSON has several; without it, the union of all entries (as
    ``neurostore.query.neuron_set_from_json`` reads them).
    """
    if not isinstance(obj, dict) or "site" not in obj:
        raise NeurostoreError(f"{source}: not a neurostore query output (a JSON object with a 'site')")
    site = _check_site(obj["site"], source)

    def layer_of() -> int:
        layer = obj.get("layer")
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise NeurostoreError(f"{source}: 'layer' should be a layer number, got {layer!r}")
        return layer

    if "selected" in obj:
        name, rows = _pick(obj["selected"], group, "selected", source)
        return NeuronSet(site, _collect(_rows(rows, source, f"selected[{name!r}]", 3)), name, source)
    if "polyglot" in obj:
        layer = layer_of()
        if group is not None and re.search(r"[/:]", group):
            label, lang = re.split(r"[/:]", group, maxsplit=1)
            _, by_lang = _pick(obj.get("monolingual") or {}, label, "monolingual", source)
            _, neurons = _pick(by_lang, lang, f"monolingual[{label!r}]", source)
            return NeuronSet(site, _collect([(layer, n) for n in _ints(neurons, source, "monolingual")]), group, source)
        name, neurons = _pick(obj["polyglot"], group, "polyglot", source)
        return NeuronSet(site, _collect([(layer, n) for n in _ints(neurons, source, f"polyglot[{name!r}]")]), name, source)
    if "top" in obj:
        layer = layer_of()
        top = obj["top"]
        name = group
        if isinstance(top, dict):
            name, top = _pick(top, group, "top", source)
        try:
            neurons = [row[0] if isinstance(row, (list, tuple)) else row for row in top]
        except TypeError:
            raise NeurostoreError(f"{source}: 'top' should be a list of [neuron, value] rows") from None
        return NeuronSet(site, _collect([(layer, n) for n in _ints(neurons, source, "top")]), name, source)
    if isinstance(obj.get("neurons"), dict):
        name, rows = _pick(obj["neurons"], group, "neurons", source)
        return NeuronSet(site, _collect(_rows(rows, source, f"neurons[{name!r}]", 2)), name, source)
    raise NeurostoreError(
        f"{source}: no neuron set in it (expected a query output with 'top', 'polyglot', 'neurons' or 'selected')"
    )


def is_file(path: str | Path) -> bool:
    """``Path.is_file`` that is False, not an OSError, for a name too long to be a path (a long
    ``layer:neuron,...`` list)."""
    try:
        return Path(path).is_file()
    except OSError:
        return False


def load_neuron_set(spec: str, *, site: str | None = None, group: str | None = None) -> NeuronSet:
    """``--neurons``: a query JSON file, or a ``layer:neuron,...`` list (which needs ``--site``)."""
    path = Path(spec)
    if is_file(path):
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise NeurostoreError(f"--neurons {spec}: not a JSON file ({getattr(err, 'msg', err)})") from None
        neurons = neuron_set_from_json(obj, group, source=f"--neurons {spec}")
        if site is not None and site != neurons.site:
            raise NeurostoreError(f"--site {site} does not match site {neurons.site!r} of --neurons {spec}")
        return neurons
    if re.fullmatch(r"[\d:,\s]+", spec) and ":" in spec:
        neurons = parse_neuron_list(spec, site)
        neurons.group = group
        return neurons
    raise NeurostoreError(f"--neurons {spec!r}: no such file, and not a layer:neuron list like 11:523,11:87")


def check_neuron_set(neurons: NeuronSet, layers: Sequence[int], width: int) -> None:
    """Every layer is one of the site's, every neuron below its width."""
    layers = list(layers)
    for layer, ids in neurons.layers.items():
        if layer not in layers:
            raise NeurostoreError(
                f"--neurons: layer {layer} is not a layer of site {neurons.site!r} (layers {layers[0]}-{layers[-1]})"
            )
        if ids and max(ids) >= width:
            raise NeurostoreError(
                f"--neurons: neuron {max(ids)} of layer {layer} is out of range "
                f"(site {neurons.site!r} has {width} neurons per layer)"
            )


def random_controls(neurons: NeuronSet, width: int, n: int, seed: int = 0) -> list[NeuronSet]:
    """``n`` random sets with the same count per layer, drawn among each layer's other neurons."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n):
        layers = {}
        for layer, chosen in sorted(neurons.layers.items()):
            pool = np.setdiff1d(np.arange(width), np.asarray(chosen, dtype=np.int64))
            if len(pool) < len(chosen):
                raise NeurostoreError(
                    f"--controls: layer {layer} has {width} neurons, too few to draw {len(chosen)} "
                    f"besides the {len(chosen)} selected"
                )
            layers[layer] = sorted(int(v) for v in rng.choice(pool, size=len(chosen), replace=False))
        out.append(NeuronSet(neurons.site, layers, neurons.group, f"control {c + 1} (seed {seed})"))
    return out
