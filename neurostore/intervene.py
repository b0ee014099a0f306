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

A causal language model (a checkpoint whose config names ``...ForCausalLM`` or ``...LMHeadModel``)
is scored by its mean next-token loss and perplexity per language and label instead (see
:func:`evaluate_lm`): the standard test of language neurons in a decoder, with CRANE's selectivity.
"""

from __future__ import annotations

import contextlib
import json
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
from .neurons import NeuronSet, check_neuron_set, is_file, load_neuron_set, random_controls
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
    label_ids: list[list[int]] | None = None  # audio-language models: each class's label-word tokens


def parse_label_words(spec: str | None, labels: Sequence[str | None]) -> dict[str, str]:
    """``joy=happy,anger=angry`` as ``{label: word}``; every gold label needs a word."""
    if not spec:
        raise NeurostoreError("an audio-language model classifies by label words: pass --label-words joy=happy,anger=angry,...")
    words = {}
    for item in spec.split(","):
        label, eq, word = item.partition("=")
        if not eq or not label.strip() or not word.strip():
            raise NeurostoreError(f"--label-words {item!r}: write LABEL=WORD pairs, comma-separated, e.g. joy=happy,anger=angry")
        words[label.strip()] = word.strip()
    missing = sorted({lab for lab in labels if lab is not None and lab not in words})
    if missing:
        raise NeurostoreError(f"--label-words has no word for label(s) {', '.join(missing)} of the corpus")
    return words


def prepare_audio(loaded: M.LoadedModel, corpus: Corpus, label_words: str | None, *, max_length: int | None = None,
                  max_batch_tokens: int | None = None) -> EvalSet:
    """An audio-language model as a classifier: the prompt (audio, then text) rows of extraction, and
    the tokens of each label word, scored by their log-probability after the prompt."""
    from . import audio

    if corpus.audio is None:
        raise NeurostoreError(f"--model {loaded.name}: an audio-language model needs an audio corpus (a column 'audio' naming each row's file)")
    if any(label is None for label in corpus.labels):
        raise NeurostoreError("the evaluation corpus needs a gold label per utterance (set the column with --label-col)")
    words = parse_label_words(label_words, corpus.labels)
    classes = list(words)
    label_ids = [loaded.tokenizer(" " + words[c] if not words[c].startswith(" ") else words[c], add_special_tokens=False)["input_ids"]
                 for c in classes]
    if any(not ids for ids in label_ids) or len({tuple(ids) for ids in label_ids}) < len(label_ids):
        raise NeurostoreError("--label-words: two labels tokenise to the same tokens (or a word to none); choose distinct words")
    ids, cut, _ = audio.rows(loaded, corpus, max_length or loaded.max_length())
    lengths = np.array([len(x) + max(map(len, label_ids)) for x in ids], dtype=np.int64)
    index = {c: i for i, c in enumerate(classes)}
    return EvalSet(ids=ids, batches=batching.plan_batches(lengths, max_batch_tokens or batching.default_batch_tokens(loaded.device)),
                   gold=np.array([index[label] for label in corpus.labels], dtype=np.int64), langs=list(corpus.langs), classes=classes,
                   n_truncated=int(cut.sum()), label_ids=label_ids)


def _label_logprobs(loaded: M.LoadedModel, data: EvalSet, batch: np.ndarray, state: BatchState | None) -> torch.Tensor:
    """``[batch, classes]``: the summed log-probability of each class's label-word tokens after the prompt."""
    from . import audio

    feats = audio.features(loaded, batch, loaded.device)
    out = []
    for word in data.label_ids:
        rows = [data.ids[i] + word for i in batch]
        ids, mask = batching.pad(rows, loaded.pad_id, loaded.device)
        if state is not None:
            state.set_mask(mask)
        logp = torch.log_softmax(audio.forward(loaded, {"ids": ids, "mask": mask, "audio": feats}, False).logits.float(), dim=-1)
        starts = torch.tensor([len(data.ids[i]) - 1 for i in batch], device=ids.device)  # the position predicting the word's first token
        total = torch.zeros(len(batch), device=ids.device)
        for j, token in enumerate(word):
            total += logp[torch.arange(len(batch), device=ids.device), starts + j, token]
        out.append(total)
    return torch.stack(out, dim=1)


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
    gold = class_indices(loaded, corpus.labels)
    ids, truncated, lengths = tokenised(loaded, corpus, max_length)
    return EvalSet(
        ids=ids,
        batches=batching.plan_batches(lengths, max_batch_tokens or batching.default_batch_tokens(loaded.device)),
        gold=gold,
        langs=list(corpus.langs),
        classes=list(loaded.classes),
        n_truncated=int(truncated.sum()),
    )


def class_indices(loaded: M.LoadedModel, labels: Sequence[Any]) -> np.ndarray:
    """Each gold label's class index in the classifier; a label the model does not have is one line."""
    index = {name: i for i, name in enumerate(loaded.classes or [])}
    unknown = sorted({label for label in labels if label not in index}, key=str)
    if unknown:
        raise NeurostoreError(f"gold label {unknown[0]!r} is not a label of the model (model labels: {', '.join(loaded.classes or [])})")
    return np.array([index[label] for label in labels], dtype=np.int64)


def tokenised(loaded: M.LoadedModel, corpus: Any, max_length: int | None) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """The corpus tokenised as extraction does (ids, truncated flags, lengths), ``--max-length`` checked."""
    limit = max_length or loaded.max_length()
    if limit > loaded.max_length():
        raise NeurostoreError(f"--max-length {limit}: the model accepts at most {loaded.max_length()} tokens")
    ids, truncated = batching.tokenize(loaded.tokenizer, corpus.texts, limit)
    return ids, truncated, np.array([len(x) for x in ids], dtype=np.int64)


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
            if data.label_ids is not None:  # an audio-language model: label-word log-probabilities
                outs.append(_label_logprobs(loaded, data, batch, state))
                continue
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

    def run(s: Intervention | None) -> tuple[dict, np.ndarray]:
        logits = predict(loaded, data, dtype, s, module_pattern=module_pattern)
        return metrics(data.gold, logits, data.classes, langs=data.langs, target=target), logits

    def effect_of(base: dict, base_logits: np.ndarray, after: dict, logits: np.ndarray) -> dict:
        return effect(base, after, base_logits, logits, target)

    baseline, intervened, results = _runs(spec, run, effect_of, controls=controls, seed=seed, width=width, progress=progress)
    return {
        **_described(loaded, "label-words" if data.label_ids is not None else "classifier", spec, target, data, seed),
        "baseline": baseline,
        "intervened": intervened,
        "controls": results,
        "controls_summary": summarise_controls(results),
    }


def _runs(
    spec: Intervention, run: Callable[[Intervention | None], tuple[dict, Any]], effect_of: Callable[[dict, Any, dict, Any], dict], *,
    controls: int, seed: int, width: int | None, progress: Callable[[str], None] | None,
) -> tuple[dict, dict, list[dict]]:
    """The baseline, the intervention and its random controls (same count per layer), each scored
    by ``run`` (its metrics and what ``effect_of`` needs besides them) and compared to the baseline."""
    say = progress or (lambda _msg: None)
    if controls and width is None:
        raise ValueError("controls need the site width")
    say("baseline")
    baseline, base_raw = run(None)
    say(f"intervened ({spec.neurons.n} neurons)")
    after, raw = run(spec)
    intervened = after | {"effect": effect_of(baseline, base_raw, after, raw)}
    results = []
    for i, control in enumerate(random_controls(spec.neurons, width or 0, controls, seed)):
        say(f"control {i + 1}/{controls}")
        c, c_raw = run(spec.with_neurons(control))
        results.append(c | {"effect": effect_of(baseline, base_raw, c, c_raw)} | {"neurons": {str(k): v for k, v in control.layers.items()}})
    return baseline, intervened, results


def _described(loaded: M.LoadedModel, task: str, spec: Intervention, target: str | None, data: Any, seed: int) -> dict:
    """What a result says of the run before its numbers: model, task, intervention, data, seed."""
    return {
        "model": loaded.name,
        "task": task,
        "mode": spec.mode,
        "alpha": spec.alpha if spec.mode == "gain" else None,
        "positions": spec.positions,
        "target": target,
        "n_sentences": len(data.ids),
        "n_truncated": data.n_truncated,
        "seed": seed,
        "neurons": spec.neurons.describe() | {"layers": {str(k): v for k, v in spec.neurons.layers.items()}},
    }


# ----------------------------------------------------------------------------------------------
# causal language models: next-token loss and perplexity per group

# Architectures with a language-model head, by the suffix of their class name in the config.
LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")
# Bytes the float32 logits of one batch (and their log-softmax) may take: a 150k-token vocabulary
# needs 1.2 MB a token, so the default token budget shrinks for large vocabularies.
LOGIT_BYTES = {"cpu": 1 << 30, "cuda": 4 << 30}


def is_causal_lm_config(config: Any) -> bool:
    """The config names a causal LM class (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...)."""
    return any(str(a).endswith(LM_ARCHITECTURES) for a in (getattr(config, "architectures", None) or []))


def is_causal_lm(loaded: M.LoadedModel) -> bool:
    """A loaded model with a language-model head and no classifier head."""
    if loaded.classes is not None:
        return False
    head = getattr(loaded.model, "get_output_embeddings", None)
    return head is not None and head() is not None


@dataclass
class LMEvalSet:
    """A corpus tokenised and cut into batches once for next-token scoring, with its groups."""

    ids: list[list[int]]
    batches: list[np.ndarray]
    langs: list[str | None]
    labels: list[str | None]
    n_truncated: int = 0


def lm_batch_tokens(loaded: M.LoadedModel) -> int:
    """The default token budget, lowered so that one batch's float32 logits stay under LOGIT_BYTES."""
    vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
    cap = LOGIT_BYTES.get(loaded.device.type, LOGIT_BYTES["cpu"]) // (8 * max(vocab, 1))
    return max(64, min(batching.default_batch_tokens(loaded.device), cap))


def prepare_lm(
    loaded: M.LoadedModel, corpus: Corpus, *, max_length: int | None = None, max_batch_tokens: int | None = None
) -> LMEvalSet:
    """Tokenise and plan batches as extraction does; languages and labels are optional groups."""
    ids, truncated, lengths = tokenised(loaded, corpus, max_length)
    return LMEvalSet(
        ids=ids,
        batches=batching.plan_batches(lengths, max_batch_tokens or lm_batch_tokens(loaded)),
        langs=list(corpus.langs),
        labels=list(corpus.labels),
        n_truncated=int(truncated.sum()),
    )


def token_losses(
    loaded: M.LoadedModel,
    data: LMEvalSet,
    dtype: torch.dtype = torch.float32,
    spec: Intervention | None = None,
    *,
    module_pattern: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per sentence (corpus order): the summed next-token loss in nats (float64) and the number of
    predicted tokens (every token but the first: token t+1 is predicted from tokens 0..t)."""
    sums = np.zeros(len(data.ids), dtype=np.float64)
    counts = np.zeros(len(data.ids), dtype=np.int64)
    hooks = intervention(loaded, spec, module_pattern=module_pattern) if spec is not None else contextlib.nullcontext(None)
    outs = []
    with hooks as state, torch.inference_mode(), M.autocast(loaded.device, dtype):
        for batch in data.batches:
            ids, mask = batching.pad([data.ids[i] for i in batch], loaded.pad_id, loaded.device, pin=loaded.device.type == "cuda")
            if state is not None:
                state.set_mask(mask)
            logits = loaded.model(input_ids=ids, attention_mask=mask).logits
            scored = mask[:, 1:].bool()  # right padding: a real next token has a real context
            nll = torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), ids[:, 1:][scored], reduction="none")
            rows = torch.arange(len(batch), device=ids.device)[:, None].expand_as(scored)[scored]
            per_row = torch.zeros(len(batch), dtype=torch.float64, device=ids.device).index_add_(0, rows, nll.double())
            outs.append((per_row, scored.sum(dim=1)))  # stays on the device: no host sync per batch
    if outs:
        order = np.concatenate(data.batches)
        sums[order] = torch.cat([o[0] for o in outs]).cpu().numpy()
        counts[order] = torch.cat([o[1] for o in outs]).cpu().numpy()
    return sums, counts


def loss_entry(sums: np.ndarray, counts: np.ndarray) -> dict:
    n = int(counts.sum())
    loss = float(sums.sum() / n) if n else float("nan")
    ppl = float("nan") if not n else (math.exp(loss) if loss < 700 else float("inf"))
    return {"loss": loss, "perplexity": ppl, "tokens": n}


def lm_metrics(sums: np.ndarray, counts: np.ndarray, langs: Sequence[str | None], labels: Sequence[str | None]) -> dict:
    """Mean next-token loss (nats per predicted token, pooled over the group's tokens) and
    perplexity = exp(loss), overall and per language and label present."""
    out: dict[str, Any] = loss_entry(sums, counts)
    for key, column in (("per_lang", langs), ("per_label", labels)):
        names = sorted({g for g in column if g is not None})
        if names:
            arr = np.array([g if g is not None else "" for g in column], dtype=object)
            out[key] = {g: loss_entry(sums[arr == g], counts[arr == g]) for g in names}
    return out


def lm_effect(base: dict, after: dict, target: str | None) -> dict:
    """Degradation = increase of the mean next-token loss (nats), overall and per group; self =
    the target group's, cross = the mean over the other groups of its column; CRANE's selectivity
    = self / cross (None where cross <= 0: the other groups do not degrade)."""
    out: dict[str, Any] = {
        "loss_increase": after["loss"] - base["loss"],
        "perplexity_change": after["perplexity"] - base["perplexity"],
        "by": None, "self_degradation": None, "cross_degradation": None, "selectivity": None,
    }
    for key in ("per_lang", "per_label"):
        if key in base:
            out[key] = {g: after[key][g]["loss"] - base[key][g]["loss"] for g in base[key]}
    for key in ("per_lang", "per_label"):
        if target is not None and target in (base.get(key) or {}):
            degr = out[key]
            others = [degr[g] for g in degr if g != target and not math.isnan(degr[g])]
            out["by"] = "lang" if key == "per_lang" else "label"
            out["self_degradation"] = degr[target]
            if others:
                cross = float(np.mean(others))
                out["cross_degradation"] = cross
                out["selectivity"] = degr[target] / cross if cross > 0 else None
            break
    return out


def summarise_lm_controls(controls: list[dict]) -> dict:
    """Mean and spread over the controls of the losses, perplexities and effects."""
    if not controls:
        return {}
    out: dict[str, Any] = {k: _spread([c[k] for c in controls]) for k in ("loss", "perplexity")}
    for key in ("per_lang", "per_label"):
        if key in controls[0]:
            out[key] = {
                g: {k: _spread([c[key][g][k] for c in controls]) for k in ("loss", "perplexity")} for g in controls[0][key]
            }
    eff = controls[0]["effect"]
    out["effect"] = {k: _spread([c["effect"][k] for c in controls]) for k, v in eff.items() if not isinstance(v, (dict, str)) and k != "by"}
    for key in ("per_lang", "per_label"):
        if key in eff:
            out["effect"][key] = {g: _spread([c["effect"][key][g] for c in controls]) for g in eff[key]}
    return out


def evaluate_lm(
    loaded: M.LoadedModel,
    data: LMEvalSet,
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
    """Baseline, intervened and control runs of a causal LM on ``data``: the JSON-able result of
    ``intervene`` on a decoder (``"task": "lm"``)."""

    def run(s: Intervention | None) -> tuple[dict, None]:
        sums, counts = token_losses(loaded, data, dtype, s, module_pattern=module_pattern)
        return lm_metrics(sums, counts, data.langs, data.labels), None

    baseline, intervened, results = _runs(spec, run, lambda base, _, after, __: lm_effect(base, after, target),
                                          controls=controls, seed=seed, width=width, progress=progress)
    described = _described(loaded, "lm", spec, target, data, seed)
    described["n_unscored"] = int(sum(len(x) < 2 for x in data.ids))
    return {
        **described,
        "baseline": baseline,
        "intervened": intervened,
        "controls": results,
        "controls_summary": summarise_lm_controls(results),
    }


def neuron_source(spec: str | Path, site: str) -> dict | None:
    """The model a query JSON's neurons were found on, from its provenance: model name, type,
    layer count and the site's width as the store recorded them (the model's config when the
    store is gone; the width is then unknown). None where the JSON has no provenance."""
    try:
        obj = json.loads(Path(spec).read_text(encoding="utf-8"))
        stored = obj["provenance"]["store"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for path in stored.get("paths") or []:
        if not Path(path).exists():
            continue
        try:
            meta = open_store(str(path)).meta
        except NeurostoreError:
            continue
        model = meta.get("model") or {}
        width = (meta.get("sites") or {}).get(site, {}).get("width")
        return {"model": model.get("name"), "model_type": model.get("model_type"), "n_layers": model.get("n_layers"),
                "width": int(width) if width is not None else None, "from": str(path)}
    config = M.read_config(stored["model_path"]) if stored.get("model_path") and Path(stored["model_path"]).exists() else None
    if config is None:
        return {"model": stored.get("model"), "model_type": None, "n_layers": None, "width": None, "from": None}
    return {"model": stored.get("model"), "model_type": config.model_type, "n_layers": M._n_layers(config),
            "width": None, "from": str(stored["model_path"])}


def check_source(source: dict | None, spec: str, loaded: M.LoadedModel, site: str, width: int) -> None:
    """A neuron set applies to another model (base -> chat) only of the same architecture and widths."""
    if not source:
        return
    mine = {"model_type": loaded.model_type, "n_layers": loaded.n_layers, "width": width}
    bad = [k for k, v in mine.items() if source.get(k) is not None and source[k] != v]
    if bad:
        def words(d: dict) -> str:
            return f"{d['model_type']}, {d['n_layers']} layers, {site} {d['width'] if d.get('width') is not None else '?'} wide"

        raise NeurostoreError(
            f"--neurons {spec}: found on {source.get('model')!r} ({words(source)}) but --model {loaded.name} is "
            f"{words(mine)}; a neuron set applies only to a model of the same architecture and widths"
        )


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
    label_words: str | None = None,
    prompt: str | None = None,
) -> dict:
    """Intervene on a neuron set of a sequence classifier or a causal LM and measure the effect, end
    to end: the JSON-able result of ``neurostore intervene`` (:func:`evaluate`'s or
    :func:`evaluate_lm`'s, plus ``stat``, ``of``, ``stat_rows`` and ``stats`` in set mode, and
    ``neurons_from`` for a query JSON whose provenance names its model).

    ``corpus``: corpus files (read with ``input_format``, ``*_col``) or a read :class:`Corpus`;
    ``model``: a name/folder (loaded on ``device``; a config naming ``...ForCausalLM`` or
    ``...LMHeadModel`` loads as a causal LM) or a loaded model; ``neurons``: a query JSON file,
    ``layer:neuron`` pairs with ``site``, or a :class:`NeuronSet`; ``group`` picks the JSON's entry
    and is the default ``target``; ``stats``: a store (path or opened) of the same model and site,
    checked against the model, whose group statistics ``stat`` of ``of`` (default ``target``) set
    mode writes. A neuron set found on another model applies when that model has the same
    architecture, layer count and site width (base -> chat), and is refused otherwise. Warnings
    (empty set, positions that miss the pooled token, another model or dtype in ``stats``) go
    through :mod:`warnings`. An audio-language model (Qwen2-Audio, Audio Flamingo 3, Qwen2.5-Omni's thinker) is a classifier by ``label_words``
    (``joy=happy,...``): its prediction is the label whose word has the highest log-probability
    after the prompt (``prompt``, or the corpus's prompt column)."""
    neuron_set = neurons if isinstance(neurons, NeuronSet) else load_neuron_set(neurons, site=site, group=group)
    if neuron_set.n == 0:
        warnings.warn("the neuron set is empty: the intervened model is the unmodified model", UserWarning, stacklevel=2)
    target = target or (group.split("/")[0] if group else None)
    if mode == "set" and stats is None:
        raise NeurostoreError("--mode set needs --stats STORE (the group statistics to write)")
    if mode == "set" and not (of or target):
        raise NeurostoreError("--mode set needs --of GROUP (the label or language whose statistic to write)")
    if not isinstance(corpus, Corpus):
        corpus = read_corpus(list(corpus), fmt=input_format, text_col=text_col, label_col=label_col, lang_col=lang_col, prompt=prompt)
    dev = model.device if isinstance(model, M.LoadedModel) else M.resolve_device(device)
    if isinstance(model, M.LoadedModel):
        loaded = model
        torch_dtype = M.resolve_dtype(dtype, dev)
    else:
        config = M.read_config(model)
        classifier = config is not None and any(str(a).endswith("ForSequenceClassification") for a in (config.architectures or []))
        lm = not classifier and is_causal_lm_config(config)
        # an LM runs in its checkpoint's half dtype on CUDA, as extraction does (weights loaded in it)
        torch_dtype = M.resolve_dtype(dtype, dev, config if lm else None)
        loaded = M.load_causal_lm(model, dev, torch_dtype) if lm else M.load(model, dev)
    speech = loaded.audio is not None and loaded.audio.family == "lalm"
    lm = is_causal_lm(loaded) and not speech
    if loaded.audio is not None and not speech:
        raise NeurostoreError(f"--model {loaded.name}: a speech encoder has no prediction to measure; intervene on an audio-language model (Qwen2-Audio, Audio Flamingo 3, Qwen2.5-Omni)")
    if loaded.classes is None and not lm and not speech:
        raise NeurostoreError(
            f"--model {loaded.name}: neither a sequence classifier nor a causal LM "
            "(its config names no ...ForSequenceClassification, ...ForCausalLM or ...LMHeadModel)"
        )
    if lm and positions == "last":
        raise NeurostoreError(
            "--positions last: no next-token loss depends on a causal LM's last token; use --positions all (or first)"
        )
    pooled = pooled_position(loaded)
    if not lm and positions != "all" and positions != pooled:
        warnings.warn(
            f"--positions {positions}: a {loaded.model_type} classifier reads the {pooled} token; "
            f"use --positions {pooled} to act at the pooled position",
            UserWarning,
            stacklevel=2,
        )
    if neuron_set.site.startswith("audio."):
        raise NeurostoreError(
            f"--site {neuron_set.site}: interventions act on the language model's sites (resid, mlp); a stored audio-encoder "
            "neuron is the mean of two encoder frames, no single activation to set"
        )
    site_info = M.resolve_sites(loaded, [neuron_set.site], None, module_pattern)[neuron_set.site]
    source = neuron_source(neurons, neuron_set.site) if isinstance(neurons, (str, Path)) and is_file(neurons) else None
    check_source(source, str(neurons), loaded, neuron_set.site, site_info.width)
    check_neuron_set(neuron_set, site_info.layers, site_info.width)
    if speech:
        data = prepare_audio(loaded, corpus, label_words, max_length=max_length, max_batch_tokens=max_batch_tokens)
    elif lm:
        data = prepare_lm(loaded, corpus, max_length=max_length, max_batch_tokens=max_batch_tokens)
        _check_target(target, data)
    else:
        data = prepare(loaded, corpus, max_length=max_length, max_batch_tokens=max_batch_tokens)

    values, extra = None, {}
    if source:
        extra["neurons_from"] = source
    if stats is not None:
        store = stats if isinstance(stats, Store) else open_store(str(stats))
        check_store(store, loaded, neuron_set.site, site_info.width, torch_dtype)
        if mode == "set":
            rows = stat_rows(store, positions)
            values = group_statistic(store, neuron_set.site, sorted(neuron_set.layers), of or target, stat, rows=rows)
            extra |= {"stat": stat, "of": of or target, "stat_rows": rows,
                      "stats": str(stats) if not isinstance(stats, Store) else store.paths[0]}
    spec = Intervention(neuron_set, mode, alpha, values, positions)
    result = (evaluate_lm if lm else evaluate)(
        loaded, data, spec, controls=controls, seed=seed, width=site_info.width, target=target, dtype=torch_dtype,
        module_pattern=module_pattern, progress=progress,
    )
    result.update(extra)
    return result


def _check_target(target: str | None, data: LMEvalSet) -> None:
    """An LM's target must be a language or label of the corpus: its selectivity is the point."""
    if target is None:
        return
    langs = sorted({g for g in data.langs if g is not None})
    labels = sorted({g for g in data.labels if g is not None})
    if target not in langs and target not in labels:
        raise NeurostoreError(
            f"--target {target!r} is neither a language ({', '.join(langs) or 'none'}) nor a label "
            f"({', '.join(labels) or 'none'}) of the corpus; pass --target with one of them"
        )
