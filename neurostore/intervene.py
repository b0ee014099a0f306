"""Intervene on neurons at inference time and measure what a sequence classifier loses.

Correlational neuron sets (high variance, polyglot, LAPE, selectors) say which neurons *covary*
with a label or language; intervening says whether the model *needs* them. Three modes:

``ablate``  the neurons are set to 0;
``set``     the neurons are overwritten with a statistic (mean, p10, p90) of a label or language
            group, read from a store's cached group statistics so that the value is on the scale
            of the hooked activations;
``gain``    the neurons are multiplied by ``alpha`` (> 1 amplifies, steering predictions).

Where the hooks sit (the same sites as extraction, see :mod:`neurostore.models`):

``mlp`` layer i     forward hook on the activation module of block i; its output feeds the
                    down-projection, so the change propagates through the rest of the model.
``resid`` layer i>0 forward hook on block i-1 (element 0 when the block returns a tuple): the
                    input of block i, i.e. ``hidden_states[i]``.
``resid`` layer 0   forward pre-hook on block 0 (the embeddings as block 0 receives them).

A hook acts only at real tokens (never at padding), at every one (``positions="all"``) or at the
pooled position only (``"first"`` for encoders that pool the first token, ``"last"`` for decoders
that pool the last real one). It reads the current batch's attention mask from a small
:class:`BatchState` that the evaluation loop sets before each forward pass. Hooks are installed by
the :func:`intervention` context manager and removed on exit whatever happens; an empty neuron set
installs no hook at all, so it is the unmodified model.

Controls are random neuron sets with the same number of neurons per layer as the selected set,
drawn uniformly among the *other* neurons of each layer with ``numpy.random.default_rng(seed)``.
Metrics (accuracy, macro-F1, per-label accuracy = recall) are computed here in numpy.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import batching, query
from . import models as M
from .corpus import Corpus, read_corpus
from .errors import NeurostoreError
from .neurons import NeuronSet, check_neuron_set, load_neuron_set, random_controls
from .neurons import neuron_set_from_json  # noqa: F401 - tests read neuron sets through this module
from .store import Store
from .store import open as open_store

MODES = ("ablate", "set", "gain")
POSITIONS = ("all", "first", "last")
STATS = ("mean", "p10", "p90")
# Families whose sequence classifier pools the last real token (the others pool the first).
POOL_LAST = {"gpt2", "gpt_neox", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2"}


# ----------------------------------------------------------------------------------------------
# hooks


@dataclass
class Intervention:
    """What to do to a neuron set: ``values`` (set mode) is a full-width vector per layer."""

    neurons: NeuronSet
    mode: str = "ablate"
    alpha: float = 1.0
    values: dict[int, np.ndarray] | None = None
    positions: str = "all"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise NeurostoreError(f"--mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.positions not in POSITIONS:
            raise NeurostoreError(f"--positions {self.positions!r}: use one of {', '.join(POSITIONS)}")
        if self.mode == "set":
            missing = [layer for layer in self.neurons.layers if self.values is None or layer not in self.values]
            if missing:
                raise NeurostoreError(f"--mode set: no statistic for layer(s) {', '.join(map(str, missing))}")
        if self.mode == "gain" and not math.isfinite(self.alpha):
            raise NeurostoreError(f"--alpha {self.alpha}: must be a finite number")

    def with_neurons(self, neurons: NeuronSet) -> "Intervention":
        return Intervention(neurons, self.mode, self.alpha, self.values, self.positions)


class BatchState:
    """The batch being run: where (real tokens, chosen positions) the hooks may act."""

    def __init__(self, positions: str = "all") -> None:
        self.positions = positions
        self.where: torch.Tensor | None = None  # [batch, tokens, 1] bool

    def set_mask(self, attention_mask: torch.Tensor) -> None:
        """Call before each forward pass with the batch's (right-padded) attention mask."""
        real = attention_mask.bool()
        if self.positions == "all":
            where = real
        else:
            where = torch.zeros_like(real)
            rows = torch.arange(real.shape[0], device=real.device)
            if self.positions == "first":
                where[:, 0] = real[:, 0]
            else:
                last = (real.sum(dim=1) - 1).clamp(min=0)
                where[rows, last] = real[rows, last]
        self.where = where.unsqueeze(-1)


def _editor(state: BatchState, intervention: Intervention, layer: int, device: torch.device) -> Callable:
    ids = intervention.neurons.layers[layer]
    index = torch.tensor(ids, dtype=torch.long, device=device)
    mode, alpha = intervention.mode, float(intervention.alpha)
    target = None
    if mode == "set":
        target = torch.as_tensor(np.asarray(intervention.values[layer], dtype=np.float32)[ids], device=device)

    def edit(h: torch.Tensor) -> torch.Tensor:
        where = state.where
        if where is None:
            raise RuntimeError("intervention hook ran without a batch mask: call BatchState.set_mask first")
        if h.dim() != 3 or tuple(h.shape[:2]) != tuple(where.shape[:2]):
            raise NeurostoreError(
                f"cannot intervene on site {intervention.neurons.site!r} layer {layer}: its values have shape "
                f"{tuple(h.shape)}, expected (batch, tokens, width) with (batch, tokens) = {tuple(where.shape[:2])}"
            )
        old = h.index_select(-1, index)
        if mode == "ablate":
            new = torch.zeros_like(old)
        elif mode == "set":
            new = target.to(old.dtype).expand_as(old)
        else:  # in float32, kept finite: a large alpha on a half-precision site would give inf, then nan
            limit = torch.finfo(old.dtype).max
            new = (old.float() * alpha).clamp(-limit, limit).to(old.dtype)
        out = h.clone()
        out[..., index] = torch.where(where, new, old)
        return out

    return edit


def _output_hook(edit: Callable) -> Callable:
    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (edit(output[0]),) + tuple(output[1:])
        return edit(output)

    return hook


def _input_hook(edit: Callable) -> Callable:
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (edit(args[0]),) + tuple(args[1:]), kwargs
        for key in ("hidden_states", "hidden_state", "x"):
            if key in kwargs:
                return args, {**kwargs, key: edit(kwargs[key])}
        raise NeurostoreError("cannot find the input of block 0 to intervene on resid layer 0")

    return hook


@contextlib.contextmanager
def intervention(
    loaded: M.LoadedModel, spec: Intervention, *, module_pattern: str | None = None
) -> Iterator[BatchState]:
    """Install the hooks of ``spec``; yields the :class:`BatchState` to set before each forward."""
    state = BatchState(spec.positions)
    handles = []
    site = spec.neurons.site
    try:
        layers = [layer for layer, ids in sorted(spec.neurons.layers.items()) if ids]
        mlp = M.mlp_modules(loaded, module_pattern) if site == "mlp" and layers else None
        for layer in layers:
            edit = _editor(state, spec, layer, loaded.device)
            if site == "mlp":
                handles.append(mlp[layer].register_forward_hook(_output_hook(edit)))
                continue
            if loaded.blocks is None:
                raise NeurostoreError(f"cannot find the transformer blocks of model type {loaded.model_type!r}")
            if layer == 0:
                handles.append(loaded.blocks[0].register_forward_pre_hook(_input_hook(edit), with_kwargs=True))
            else:
                handles.append(loaded.blocks[layer - 1].register_forward_hook(_output_hook(edit)))
        yield state
    finally:
        for handle in handles:
            handle.remove()


def pooled_position(loaded: M.LoadedModel) -> str:
    """Where the classifier head reads: ``"last"`` for decoder families, ``"first"`` otherwise."""
    return "last" if loaded.model_type in POOL_LAST else "first"


# ----------------------------------------------------------------------------------------------
# evaluation


@dataclass
class EvalSet:
    """A labelled corpus tokenised and cut into batches once, reused by every run."""

    ids: list[list[int]]
    batches: list[np.ndarray]
    gold: np.ndarray
    langs: list[str | None]
    classes: list[str]
    n_truncated: int = 0


def prepare(
    loaded: M.LoadedModel, corpus: Corpus, *, max_length: int | None = None, max_batch_tokens: int | None = None
) -> EvalSet:
    """Map gold label names to the classifier's classes; tokenise and plan batches as extraction does."""
    if loaded.classes is None:
        raise NeurostoreError(
            f"--model {loaded.name}: not a sequence classifier (its config names no ...ForSequenceClassification)"
        )
    missing = sum(label is None for label in corpus.labels)
    if missing:
        raise NeurostoreError(
            f"{missing} of {len(corpus)} sentences have no gold label; the evaluation corpus needs one per sentence "
            "(set the column with --label-col)"
        )
    index = {name: i for i, name in enumerate(loaded.classes)}
    unknown = sorted({label for label in corpus.labels if label not in index})
    if unknown:
        raise NeurostoreError(
            f"gold label {unknown[0]!r} is not a label of the model (model labels: {', '.join(loaded.classes)})"
        )
    limit = max_length or loaded.max_length()
    if limit > loaded.max_length():
        raise NeurostoreError(f"--max-length {limit}: the model accepts at most {loaded.max_length()} tokens")
    ids, truncated = batching.tokenize(loaded.tokenizer, corpus.texts, limit)
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    return EvalSet(
        ids=ids,
        batches=batching.plan_batches(lengths, max_batch_tokens or batching.default_batch_tokens(loaded.device)),
        gold=np.array([index[label] for label in corpus.labels], dtype=np.int64),
        langs=list(corpus.langs),
        classes=list(loaded.classes),
        n_truncated=int(truncated.sum()),
    )


def predict(
    loaded: M.LoadedModel,
    data: EvalSet,
    dtype: torch.dtype = torch.float32,
    spec: Intervention | None = None,
    *,
    module_pattern: str | None = None,
) -> np.ndarray:
    """Logits ``[n_sentences, n_classes]`` (float32, corpus order), with ``spec``'s hooks if given."""
    logits = np.zeros((len(data.ids), len(data.classes)), dtype=np.float32)
    hooks = intervention(loaded, spec, module_pattern=module_pattern) if spec is not None else contextlib.nullcontext(None)
    outs = []
    with hooks as state, torch.inference_mode(), M.autocast(loaded.device, dtype):
        for batch in data.batches:
            ids, mask = batching.pad([data.ids[i] for i in batch], loaded.pad_id, loaded.device, pin=loaded.device.type == "cuda")
            if state is not None:
                state.set_mask(mask)
            out = loaded.model(input_ids=ids, attention_mask=mask)
            outs.append(out.logits.float())  # stays on the device: no host sync per batch
    if outs:
        every = torch.cat(outs).cpu().numpy()
        logits[np.concatenate(data.batches)] = every
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def metrics(
    gold: np.ndarray,
    logits: np.ndarray,
    classes: Sequence[str],
    *,
    langs: Sequence[str | None] | None = None,
    target: str | None = None,
) -> dict:
    """Accuracy, macro-F1 (over the labels present in ``gold``), per-label accuracy (recall).

    With ``langs``: accuracy per language. With a ``target`` that is a class: the share of
    sentences predicted as the target and the mean probability of the target.
    """
    pred = logits.argmax(axis=-1)
    out: dict[str, Any] = {"accuracy": float(np.mean(pred == gold)) if len(gold) else float("nan")}
    per_label, f1s = {}, []
    for c in sorted(set(gold.tolist())):
        tp = int(np.sum((pred == c) & (gold == c)))
        fn = int(np.sum((pred != c) & (gold == c)))
        fp = int(np.sum((pred == c) & (gold != c)))
        per_label[classes[c]] = tp / (tp + fn)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    out["macro_f1"] = float(np.mean(f1s)) if f1s else float("nan")
    out["per_label"] = per_label
    if langs is not None and any(lang is not None for lang in langs):
        names = sorted({lang for lang in langs if lang is not None})
        lang_arr = np.array([lang if lang is not None else "" for lang in langs], dtype=object)
        out["per_lang"] = {lang: float(np.mean(pred[lang_arr == lang] == gold[lang_arr == lang])) for lang in names}
    if target is not None and target in classes:
        t = list(classes).index(target)
        out["target_share"] = float(np.mean(pred == t))
        out["target_prob"] = float(np.mean(softmax(logits)[:, t]))
    return out


def effect(base: dict, after: dict, base_logits: np.ndarray, logits: np.ndarray, target: str | None) -> dict:
    """Drops relative to the baseline (positive = worse); self vs cross on the target's label or language."""
    out: dict[str, Any] = {
        "accuracy_drop": base["accuracy"] - after["accuracy"],
        "macro_f1_drop": base["macro_f1"] - after["macro_f1"],
        "changed": float(np.mean(base_logits.argmax(-1) != logits.argmax(-1))) if len(logits) else 0.0,
        "self_drop": None,
        "cross_drop": None,
        "by": None,
    }
    for key in ("per_label", "per_lang"):
        groups = base.get(key) or {}
        if target is not None and target in groups:
            others = [g for g in groups if g != target]
            out["by"] = "label" if key == "per_label" else "lang"
            out["self_drop"] = groups[target] - after[key][target]
            out["cross_drop"] = (
                float(np.mean([groups[g] - after[key][g] for g in others])) if others else None
            )
            break
    if "target_share" in base:
        out["toward_target"] = after["target_share"] - base["target_share"]
        out["target_prob_change"] = after["target_prob"] - base["target_prob"]
    return out


def _spread(values: list[float | None]) -> dict | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    arr = np.asarray(vals, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def summarise_controls(controls: list[dict]) -> dict:
    """Mean and spread over the controls of every number a result holds."""
    if not controls:
        return {}
    out: dict[str, Any] = {}
    for key in ("accuracy", "macro_f1", "target_share", "target_prob"):
        if key in controls[0]:
            out[key] = _spread([c[key] for c in controls])
    for key in ("per_label", "per_lang"):
        if key in controls[0]:
            out[key] = {g: _spread([c[key][g] for c in controls]) for g in controls[0][key]}
    out["effect"] = {
        k: _spread([c["effect"][k] for c in controls])
        for k, v in controls[0]["effect"].items()
        if k != "by"
    }
    return out


def stat_rows(store: Any, positions: str) -> str:
    """The store rows whose statistics match what the hooks overwrite: every token for
    ``positions="all"``, the pooled first/last vectors for ``"first"``/``"last"``."""
    pools = list(store.meta.get("pool") or [])
    wanted = "tokens" if positions == "all" else positions
    if wanted == "tokens" and store.meta.get("tokens"):
        return "tokens"
    if wanted in pools:
        return wanted
    fallback = "tokens" if store.meta.get("tokens") else (pools[0] if pools else None)
    if fallback is None:
        raise NeurostoreError("--stats: the store holds neither token rows nor pooled vectors")
    warnings.warn(
        f"--stats holds no {wanted} rows for --positions {positions}; using its {fallback} rows instead",
        UserWarning,
        stacklevel=2,
    )
    return fallback


def group_statistic(
    store: Any, site: str, layers: Sequence[int], of: str, stat: str, *, rows: str | None = None
) -> dict[int, np.ndarray]:
    """``{layer: per-neuron stat}`` of group ``of`` (``NAME``, or ``label:NAME``, ``lang:NAME``, ``pred:NAME``).

    Read through ``neurostore.query.group_values`` (the store's cached group statistics).
    """
    if stat not in STATS:
        raise NeurostoreError(f"--stat {stat!r}: use one of {', '.join(STATS)}")
    by, name = _group_column(store, of)
    out = {}
    for layer in layers:
        kwargs = {"rows": rows} if rows else {}
        values = np.asarray(query.group_values(store, site, layer, by, name, stat, **kwargs), dtype=np.float32)
        if not np.all(np.isfinite(values)):
            raise NeurostoreError(f"--of {of!r}: no {stat} in the store for site {site!r} layer {layer} (no rows of that group?)")
        out[layer] = values
    return out


def _group_column(store: Any, of: str) -> tuple[str, str]:
    prefix, _, rest = of.partition(":")
    if rest and prefix in ("label", "lang", "pred"):
        names = store.categories(prefix)
        if rest not in names:
            raise NeurostoreError(f"--of {of!r}: the store has no {prefix} {rest!r} (its {prefix}s: {', '.join(names)})")
        return prefix, rest
    found = [by for by in ("label", "lang") if of in store.categories(by)]
    if not found:
        raise NeurostoreError(
            f"--of {of!r} is neither a label ({', '.join(store.categories('label')) or 'none'}) "
            f"nor a language ({', '.join(store.categories('lang')) or 'none'}) of the store"
        )
    if len(found) > 1:
        raise NeurostoreError(f"--of {of!r} is both a label and a language of the store: write label:{of} or lang:{of}")
    return found[0], of


def check_store(store: Any, loaded: M.LoadedModel, site: str, width: int, dtype: torch.dtype) -> None:
    """The store was extracted at the same site width and compute dtype (warn on another model name)."""
    spec = store.site(site)
    if int(spec["width"]) != int(width):
        raise NeurostoreError(
            f"--stats: site {site!r} is {spec['width']} wide in the store but {width} wide in --model {loaded.name}"
        )
    stored = store.meta.get("compute_dtype")
    name = {v: k for k, v in M.DTYPES.items()}.get(dtype)
    if stored and name and stored != name:
        warnings.warn(
            f"--stats was extracted in {stored} but the intervention runs in {name}; pass --dtype {stored} "
            "so that the statistics are on the scale of the hooked values",
            UserWarning,
            stacklevel=2,
        )
    stored_model = (store.meta.get("model") or {}).get("name")
    if stored_model and Path(str(stored_model)).name != Path(str(loaded.name)).name:
        warnings.warn(f"--stats was extracted from model {stored_model!r}, not {loaded.name!r}", UserWarning, stacklevel=2)


def evaluate(
    loaded: M.LoadedModel,
    data: EvalSet,
    spec: Intervention,
    *,
    controls: int = 0,
    seed: int = 0,
    width: int | None = None,
    target: str | None = None,
    dtype: torch.dtype = torch.float32,
    module_pattern: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Baseline, intervened and control runs on ``data``; the JSON-able result of ``intervene``."""
    say = progress or (lambda _msg: None)
    if controls and width is None:
        raise ValueError("controls need the site width")

    def run(s: Intervention | None) -> np.ndarray:
        return predict(loaded, data, dtype, s, module_pattern=module_pattern)

    def scored(logits: np.ndarray) -> dict:
        return metrics(data.gold, logits, data.classes, langs=data.langs, target=target)

    say("baseline")
    base_logits = run(None)
    baseline = scored(base_logits)
    say(f"intervened ({spec.neurons.n} neurons)")
    logits = run(spec)
    intervened = scored(logits) | {"effect": effect(baseline, scored(logits), base_logits, logits, target)}
    results = []
    for i, control in enumerate(random_controls(spec.neurons, width or 0, controls, seed)):
        say(f"control {i + 1}/{controls}")
        c_logits = run(spec.with_neurons(control))
        c = scored(c_logits)
        results.append(
            c
            | {"effect": effect(baseline, c, base_logits, c_logits, target)}
            | {"neurons": {str(k): v for k, v in control.layers.items()}}
        )
    return {
        "model": loaded.name,
        "mode": spec.mode,
        "alpha": spec.alpha if spec.mode == "gain" else None,
        "positions": spec.positions,
        "target": target,
        "n_sentences": len(data.ids),
        "n_truncated": data.n_truncated,
        "seed": seed,
        "neurons": spec.neurons.describe() | {"layers": {str(k): v for k, v in spec.neurons.layers.items()}},
        "baseline": baseline,
        "intervened": intervened,
        "controls": results,
        "controls_summary": summarise_controls(results),
    }


# ----------------------------------------------------------------------------------------------
# the workflow of ``neurostore intervene``


def run(
    corpus: Corpus | Sequence[str | Path],
    model: str | M.LoadedModel,
    neurons: str | NeuronSet,
    *,
    site: str | None = None,
    group: str | None = None,
    target: str | None = None,
    mode: str = "ablate",
    alpha: float = 2.0,
    stat: str = "mean",
    of: str | None = None,
    stats: str | Path | Store | None = None,
    positions: str = "all",
    controls: int = 0,
    seed: int = 0,
    device: str = "auto",
    dtype: str | None = None,
    max_length: int | None = None,
    max_batch_tokens: int | None = None,
    module_pattern: str | None = None,
    input_format: str | None = None,
    text_col: str = "text",
    label_col: str = "label",
    lang_col: str = "lang",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Intervene on a neuron set of a sequence classifier and measure the effect, end to end: the
    JSON-able result of ``neurostore intervene`` (:func:`evaluate`'s, plus ``stat``, ``of``,
    ``stat_rows`` and ``stats`` in set mode).

    ``corpus``: corpus files (read with ``input_format``, ``*_col``) or a read :class:`Corpus`;
    ``model``: a name/folder (loaded on ``device``) or a loaded model; ``neurons``: a query JSON file,
    ``layer:neuron`` pairs with ``site``, or a :class:`NeuronSet`; ``group`` picks the JSON's entry
    and is the default ``target``; ``stats``: a store (path or opened) of the same model and site,
    checked against the model, whose group statistics ``stat`` of ``of`` (default ``target``) set
    mode writes. Warnings (empty set, positions that miss the pooled token, another model or dtype
    in ``stats``) go through :mod:`warnings`."""
    neuron_set = neurons if isinstance(neurons, NeuronSet) else load_neuron_set(neurons, site=site, group=group)
    if neuron_set.n == 0:
        warnings.warn("the neuron set is empty: the intervened model is the unmodified model", UserWarning, stacklevel=2)
    target = target or (group.split("/")[0] if group else None)
    if mode == "set" and stats is None:
        raise NeurostoreError("--mode set needs --stats STORE (the group statistics to write)")
    if mode == "set" and not (of or target):
        raise NeurostoreError("--mode set needs --of GROUP (the label or language whose statistic to write)")
    if not isinstance(corpus, Corpus):
        corpus = read_corpus(list(corpus), fmt=input_format, text_col=text_col, label_col=label_col, lang_col=lang_col)
    dev = model.device if isinstance(model, M.LoadedModel) else M.resolve_device(device)
    torch_dtype = M.resolve_dtype(dtype, dev)
    loaded = model if isinstance(model, M.LoadedModel) else M.load(model, dev)
    if loaded.classes is None:
        raise NeurostoreError(f"--model {loaded.name}: not a sequence classifier (its config names no ...ForSequenceClassification)")
    pooled = pooled_position(loaded)
    if positions != "all" and positions != pooled:
        warnings.warn(
            f"--positions {positions}: a {loaded.model_type} classifier reads the {pooled} token; "
            f"use --positions {pooled} to act at the pooled position",
            UserWarning,
            stacklevel=2,
        )
    site_info = M.resolve_sites(loaded, [neuron_set.site], None, module_pattern)[neuron_set.site]
    check_neuron_set(neuron_set, site_info.layers, site_info.width)
    data = prepare(loaded, corpus, max_length=max_length, max_batch_tokens=max_batch_tokens)

    values, extra = None, {}
    if stats is not None:
        store = stats if isinstance(stats, Store) else open_store(str(stats))
        check_store(store, loaded, neuron_set.site, site_info.width, torch_dtype)
        if mode == "set":
            rows = stat_rows(store, positions)
            values = group_statistic(store, neuron_set.site, sorted(neuron_set.layers), of or target, stat, rows=rows)
            extra = {"stat": stat, "of": of or target, "stat_rows": rows,
                     "stats": str(stats) if not isinstance(stats, Store) else store.paths[0]}
    spec = Intervention(neuron_set, mode, alpha, values, positions)
    result = evaluate(
        loaded, data, spec, controls=controls, seed=seed, width=site_info.width, target=target, dtype=torch_dtype,
        module_pattern=module_pattern, progress=progress,
    )
    result.update(extra)
    return result
