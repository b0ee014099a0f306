"""Fine-tune only a neuron set: LoRA on the MLP projections, with the update masked to the set.

The study of language-specific neurons asks whether the neurons LAPE (or a selector) finds carry
cross-lingual transfer: fine-tune on one language with updates confined to those neurons, evaluate
zero-shot on the others, and read the effect against random sets of the same count per layer.

The mask. A neuron ``j`` of MLP layer ``i`` is row ``j`` of the up projections (``up``, and
``gate`` where there is one) and column ``j`` of the down projection. LoRA's update is
``delta W = B A`` (``B``: out x r, ``A``: r x in, whatever the weight's storage layout, Conv1D
included), so row ``j`` of ``delta W`` is zero exactly when row ``j`` of ``B`` is, and column ``j``
exactly when column ``j`` of ``A`` is. The mask therefore lives in the adapter's own weights: the
unselected rows of ``B`` (up/gate) and columns of ``A`` (down) are zeroed at the start, their
gradients are zeroed by a tensor hook, they are zeroed again after every optimiser step, and they
are checked to be exactly zero before the adapter is saved. An adapter saved here is masked for
whoever loads it with ``PeftModel.from_pretrained``; merged, every unselected neuron's weights
are bit-identical to the base model's (``0 * x`` is exactly 0, ``w + 0`` exactly ``w``).

LoRA sits on the set's layers only; attention LoRA (every layer) and the classifier head are
optional (the study trains both). Controls (``controls=N``) repeat the same training with N random
sets of the same count per layer (``neurostore.neurons.random_controls``, seeded), each from the
same base weights and head initialisation, so the selected set's effect is read against chance.

Training is deterministic on a CPU (seeded head, data order per epoch from ``default_rng([seed,
epoch])``, RNG state in every checkpoint) and runs under autocast on CUDA (bfloat16 where
supported, else float16 with a gradient scaler). A checkpoint (trainable weights, optimiser, RNG,
losses) is written every ``save_every`` steps to a temporary name and renamed; ``resume=True``
continues each unfinished run from its last checkpoint and skips finished ones, and gives the same
adapter as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import batching
from . import intervene as iv
from . import models as M
from .corpus import Corpus, read_corpus
from .errors import Fault, NeurostoreError
from .neurons import NeuronSet, check_neuron_set, load_neuron_set, parse_neuron_list, random_controls

TASKS = ("auto", "classify", "lm")
# Per family, relative to one transformer block: the projections whose OUTPUT rows are the MLP
# neurons (up, gate) and the one whose INPUT columns are (down). bert's "output.dense" is the FFN's
# down projection (the attention's is "attention.output.dense").
PROJECTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bert": (("intermediate.dense",), ("output.dense",)),
    "roberta": (("intermediate.dense",), ("output.dense",)),
    "xlm-roberta": (("intermediate.dense",), ("output.dense",)),
    "camembert": (("intermediate.dense",), ("output.dense",)),
    "electra": (("intermediate.dense",), ("output.dense",)),
    "distilbert": (("ffn.lin1",), ("ffn.lin2",)),
    "gpt2": (("mlp.c_fc",), ("mlp.c_proj",)),
    "gpt_neox": (("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
    **{
        family: (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
        for family in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2")
    },
}
# The attention projections that --attention adds LoRA to (unmasked), per family and block.
ATTENTION: dict[str, tuple[str, ...]] = {
    **{f: ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
       for f in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "distilbert": ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "gpt_neox": ("attention.query_key_value", "attention.dense"),
    **{f: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
       for f in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2")},
}
# Classifier heads (top-level modules) trained with --train-head.
HEADS = ("pre_classifier", "classifier", "score")
RUN_FILE = "finetune-run.json"
RESULT_FILE = "finetune.json"
CHECKPOINTS = ".checkpoints"


@dataclass
class Hyper:
    """What a run trains with; all of it goes into the fingerprint a checkpoint is resumed against."""

    rank: int = 8
    lora_alpha: float = 16.0
    dropout: float = 0.0
    lr: float = 5e-4
    weight_decay: float = 0.0
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 16
    max_length: int | None = None
    attention: bool = False
    train_head: bool = True
    seed: int = 0
    save_every: int = 50

    def check(self) -> None:
        for name, minimum in (("rank", 1), ("epochs", 1), ("batch_size", 1), ("save_every", 1)):
            value = getattr(self, name)
            if value < minimum:
                raise NeurostoreError(f"--{name.replace('_', '-')} {value}: expected at least {minimum}")
        if self.max_steps is not None and self.max_steps < 1:
            raise NeurostoreError(f"--max-steps {self.max_steps}: expected at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise NeurostoreError(f"--lr {self.lr}: expected a positive number")
        if not 0 <= self.dropout < 1:
            raise NeurostoreError(f"--lora-dropout {self.dropout}: expected 0 <= p < 1")


@dataclass
class RunResult:
    """One training run (the selected set or a control) and its evaluation after training."""

    name: str
    neurons: dict[int, list[int]]
    adapter: str
    after: dict
    change: dict
    steps: int
    tokens: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    resumed_from: int | None = None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["neurons"] = {str(k): v for k, v in self.neurons.items()}
        out["tokens_per_s"] = self.tokens_per_s
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "RunResult":
        obj = {k: v for k, v in obj.items() if k != "tokens_per_s"}
        obj["neurons"] = {int(k): v for k, v in obj["neurons"].items()}
        return cls(**obj)


@dataclass
class FinetuneResult:
    """The selected set's run, the controls' runs, the evaluation before training and provenance."""

    model: str
    task: str
    classes: list[str] | None
    neurons: NeuronSet
    hyper: Hyper
    before: dict
    selected: RunResult
    controls: list[RunResult] = field(default_factory=list)
    n_train: int = 0
    n_eval: int = 0
    out: str = ""
    provenance: dict = field(default_factory=dict)

    def controls_summary(self) -> dict:
        """Mean, std, min and max over the controls of every number the runs' changes hold."""
        if not self.controls:
            return {}
        return _summarise([c.change for c in self.controls])

    def to_json(self) -> dict:
        return {
            "analysis": "finetune",
            "model": self.model,
            "task": self.task,
            "classes": self.classes,
            "neurons": self.neurons.describe() | {"layers": {str(k): v for k, v in self.neurons.layers.items()}},
            "hyper": dataclasses.asdict(self.hyper),
            "n_train": self.n_train,
            "n_eval": self.n_eval,
            "out": self.out,
            "before": self.before,
            "selected": self.selected.to_json(),
            "controls": [c.to_json() for c in self.controls],
            "controls_summary": self.controls_summary(),
            "provenance": self.provenance,
        }


def _summarise(changes: list[dict]) -> dict:
    """The same nested shape as one change, with a spread (``iv._spread``) at every leaf."""
    first = changes[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = _summarise([c[key] for c in changes])
        else:
            out[key] = iv._spread([c.get(key) for c in changes])
    return out


# ----------------------------------------------------------------------------------------------
# the model


def load_model(model: str | None, device: torch.device, task: str, labels: Sequence[str] = (), *, seed: int = 0) -> M.LoadedModel:
    """Float32 weights for training: a sequence classifier (``task="classify"``; a checkpoint
    without a head gets a new one for ``labels``, initialised from ``seed``) or a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = M.resolve(model)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a bad path
        raise NeurostoreError(f"cannot load model {path!r}: {M._first_line(err)}") from None
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    torch.manual_seed(seed)  # a new head starts from the same weights in every run
    try:
        if task == "classify":
            if not has_head:
                config.num_labels = len(labels)
                config.id2label = dict(enumerate(labels))
                config.label2id = {name: i for i, name in enumerate(labels)}
            if getattr(config, "pad_token_id", None) is None:  # decoders pool the last non-pad token
                config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            net = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32)
        else:
            net = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    except ValueError as err:
        if task == "lm":
            raise NeurostoreError(
                f"--model {model}: model type {config.model_type!r} is not a causal language model; "
                "fine-tune it as a classifier (labelled training corpus, --task classify)"
            ) from None
        raise NeurostoreError(f"cannot load model {path!r}: {M._first_line(err)}") from None
    except Exception as err:  # noqa: BLE001
        raise NeurostoreError(f"cannot load model {path!r}: {M._first_line(err)}") from None
    return M.wrap(net, tokenizer, model, config, path, device, classifier=task == "classify")


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or a transformers Conv1D (weight stored in x out)."""
    if hasattr(module, "nf"):
        return int(module.weight.shape[0]), int(module.nf)
    return int(module.in_features), int(module.out_features)


def targets(loaded: M.LoadedModel, neurons: NeuronSet, width: int, *, attention: bool = False) -> tuple[dict[str, tuple[str, list[int]]], list[str]]:
    """``{module name: ("out" | "in", neuron ids)}`` of the masked MLP projections of the set's
    layers, and the names of the (unmasked) attention projections of every layer."""
    known = PROJECTIONS.get(loaded.model_type)
    if known is None or loaded.blocks is None:
        raise NeurostoreError(
            f"finetune does not know the MLP projections of model type {loaded.model_type!r} "
            f"(supported: {', '.join(sorted(PROJECTIONS))})"
        )
    names = {id(m): n for n, m in loaded.model.named_modules()}
    ups, downs = known
    masked: dict[str, tuple[str, list[int]]] = {}
    for layer, ids in sorted(neurons.layers.items()):
        block = loaded.blocks[layer]
        for kind, relatives in (("out", ups), ("in", downs)):
            for rel in relatives:
                module = block.get_submodule(rel)
                n_in, n_out = _features(module)
                size = n_out if kind == "out" else n_in
                if size != width:
                    raise NeurostoreError(
                        f"--neurons: the {rel} projection of layer {layer} has {size} "
                        f"{'outputs' if kind == 'out' else 'inputs'}, not the {width} MLP neurons of the site"
                    )
                masked[names[id(module)]] = (kind, list(ids))
    attn: list[str] = []
    if attention:
        for block in loaded.blocks:
            for rel in ATTENTION.get(loaded.model_type, ()):
                attn.append(names[id(block.get_submodule(rel))])
    return masked, attn


def heads(loaded: M.LoadedModel) -> list[str]:
    return [name for name, _ in loaded.model.named_children() if name in HEADS]


def wrap(loaded: M.LoadedModel, masked: dict, attention: list[str], hyper: Hyper, task: str) -> nn.Module:
    """The peft model: LoRA on ``masked`` and ``attention``, the head saved too where trained."""
    from peft import LoraConfig, TaskType, get_peft_model

    save = heads(loaded) if (task == "classify" and hyper.train_head) else None
    task_type = TaskType.CAUSAL_LM if task == "lm" else (TaskType.SEQ_CLS if save else None)
    config = LoraConfig(
        r=hyper.rank, lora_alpha=hyper.lora_alpha, lora_dropout=hyper.dropout, target_modules=list(masked) + list(attention),
        modules_to_save=save, task_type=task_type, fan_in_fan_out=loaded.model_type == "gpt2", bias="none",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(loaded.model, config)


# ----------------------------------------------------------------------------------------------
# the mask


@dataclass
class Mask:
    """One masked LoRA factor: ``weight * keep`` is the update's factor, 0 outside the set."""

    name: str
    weight: torch.Tensor
    keep: torch.Tensor  # broadcastable to weight: [out, 1] for B, [1, in] for A


def install_masks(peft_model: nn.Module, masked: dict[str, tuple[str, list[int]]]) -> list[Mask]:
    """Zero the unselected rows of ``lora_B`` (up/gate) and columns of ``lora_A`` (down), and keep
    their gradients zero."""
    base = peft_model.base_model.model
    masks = []
    for name, (kind, ids) in masked.items():
        layer = base.get_submodule(name)
        factor = layer.lora_B["default"] if kind == "out" else layer.lora_A["default"]
        weight = factor.weight
        shape = (weight.shape[0], 1) if kind == "out" else (1, weight.shape[1])
        keep = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        if kind == "out":
            keep[ids, 0] = 1
        else:
            keep[0, ids] = 1
        with torch.no_grad():
            weight.mul_(keep)
        weight.register_hook(lambda grad, keep=keep: grad * keep)
        masks.append(Mask(f"{name}.{'lora_B' if kind == 'out' else 'lora_A'}", weight, keep))
    return masks


def enforce(masks: Sequence[Mask]) -> None:
    """Zero the masked entries again (after an optimiser step: weight decay, a scaler's skip)."""
    with torch.no_grad():
        for m in masks:
            m.weight.mul_(m.keep)


def verify(masks: Sequence[Mask]) -> None:
    """Every masked entry is exactly zero, or the adapter is not saved."""
    for m in masks:
        leaked = int(torch.count_nonzero(m.weight.detach() * (1 - m.keep)))
        if leaked:
            raise Fault(f"the mask of {m.name} leaked: {leaked} entries outside the neuron set are not zero; the adapter was not saved")


# ----------------------------------------------------------------------------------------------
# data and evaluation


@dataclass
class Data:
    """Tokenised sentences with class indices (classify) and languages."""

    ids: list[list[int]]
    gold: np.ndarray | None
    langs: list[str | None]
    labels: list[str | None]
    n_truncated: int = 0


def tokenise(loaded: M.LoadedModel, corpus: Corpus, max_length: int | None, task: str) -> Data:
    ids, truncated, _ = iv.tokenised(loaded, corpus, max_length)
    gold = iv.class_indices(loaded, corpus.labels) if task == "classify" else None
    if task == "lm":
        short = sum(len(x) < 2 for x in ids)
        if short == len(ids):
            raise NeurostoreError("every sentence is one token long: a language model has nothing to predict")
    return Data(ids, gold, list(corpus.langs), list(corpus.labels), int(truncated.sum()))


def classify_scores(gold: np.ndarray, logits: np.ndarray, classes: Sequence[str], langs: Sequence[str | None]) -> dict:
    """Accuracy, macro-F1 and per-label accuracy (recall), over all sentences and per language
    (``intervene.metrics`` on each subset: macro-F1 over the labels present in it)."""

    def one(sel: np.ndarray) -> dict:
        m = iv.metrics(gold[sel], logits[sel], classes)
        return {"n": int(sel.sum()), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "per_label": m["per_label"]}

    every = np.ones(len(gold), dtype=bool)
    lang_arr = np.array([lang if lang is not None else "" for lang in langs], dtype=object)
    names = sorted({lang for lang in langs if lang is not None})
    return {"all": one(every), "per_lang": {lang: one(lang_arr == lang) for lang in names}}


def lm_scores(nll: np.ndarray, count: np.ndarray, langs: Sequence[str | None]) -> dict:
    """Mean next-token loss (nats per predicted token) and perplexity, overall and per language."""

    def one(sel: np.ndarray) -> dict:
        return {"n": int(sel.sum()), **iv.loss_entry(nll[sel], count[sel])}

    lang_arr = np.array([lang if lang is not None else "" for lang in langs], dtype=object)
    names = sorted({lang for lang in langs if lang is not None})
    return {"all": one(np.ones(len(nll), dtype=bool)), "per_lang": {lang: one(lang_arr == lang) for lang in names}}


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sentence summed next-token NLL and the number of predicted tokens (padding left out)."""
    target = ids[:, 1:]
    real = mask[:, 1:].bool()
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none")
    nll = torch.where(real, nll, torch.zeros_like(nll))
    return nll.sum(1), real.sum(1)


def evaluate(net: nn.Module, loaded: M.LoadedModel, data: Data, task: str, dtype: torch.dtype, batch_tokens: int | None = None) -> dict:
    """Scores of ``net`` (the base model or the peft model) on ``data``."""
    lengths = np.array([len(x) for x in data.ids], dtype=np.int64)
    batches = batching.plan_batches(lengths, batch_tokens or batching.default_batch_tokens(loaded.device))
    net.eval()
    logits = np.zeros((len(data.ids), len(loaded.classes or [])), dtype=np.float32)
    nll = np.zeros(len(data.ids), dtype=np.float64)
    count = np.zeros(len(data.ids), dtype=np.int64)
    with torch.inference_mode(), M.autocast(loaded.device, dtype):
        for batch in batches:
            ids, mask = batching.pad([data.ids[i] for i in batch], loaded.pad_id, loaded.device)
            out = net(input_ids=ids, attention_mask=mask)
            if task == "classify":
                logits[batch] = out.logits.float().cpu().numpy()
            else:
                s, n = _lm_loss(out.logits, ids, mask)
                nll[batch] = s.double().cpu().numpy()
                count[batch] = n.cpu().numpy()
    if task == "classify":
        return classify_scores(data.gold, logits, loaded.classes, data.langs)
    return lm_scores(nll, count, data.langs)


def change(before: dict, after: dict) -> dict:
    """after - before for every number of the scores (the per-label recalls included)."""
    out: dict[str, Any] = {}
    for key, value in after.items():
        if key in ("n", "tokens"):
            continue
        if isinstance(value, dict):
            out[key] = change(before.get(key) or {}, value)
        elif isinstance(value, (int, float)) and isinstance(before.get(key), (int, float)):
            out[key] = value - before[key]
    return out


# ----------------------------------------------------------------------------------------------
# training


def _precision(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class Progress:
    """Callbacks of a run: ``start(run, total_steps, done)``, ``step(run, step, loss)``, ``say(msg)``."""

    start: Callable[[str, int, int], None] = lambda run, total, done: None
    step: Callable[[str, int, float], None] = lambda run, step, loss: None
    say: Callable[[str], None] = lambda msg: None


def train(
    peft_model: nn.Module,
    loaded: M.LoadedModel,
    data: Data,
    task: str,
    hyper: Hyper,
    masks: Sequence[Mask],
    checkpoint: Path,
    fingerprint: str,
    *,
    name: str = "selected",
    resume: bool = False,
    progress: Progress | None = None,
) -> dict:
    """The training loop; returns steps, tokens, seconds, losses and where it resumed from."""
    progress = progress or Progress()
    device = loaded.device
    n = len(data.ids)
    per_epoch = math.ceil(n / hyper.batch_size)
    total = hyper.max_steps or hyper.epochs * per_epoch
    params = {k: p for k, p in peft_model.named_parameters() if p.requires_grad}
    optimiser = torch.optim.AdamW(params.values(), lr=hyper.lr, weight_decay=hyper.weight_decay)
    precision = _precision(device)
    scaler = torch.amp.GradScaler("cuda") if precision == torch.float16 else None
    step, losses, tokens, seconds, resumed = 0, [], 0, 0.0, None
    torch.manual_seed(hyper.seed)
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("fingerprint") != fingerprint:
            raise NeurostoreError(
                f"{checkpoint}: written for other options, data or neurons; run again with the same ones, or without --resume"
            )
        with torch.no_grad():
            for k, value in state["params"].items():
                params[k].copy_(value)
        optimiser.load_state_dict(state["optimiser"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        step, losses, tokens, seconds = int(state["step"]), list(state["losses"]), int(state["tokens"]), float(state["seconds"])
        resumed = step
        enforce(masks)
    progress.start(name, total, step)

    def save() -> None:
        _save_atomic(
            {
                "fingerprint": fingerprint, "step": step, "losses": losses, "tokens": tokens, "seconds": seconds,
                "params": {k: p.detach().clone() for k, p in params.items()}, "optimiser": optimiser.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            checkpoint,
        )

    order: np.ndarray | None = None
    epoch_of_order = -1
    peft_model.train()
    while step < total:
        epoch, b = divmod(step, per_epoch)
        if epoch != epoch_of_order:
            order = np.random.default_rng([hyper.seed, epoch]).permutation(n)
            epoch_of_order = epoch
        batch = order[b * hyper.batch_size : (b + 1) * hyper.batch_size]
        t0 = time.perf_counter()
        ids, mask = batching.pad([data.ids[i] for i in batch], loaded.pad_id, device)
        with M.autocast(device, precision):
            out = peft_model(input_ids=ids, attention_mask=mask)
            if task == "classify":
                loss = F.cross_entropy(out.logits.float(), torch.as_tensor(data.gold[batch], device=device))
            else:
                s, c = _lm_loss(out.logits, ids, mask)
                loss = s.sum() / c.sum().clamp(min=1)
        optimiser.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
        else:
            loss.backward()
            optimiser.step()
        enforce(masks)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NeurostoreError(f"run {name}: the training loss is {value} at step {step + 1}; lower --lr")
        seconds += time.perf_counter() - t0
        tokens += int(mask.sum())
        losses.append(value)
        step += 1
        if step % hyper.save_every == 0 and step < total:
            save()
        progress.step(name, step, value)
    peft_model.eval()
    return {"steps": step, "tokens": tokens, "seconds": seconds, "losses": losses, "resumed_from": resumed}


# ----------------------------------------------------------------------------------------------
# the workflow of ``neurostore finetune``


def _read(paths: Sequence[str | Path], options: dict) -> Corpus:
    return read_corpus([str(p) for p in paths], **options)


def _choose_task(task: str, corpus: Corpus) -> str:
    if task not in TASKS:
        raise NeurostoreError(f"--task {task!r}: use one of {', '.join(TASKS)}")
    missing = sum(label is None for label in corpus.labels)
    if task == "auto":
        return "classify" if missing == 0 else "lm"
    if task == "classify" and missing:
        raise NeurostoreError(
            f"--task classify: {missing} of {len(corpus)} training sentences have no label "
            "(set the column with --label-col, or train a language model with --task lm)"
        )
    return task


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NeurostoreError(f"--out {out}: is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise NeurostoreError(f"--out {out}: not empty; continue its runs with --resume, or replace it with --overwrite")
    out.mkdir(parents=True, exist_ok=True)


def run(
    train_files: Sequence[str | Path],
    model: str | None,
    neurons: str | NeuronSet,
    out: str | Path,
    *,
    group: str | None = None,
    site: str | None = None,
    controls: int = 0,
    eval_files: Sequence[str | Path] | None = None,
    task: str = "auto",
    train_lang: Sequence[str] | None = None,
    hyper: Hyper | None = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    input_format: str | None = None,
    text_col: str = "text",
    label_col: str = "label",
    lang_col: str = "lang",
    max_batch_tokens: int | None = None,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``train_files`` with LoRA masked to ``neurons`` (and ``controls``
    random sets), evaluate before and after on ``eval_files`` (default: the training files, every
    language), save each adapter in peft's format under ``out`` (the selected set's in ``out``,
    control k's in ``out/controls/control-k``) and the result in ``out/finetune.json``."""
    hyper = hyper or Hyper()
    hyper.check()
    progress = progress or Progress()
    if controls < 0:
        raise NeurostoreError(f"--controls {controls}: expected 0 or more")
    if isinstance(neurons, NeuronSet):
        neuron_set = neurons
    elif re.fullmatch(r"[\d:,\s]+", str(neurons)) and ":" in str(neurons):
        # a layer:neuron list is of site mlp unless told otherwise; parsed here, not by load_neuron_set,
        # whose is_file() fails on a list longer than a file name may be (ENAMETOOLONG)
        neuron_set = parse_neuron_list(str(neurons), site or "mlp")
        neuron_set.group = group
    else:
        neuron_set = load_neuron_set(str(neurons), site=site, group=group)
    if neuron_set.site != "mlp":
        raise NeurostoreError(
            f"--neurons: site {neuron_set.site!r}; finetune masks MLP neurons (rows of the up projection), "
            "give a neuron set of site 'mlp' (e.g. neurostore query lape --site mlp --format json)"
        )
    if neuron_set.n == 0:
        raise NeurostoreError("--neurons: the neuron set is empty; there is nothing to fine-tune")
    options = dict(fmt=input_format, text_col=text_col, label_col=label_col, lang_col=lang_col)
    train_corpus = _read(train_files, options)
    chosen_task = _choose_task(task, train_corpus)
    eval_corpus = _read(eval_files, options) if eval_files else train_corpus
    if train_lang:
        keep = [i for i, lang in enumerate(train_corpus.langs) if lang in set(train_lang)]
        if not keep:
            found = ", ".join(sorted({str(x) for x in train_corpus.langs})) or "none"
            raise NeurostoreError(f"--train-lang {','.join(train_lang)}: no training sentence in that language (languages: {found})")
        train_corpus = Corpus([train_corpus.texts[i] for i in keep], [train_corpus.labels[i] for i in keep],
                              [train_corpus.langs[i] for i in keep], train_corpus.files, train_corpus.fingerprint)
    if chosen_task == "classify" and any(label is None for label in eval_corpus.labels):
        raise NeurostoreError("the evaluation corpus has sentences without a label; a classifier is scored on gold labels (--label-col)")
    out = Path(out)
    dev = M.resolve_device(device)
    labels = sorted({label for label in train_corpus.labels if label is not None}) if chosen_task == "classify" else []

    def fresh() -> M.LoadedModel:
        return load_model(model, dev, chosen_task, labels, seed=hyper.seed)

    loaded = fresh()
    width = M.resolve_sites(loaded, ["mlp"], None)["mlp"].width
    check_neuron_set(neuron_set, range(loaded.n_layers), width)
    masked, attention = targets(loaded, neuron_set, width, attention=hyper.attention)
    sets = [("selected", neuron_set)] + [
        (f"control-{i + 1}", c) for i, c in enumerate(random_controls(neuron_set, width, controls, hyper.seed))
    ]
    train_data = tokenise(loaded, train_corpus, hyper.max_length, chosen_task)
    eval_data = tokenise(loaded, eval_corpus, hyper.max_length, chosen_task)
    _prepare_out(out, resume, overwrite)
    precision = _precision(dev)
    progress.say(f"evaluating the base model on {len(eval_data.ids)} sentences")
    before = evaluate(loaded.model, loaded, eval_data, chosen_task, precision, max_batch_tokens)

    runs: list[RunResult] = []
    for i, (name, nset) in enumerate(sets):
        run_dir = out if name == "selected" else out / "controls" / name
        fingerprint = _fingerprint(
            model=loaded.path, task=chosen_task, classes=loaded.classes, hyper=dataclasses.asdict(hyper),
            train=train_corpus.fingerprint, train_lang=sorted(train_lang or []), n_train=len(train_data.ids),
            neurons={str(k): v for k, v in nset.layers.items()},
        )
        done = run_dir / RUN_FILE
        if resume and done.exists():
            record = json.loads(done.read_text(encoding="utf-8"))
            if record.get("fingerprint") == fingerprint:
                progress.say(f"{name}: already trained, kept")
                runs.append(RunResult.from_json(record["run"]))
                continue
        current = loaded if i == 0 else fresh()
        current_masked = masked if i == 0 else targets(current, nset, width, attention=hyper.attention)[0]
        peft_model = wrap(current, current_masked, attention, hyper, chosen_task)
        masks = install_masks(peft_model, current_masked)
        checkpoint = out / CHECKPOINTS / f"{name}.pt"
        stats = train(peft_model, current, train_data, chosen_task, hyper, masks, checkpoint, fingerprint,
                      name=name, resume=resume, progress=progress)
        verify(masks)
        after = evaluate(peft_model, current, eval_data, chosen_task, precision, max_batch_tokens)
        run_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(str(run_dir))
        losses = stats["losses"]
        result = RunResult(
            name=name, neurons=dict(nset.layers), adapter=str(run_dir), after=after, change=change(before, after),
            steps=stats["steps"], tokens=stats["tokens"], seconds=stats["seconds"],
            first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
            resumed_from=stats["resumed_from"],
        )
        tmp = done.with_name(done.name + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "run": result.to_json()}), encoding="utf-8")
        os.replace(tmp, done)
        with contextlib.suppress(FileNotFoundError):
            checkpoint.unlink()
        runs.append(result)
        del peft_model, current
    with contextlib.suppress(OSError):
        (out / CHECKPOINTS).rmdir()

    from . import __version__

    notes = []
    if not eval_files:
        notes.append("evaluated on the training files (no --eval given)")
    if train_data.n_truncated:
        notes.append(f"{train_data.n_truncated} training sentences truncated")
    result = FinetuneResult(
        model=loaded.name, task=chosen_task, classes=loaded.classes, neurons=neuron_set, hyper=hyper, before=before,
        selected=runs[0], controls=runs[1:], n_train=len(train_data.ids), n_eval=len(eval_data.ids), out=str(out),
        provenance={
            "analysis": "finetune",
            "neurostore_version": __version__,
            "model": {"name": loaded.name, "path": loaded.path, "model_type": loaded.model_type},
            "train": {"files": list(train_corpus.files), "fingerprint": train_corpus.fingerprint,
                      "langs": sorted(train_lang) if train_lang else None},
            "eval": {"files": list(eval_corpus.files), "fingerprint": eval_corpus.fingerprint},
            "neurons": neuron_set.describe(),
            "seeds": {"training": hyper.seed, "controls": hyper.seed},
            "parameters": dataclasses.asdict(hyper) | {
                "task": chosen_task, "device": str(dev), "precision": str(precision).removeprefix("torch."),
                "mlp_targets": sorted(masked), "attention_targets": attention, "controls": controls,
            },
            "notes": notes,
        },
    )
    (out / RESULT_FILE).write_text(json.dumps(result.to_json(), indent=1), encoding="utf-8")
    return result
