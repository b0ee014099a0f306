"""Relevance: how much each stored neuron contributes to the model's prediction.

The relevance of a neuron on a token row is its activation times the (possibly modified) gradient
of a *target* at the hooked site's output, from one backward pass per batch on the target summed
over the batch:

- ``next-token`` (causal LMs): the log-probability of the actual next token at every position
  (padding and each sentence's last position left out);
- ``label`` (sequence classifiers): the gold label's logit; ``predicted``: the predicted one's.

Rules:

- ``grad-x-act``: the plain gradient (Gradient x Input at the site), for every architecture.
- ``attnlrp``: AttnLRP (Achtibat et al., ICML 2024) in its Gradient x Input form, as in the
  reference implementation lxt (``lxt/efficient``): the backward pass is modified so that
  activation x gradient is the LRP relevance. Identity rule through LayerNorm/RMSNorm (the
  normaliser is a constant of the backward pass) and element-wise non-linearities (the gradient is
  ``output / input``); the uniform rule on the attention's bilinear products (``q.k`` and
  ``softmax(.)v``: query and key gradients / 4, value / 2) and on the gated MLP's product (/ 2); the
  epsilon rule (epsilon -> 0) for linear layers, which is their plain gradient. The softmax keeps its
  gradient: x * grad is AttnLRP's softmax rule ``x (R - s sum R)``. Written here for the BERT/XLM-R,
  GPT-2 and LLaMA/Qwen2 families (lxt cannot be a dependency: it needs transformers < 5).

Relevance is conserved up to what the rules give to biases (linear and norm biases, position
embeddings) and what the softmax rule absorbs; ``tests/test_relevance.py`` measures and bounds it.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from . import models
from . import store as st
from .errors import NeurostoreError

RULES = ("grad-x-act", "attnlrp")
TARGETS = ("next-token", "label", "predicted")
QUANTITY_CHOICES = ("activation", "relevance", "both")
# Model types whose modules attnlrp rewrites (their norms, activations, attention and MLP products).
ATTNLRP_FAMILIES = ("bert", "roberta", "xlm-roberta", "gpt2", "llama", "qwen2")
_DECODERS = {"gpt2", "gpt_neox", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2"}


def quantities(value: str | None) -> list[str]:
    """``--quantity`` as the list of stored quantities (default: activation)."""
    value = value or "activation"
    if value not in QUANTITY_CHOICES:
        raise NeurostoreError(f"--quantity {value!r}: use activation, relevance or both")
    return ["activation", "relevance"] if value == "both" else [value]


def is_causal_lm(config: Any) -> bool:
    """A decoder whose next-token predictions can be explained (not a classifier checkpoint)."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return False
    return config.model_type in _DECODERS or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def check(rule: str, target: str, loaded: models.LoadedModel) -> None:
    """Refuse a rule or target the model cannot have, in one line."""
    if rule not in RULES:
        raise NeurostoreError(f"--rule {rule!r}: use {' or '.join(RULES)}")
    if target not in TARGETS:
        raise NeurostoreError(f"--relevance-target {target!r}: use {', '.join(TARGETS)}")
    if rule == "attnlrp" and loaded.model_type not in ATTNLRP_FAMILIES:
        raise NeurostoreError(
            f"--rule attnlrp: model type {loaded.model_type!r} has no AttnLRP rules here (supported: {', '.join(ATTNLRP_FAMILIES)}); "
            "use --rule grad-x-act"
        )
    if loaded.classes is not None:
        if target == "next-token":
            raise NeurostoreError("--relevance-target next-token: the model is a sequence classifier; use label or predicted")
    elif not is_causal_lm(loaded.config):
        raise NeurostoreError(
            f"--quantity relevance: model type {loaded.model_type!r} has no head to explain here; "
            "use a causal LM (target next-token) or a sequence classifier (target label or predicted)"
        )
    elif target != "next-token":
        raise NeurostoreError(f"--relevance-target {target}: the model is a causal LM, not a classifier; use next-token")


def default_target(loaded: models.LoadedModel) -> str:
    return "next-token" if loaded.classes is None else "label"


def gold_classes(loaded: models.LoadedModel, names: list[str], codes: np.ndarray) -> np.ndarray:
    """The model's class index of every sentence's corpus label (``--relevance-target label``)."""
    classes = loaded.classes or []
    lookup = []
    for name in names:
        if name in classes:
            lookup.append(classes.index(name))
        elif name.isdigit() and int(name) < len(classes):
            lookup.append(int(name))
        else:
            raise NeurostoreError(
                f"--relevance-target label: corpus label {name!r} is not a class of the model ({', '.join(classes)}); "
                "use --relevance-target predicted"
            )
    codes = np.asarray(codes)
    if (codes < 0).any():
        row = int(np.flatnonzero(codes < 0)[0])
        raise NeurostoreError(f"--relevance-target label: sentence {row} has no label; use --relevance-target predicted")
    return np.asarray(lookup, dtype=np.int64)[codes] if len(codes) else np.zeros(0, np.int64)


def load(name: str | None, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False) -> models.LoadedModel:
    """The model with the head relevance explains: a causal LM with its LM head, else :func:`models.load`.

    A decoder checkpoint saved without a head (``GPT2Model``) loads with its tied input embeddings
    as the head; one whose head weights are missing and not tied is refused.
    """
    config = models.read_config(name)
    if config is None or not is_causal_lm(config):
        return models.load(name, device, dtype=dtype, trust_remote_code=trust_remote_code)
    return models.load_causal_lm(name, device, dtype, config=config, head_required="--quantity relevance", trust_remote_code=trust_remote_code)


# ----------------------------------------------------------------------------------------------
# AttnLRP's rules as modified gradients (Gradient x Input form)


class _Identity(torch.autograd.Function):
    """Identity rule on an element-wise ``y = f(x)``: the gradient is ``grad * y / x``, so that
    ``x * grad_in = y * grad_out`` (all relevance goes to the input, element by element)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Any) -> torch.Tensor:
        y = fn(x)
        ctx.save_for_backward(torch.where(x == 0, torch.zeros_like(y), y / torch.where(x == 0, torch.ones_like(x), x)))
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


def identity_rule(fn: Any, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with the identity rule's backward."""
    return _Identity.apply(x, fn) if x.requires_grad else fn(x)


class _Divide(torch.autograd.Function):
    """The identity forward; the gradient divided by ``factor`` (the uniform rule's share)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad / ctx.factor, None


def divide_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _Divide.apply(x, factor) if x.requires_grad else x


def _layer_norm(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with a constant normaliser in the backward pass (the identity rule)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / (var + self.eps).sqrt().detach()
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y


def _rms_norm(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LLaMA/Qwen2 RMSNorm with a constant normaliser in the backward pass (the identity rule)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps).detach()
    return self.weight * h.to(dtype)


def _activation(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return identity_rule(self._neurostore_forward, x)


def _gated_mlp(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LLaMA's ``down(act(gate(x)) * up(x))``: identity rule on act (patched on its module, where the
    mlp site's hook reads it), uniform rule on the product."""
    return self.down_proj(divide_gradient(self.act_fn(self.gate_proj(x)) * self.up_proj(x), 2))


def _classification_head(self: nn.Module, features: torch.Tensor, **_: Any) -> torch.Tensor:
    """RoBERTa's head applies ``torch.tanh`` as a function: the identity rule on it."""
    x = self.dense(features[:, 0, :])
    return self.out_proj(identity_rule(torch.tanh, x))


def _wrap_attention(fn: Any) -> Any:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # uniform rule on q.k (1/2 each) inside the half that softmax(.)v gives its first factor; v the other half
        return fn(module, divide_gradient(query, 4), divide_gradient(key, 4), divide_gradient(value, 2), *args, **kwargs)

    return attention


_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid)


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, _ACTIVATIONS) or type(module).__module__ == "transformers.activations"


@contextlib.contextmanager
def rules(model: nn.Module, rule: str) -> Iterator[None]:
    """Modify the model's backward pass for ``rule`` while inside (forward values unchanged).

    Instance forwards are replaced and put back on exit; the attention functions are wrapped in
    transformers' attention registry (process-wide, for the duration only).
    """
    if rule != "attnlrp":
        yield
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    patched: list[nn.Module] = []

    def patch(module: nn.Module, fn: Any) -> None:
        module.forward = types.MethodType(fn, module)
        patched.append(module)

    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, nn.LayerNorm):
            patch(module, _layer_norm)
        elif name.endswith("RMSNorm"):
            patch(module, _rms_norm)
        elif _is_activation(module):
            module._neurostore_forward = module.forward
            patch(module, _activation)
        elif all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            patch(module, _gated_mlp)
        elif name.endswith("ClassificationHead") and hasattr(module, "dense") and hasattr(module, "out_proj"):
            patch(module, _classification_head)
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    had = impl in ALL_ATTENTION_FUNCTIONS._local_mapping
    saved = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
    if impl == "eager":
        original = _eager_of(model)
    else:
        original = ALL_ATTENTION_FUNCTIONS[impl]
    ALL_ATTENTION_FUNCTIONS[impl] = _wrap_attention(original)
    try:
        yield
    finally:
        if had:
            ALL_ATTENTION_FUNCTIONS[impl] = saved
        else:
            del ALL_ATTENTION_FUNCTIONS[impl]
        for module in patched:
            del module.forward
            if hasattr(module, "_neurostore_forward"):
                del module._neurostore_forward


def _eager_of(model: nn.Module) -> Any:
    import sys

    module = sys.modules[type(model).__module__]
    return module.eager_attention_forward


# ----------------------------------------------------------------------------------------------
# one batch: forward with gradients, the target, one backward pass


@dataclass
class Explainer:
    """What a relevance extraction explains, and how: resolved once per extraction."""

    rule: str
    target: str
    store: list[str]  # the quantities stored: activation and/or relevance
    gold: np.ndarray | None = None  # the model's class of every store-local sentence (target label)

    def context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return rules(model, self.rule)


def target_value(out: Any, inputs: dict[str, torch.Tensor], target: str, gold: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's target, summed: next-token log-probabilities, or one logit per sentence."""
    logits = out.logits
    if target == "next-token":
        ids, mask = inputs["ids"], inputs["mask"]
        valid = (mask[:, 1:] * mask[:, :-1]).to(torch.float32)  # the last real position predicts nothing
        shifted = logits[:, :-1].float()
        picked = shifted.gather(-1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(shifted, dim=-1)
        return (picked * valid).sum()
    if target == "label":
        assert gold is not None
        return logits.float().gather(1, gold[:, None]).sum()
    return logits.float().max(dim=1).values.sum()


def forward_backward(
    explainer: Explainer, loaded: models.LoadedModel, sites: dict[str, models.Site], inputs: dict[str, torch.Tensor],
    device: torch.device, compute: torch.dtype, captured: dict[str, list], want_hidden: bool, docs: np.ndarray,
) -> tuple[Any, dict[str, list[torch.Tensor]]]:
    """One forward and one backward pass: each stored site's activations (key ``site``) and/or
    relevances (key ``relevance:site``), detached, ``[B, S, width]`` per layer."""
    leaf: dict[str, torch.Tensor] = {}

    def grad_leaf(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        leaf["embeddings"] = output.detach().requires_grad_(True)
        return leaf["embeddings"]

    handle = loaded.model.get_input_embeddings().register_forward_hook(grad_leaf)
    try:
        with torch.enable_grad(), models.autocast(device, compute):
            out = loaded.model(input_ids=inputs["ids"], attention_mask=inputs["mask"], output_hidden_states=want_hidden)
            acts = {name: ([out.hidden_states[i] for i in site.layers] if name == "resid" else list(captured[name])) for name, site in sites.items()}
            gold = None
            if explainer.target == "label":
                gold = torch.as_tensor(explainer.gold[np.asarray(docs)], device=out.logits.device)
            target = target_value(out, inputs, explainer.target, gold)
    finally:
        handle.remove()
    flat = [t for layers in acts.values() for t in layers]
    grads = torch.autograd.grad(target, flat, allow_unused=True)
    result: dict[str, list[torch.Tensor]] = {}
    if "activation" in explainer.store:
        result.update({name: [t.detach() for t in layers] for name, layers in acts.items()})
    if "relevance" in explainer.store:
        it = iter(grads)
        for name, layers in acts.items():
            rel = []
            for t in layers:
                g = next(it)
                rel.append(torch.zeros_like(t, dtype=torch.float32) if g is None else t.detach().float() * g.float())
            result[st.stream(name, "relevance")] = rel
    out.logits = out.logits.detach()
    return out, result


def input_relevance(
    loaded: models.LoadedModel, ids: torch.Tensor, mask: torch.Tensor, rule: str, target: str, gold: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(relevance of the input embeddings ``[B, S, d]``, the target, the relevance at the logits).

    For conservation checks: with the next-token target the log-softmax is a bias step (``z - lse(z)``),
    so what the rules must conserve is the logits' relevance ``sum(z * dT/dz)``."""
    leaf: dict[str, torch.Tensor] = {}

    def grad_leaf(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        leaf["x"] = output.detach().to(dtype).requires_grad_(True)
        return leaf["x"]

    handle = loaded.model.get_input_embeddings().register_forward_hook(grad_leaf)
    try:
        with torch.enable_grad(), rules(loaded.model, rule):
            out = loaded.model(input_ids=ids, attention_mask=mask)
            logits = out.logits
            logits.retain_grad()
            t = target_value(out, {"ids": ids, "mask": mask}, target, gold)
            t.backward()
    finally:
        handle.remove()
    x = leaf["x"]
    return (x * x.grad).detach(), t.detach(), (logits * logits.grad).sum().detach()


def default_batch_tokens(loaded: models.LoadedModel, device: torch.device, forward_default: int, store_bytes: int) -> int:
    """Padded tokens per batch of a relevance extraction: the forward default, bounded on CUDA so the
    backward pass's saved tensors (an estimate per token: every layer's attention and MLP
    intermediates and, for a causal LM, the float32 logits) stay within a third of the device."""
    if device.type != "cuda":
        return forward_default
    cfg = loaded.config
    hidden = loaded.hidden_size
    inter = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "n_inner", 0) or 4 * hidden)
    vocab = int(getattr(cfg, "vocab_size", 0)) if loaded.classes is None else 0
    per_token = loaded.n_layers * (12 * hidden + 4 * inter) * 4 + 3 * vocab * 4 + store_bytes
    total = torch.cuda.get_device_properties(device).total_memory
    budget = max(256, int(total // 3 // per_token) // 256 * 256)
    return int(min(forward_default, budget))


__all__ = ["RULES", "TARGETS", "Explainer", "rules", "identity_rule", "divide_gradient", "forward_backward", "input_relevance"]
