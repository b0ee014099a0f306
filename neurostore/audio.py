"""Speech: decode audio files, and run speech encoders and audio-language models over them.

Audio is decoded with ``soundfile`` and resampled with ``scipy.signal.resample_poly`` (torchaudio
has no build for torch 2.13 and breaks transformers' imports when installed beside it). Every
frame of a speech encoder (wav2vec2, HuBERT, WavLM, the Whisper encoder) is a token row of kind
``audio``; an audio-language model (Qwen2-Audio, Audio Flamingo 3, Qwen2.5-Omni's thinker) has
text, special and audio token rows on its language model, the audio rows being the placeholder
positions (``<|AUDIO|>``, ``<sound>``) its encoder's output fills.

Row counts come from sample counts alone (``soundfile.info`` at corpus reading), so the batch plan
is made before anything is decoded; each batch decodes its own utterances (timed as ``decode``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import NeurostoreError

ENCODERS = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "whisper")
LALMS = ("qwen2_audio", "audioflamingo3", "qwen2_5_omni_thinker", "qwen2_5_omni")  # qwen2_5_omni: its thinker alone
ENCODER_READ = ("qwen2_audio", "audioflamingo3", "qwen2_5_omni_thinker")  # audio-language models whose encoder is read as audio.* sites
# per audio-language model: its class, and the name its forward gives the mel frames' mask
LALM_CLASS = {"qwen2_audio": "Qwen2AudioForConditionalGeneration", "audioflamingo3": "AudioFlamingo3ForConditionalGeneration",
              "qwen2_5_omni_thinker": "Qwen2_5OmniThinkerForConditionalGeneration"}
LALM_MASK = {"qwen2_audio": "feature_attention_mask", "audioflamingo3": "input_features_mask", "qwen2_5_omni_thinker": "feature_attention_mask"}
AUDIO_TYPES = ENCODERS + LALMS
NO_TOKEN = -1  # tokens/token_id of a speech encoder's frames: no vocabulary behind them
UNBOUNDED = 1 << 30  # max_rows of a speech encoder: any number of frames (read it as "no length limit")


def _soundfile():
    try:
        import soundfile
    except ImportError:
        raise NeurostoreError("reading audio needs soundfile: pip install 'neurostore[speech]'") from None
    return soundfile


def _open(ref: str, storage_options: dict | None = None):
    """A local path as is, an fsspec URL as an open binary file."""
    if "://" in ref and not ref.startswith("file://"):
        import fsspec

        return fsspec.open(ref, "rb", **(storage_options or {})).open()
    return ref.removeprefix("file://")


def probe(ref: str, storage_options: dict | None = None) -> tuple[int, int]:
    """(frames, sample rate) of an audio file, from its header. Raises what soundfile raises."""
    sf = _soundfile()
    if "://" not in ref and not os.path.exists(ref):
        raise FileNotFoundError(ref)
    info = sf.info(_open(ref, storage_options))
    if info.frames <= 0:
        raise ValueError("no samples")
    return int(info.frames), int(info.samplerate)


def check_row(corpus_file, value: Any, storage_options: dict | None = None) -> tuple[str | None, str, int, int]:
    """(problem or None, the file's absolute path or URL, frames, sample rate) of one corpus row's audio."""
    if not isinstance(value, str) or not value.strip():
        return "no audio file named (empty or not a string)", "", 0, 0
    ref = value.strip()
    if "://" not in ref and not os.path.isabs(ref):
        ref = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(corpus_file)), ref))
    try:
        frames, rate = probe(ref, storage_options)
    except FileNotFoundError:
        return f"audio file {value!r}: no such file ({ref})", ref, 0, 0
    except NeurostoreError:
        raise
    except Exception as err:  # noqa: BLE001 - libsndfile's errors, fsspec's, an empty file
        why = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return f"audio file {value!r}: cannot decode it ({why}); wav, flac, ogg and mp3 are read", ref, 0, 0
    return None, ref, frames, rate


def resampled_length(frames: int, rate: int, target: int) -> int:
    """Samples after ``resample_poly(x, up, down)``: ceil(frames * up / down)."""
    g = math.gcd(rate, target)
    up, down = target // g, rate // g
    return -(-frames * up // down)


def load_waveform(ref: str, target: int, storage_options: dict | None = None) -> np.ndarray:
    """The file's samples as float32 mono at ``target`` Hz (channels averaged)."""
    from scipy.signal import resample_poly

    data, rate = _soundfile().read(_open(ref, storage_options), dtype="float32", always_2d=True)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != target:
        g = math.gcd(rate, target)
        mono = resample_poly(mono, target // g, rate // g).astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


@dataclass
class AudioModel:
    """What extraction needs to feed an audio model: its feature extractor and the row arithmetic."""

    family: str  # "encoder", "whisper" or "lalm"
    extractor: Any
    rate: int
    processor: Any = None
    audio_token_id: int | None = None
    batchable: bool = True  # False: group-norm wav2vec2 without attention mask, one utterance a batch
    refs: list[str] = field(default_factory=list)  # bound by rows(): the utterances of the corpus part
    storage_options: dict | None = None
    seconds: float = 0.0  # decode + resample + feature extraction, for the benchmark
    tower: Any = None  # an audio-language model's audio encoder (its blocks: ``tower.layers``), for the ``audio.*`` sites


def is_audio(config: Any) -> bool:
    return getattr(config, "model_type", None) in AUDIO_TYPES


def refuse_remote(path: str, err: Exception, trust_remote_code: bool) -> None:
    """One line for a checkpoint whose architecture needs code from its repository."""
    if "trust_remote_code" in str(err) and not trust_remote_code:
        raise NeurostoreError(
            f"cannot load model {path!r}: its architecture needs code from the model's repository; "
            "review that code, then pass --trust-remote-code"
        ) from None


def load(path: str, name: str | None, config: Any, device: torch.device, dtype: torch.dtype | None, trust_remote_code: bool = False):
    """Load an audio model (:data:`AUDIO_TYPES`) and its feature extractor as a ``LoadedModel``."""
    import transformers as T

    from .models import LoadedModel, _first_line

    family = "lalm" if config.model_type in LALMS else "whisper" if config.model_type == "whisper" else "encoder"
    weights = dtype if (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)) else torch.float32
    try:
        if config.model_type.startswith("qwen2_5_omni"):
            config, model, processor, extractor, tokenizer = _load_omni(path, config, weights)
        elif family == "lalm":
            processor = T.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
            extractor, tokenizer = processor.feature_extractor, processor.tokenizer
            model = getattr(T, LALM_CLASS[config.model_type]).from_pretrained(path, dtype=weights)
        else:
            processor, tokenizer = None, None
            extractor = T.AutoFeatureExtractor.from_pretrained(path)
            model = T.AutoModel.from_pretrained(path, dtype=weights)
            if family == "whisper":
                model = model.get_encoder()
    except NeurostoreError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a bad folder
        refuse_remote(path, err, trust_remote_code)
        raise NeurostoreError(f"cannot load audio model {path!r}: {_first_line(err)}") from None
    model.eval().requires_grad_(False).to(device)
    spec = AudioModel(family, extractor, int(extractor.sampling_rate), processor)
    if family == "lalm":
        spec.audio_token_id = int(processor.audio_token_id)
        spec.tower = model.model.audio_tower if config.model_type in ENCODER_READ else None
        text = config.text_config
        n_layers, hidden, blocks = text.num_hidden_layers, text.hidden_size, model.model.language_model.layers
    elif family == "whisper":
        n_layers, hidden, blocks = config.encoder_layers, config.d_model, model.layers
    else:
        n_layers, hidden, blocks = config.num_hidden_layers, config.hidden_size, model.encoder.layers
        spec.batchable = bool(getattr(extractor, "return_attention_mask", False))
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name=name or path, model_type=config.model_type, n_layers=int(n_layers),
                         hidden_size=int(hidden), device=device, classes=None, blocks=blocks, config=config, path=path)
    loaded.audio = spec
    return loaded


def _load_omni(path: str, config: Any, weights: torch.dtype):
    """Qwen2.5-Omni's thinker (its audio encoder and language model; no talker), its tokenizer and
    feature extractor. Its processor is not loaded: it needs torchvision's video processor, and the
    audio rows need only the audio tokens' names (the tokenizer's, else Qwen2.5-Omni's own)."""
    import types

    import transformers as T

    tokenizer, extractor = T.AutoTokenizer.from_pretrained(path), T.AutoFeatureExtractor.from_pretrained(path)
    if config.model_type == "qwen2_5_omni":  # the whole model's checkpoint: its thinker's weights alone
        model = T.Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=weights, enable_audio_output=False).thinker
        config = config.thinker_config
    else:
        model = T.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=weights)
    names = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
    processor = types.SimpleNamespace(**{k: getattr(tokenizer, k, None) or v for k, v in names.items()}, audio_token_id=config.audio_token_index)
    return config, model, processor, extractor, tokenizer


def max_rows(loaded) -> int:
    """The longest row count the model takes: the LM's positions, a Whisper window, else unbounded."""
    spec = loaded.audio
    if spec.family == "lalm":
        return int(loaded.config.text_config.max_position_embeddings)
    if spec.family == "whisper":
        return int(loaded.config.max_source_positions)
    return UNBOUNDED


def _mel_frames(spec: AudioModel, samples: int) -> int:
    """Real mel frames of a Whisper-style extractor (its attention mask), the input cut at its window."""
    return -(-min(samples, int(spec.extractor.n_samples)) // int(spec.extractor.hop_length))


def _windows(loaded, samples: int) -> list[int]:
    """Audio Flamingo 3's windows of one utterance (its processor's cut): ``n_samples`` each, the last
    one shorter, at most ``max_audio_len`` seconds in all."""
    window = int(loaded.audio.extractor.n_samples)
    most = int(loaded.audio.processor.max_audio_len // loaded.audio.extractor.chunk_length)
    n = min(max(1, -(-samples // window)), most)
    kept = min(samples, n * window)
    return [min(window, kept - i * window) for i in range(n)]


def _cut(loaded, samples: int) -> bool:
    """Whether the model sees less than the whole utterance (a Whisper window, AF3's ``max_audio_len``)."""
    spec = loaded.audio
    if spec.family == "encoder":
        return False
    if loaded.model_type == "audioflamingo3":
        return samples > sum(_windows(loaded, samples))
    return samples > int(spec.extractor.n_samples)


def audio_rows(loaded, samples: int) -> int:
    """Frames (encoders) or audio placeholder tokens (LALM) of an utterance of ``samples`` samples."""
    spec = loaded.audio
    if spec.family == "encoder":
        return int(loaded.model._get_feat_extract_output_lengths(torch.tensor(samples)))
    if loaded.model_type == "audioflamingo3":  # the processor counts the windows' mel frames together
        mel = sum(_mel_frames(spec, n) for n in _windows(loaded, samples))
        return ((mel - 1) // 2 + 1 - 2) // 2 + 1
    frames = (_mel_frames(spec, samples) - 1) // 2 + 1
    return frames if spec.family == "whisper" else (frames - 2) // 2 + 1


def prompt_text(loaded, prompt: str | None) -> str:
    """The LM's text for one utterance: the audio placeholder, then the prompt."""
    proc = loaded.audio.processor
    tag = f"{getattr(proc, 'audio_bos_token', '')}{proc.audio_token}{getattr(proc, 'audio_eos_token', '')}"
    prompt = prompt or ""
    return prompt if proc.audio_token in prompt else tag + prompt


def rows(loaded, corpus, max_length: int, storage_options: dict | None = None):
    """Per utterance: the token row ids, whether cut, and the rows' kinds (``batching.TokenDetails``).

    Binds the corpus part's audio files to the model for :func:`features`.
    """
    from . import batching

    spec = loaded.audio
    spec.refs, spec.storage_options, spec.seconds = list(corpus.audio), storage_options, 0.0
    samples = [resampled_length(n, r, spec.rate) for n, r in zip(corpus.audio_frames, corpus.audio_rates)]
    counts = [audio_rows(loaded, n) for n in samples]
    empty = [i for i, c in enumerate(counts) if c < 1]
    if empty:  # a clip too short for one frame or audio token would be a sentence with no rows (or pooled zeros)
        i = empty[0]
        raise NeurostoreError(
            f"utterance {i} ({corpus.audio[i]}): {samples[i] / spec.rate * 1000:.0f} ms of audio gives {loaded.model_type} no "
            f"{'audio token' if spec.family == 'lalm' else 'frame'}" + (f" ({len(empty)} such clips)" if len(empty) > 1 else "")
            + "; drop it from the corpus"
        )
    if spec.family != "lalm":
        cut = np.array([_cut(loaded, n) for n in samples], dtype=bool)
        ids = [[NO_TOKEN] * c for c in counts]
        total = sum(counts)
        details = batching.TokenDetails(np.full(total, 2, np.int8), np.full((total, 2), -1, np.int32), {})
        return ids, cut, details
    proc = spec.processor
    texts = [prompt_text(loaded, p).replace(proc.audio_token, proc.audio_token * c, 1) for p, c in zip(corpus.prompts, counts)]
    ids, cut, details = batching.tokenize_details(loaded.tokenizer, texts, max_length)
    if cut.any():
        row = int(np.flatnonzero(cut)[0])
        raise NeurostoreError(
            f"utterance {row} ({corpus.audio[row]}): {len(ids[row])}+ tokens with its audio, over --max-length {max_length}; "
            "raise --max-length or shorten the audio"
        )
    flat = np.fromiter((t for r in ids for t in r), dtype=np.int64, count=int(sum(map(len, ids))))
    details.kind[flat == spec.audio_token_id] = 2
    details.offsets[:] = -1  # spans of the prompt, not of docs/text
    details.special.pop(spec.audio_token_id, None)
    return ids, cut | np.array([_cut(loaded, n) for n in samples], dtype=bool), details


def features(loaded, docs, device: torch.device) -> dict[str, torch.Tensor]:
    """Decode, resample and featurise the batch's utterances: the model's audio inputs on ``device``."""
    spec = loaded.audio
    t = time.perf_counter()
    waves = [load_waveform(spec.refs[i], spec.rate, spec.storage_options) for i in np.asarray(docs).tolist()]
    if spec.family == "encoder":
        enc = spec.extractor(waves, sampling_rate=spec.rate, padding=True, return_attention_mask=spec.batchable, return_tensors="pt")
        out = {"input_values": enc["input_values"]}
        if spec.batchable:
            out["attention_mask"] = enc["attention_mask"]
    elif spec.family == "whisper":
        out = {"input_features": spec.extractor(waves, sampling_rate=spec.rate, return_tensors="pt")["input_features"]}
    else:
        out = _lalm_audio(loaded, waves)
    spec.seconds += time.perf_counter() - t
    return {k: v.to(device) for k, v in out.items()}


def _lalm_audio(loaded, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """An audio-language model's mel frames and their mask, as its processor makes them (AF3: the
    utterances' windows one after another, each window a row)."""
    spec = loaded.audio
    if loaded.model_type == "audioflamingo3":
        waves = [w[i * spec.extractor.n_samples:][:n] for w in waves for i, n in enumerate(_windows(loaded, len(w)))]
    enc = spec.extractor(waves, sampling_rate=spec.rate, return_attention_mask=True, padding="max_length", return_tensors="pt")
    return {"input_features": enc["input_features"], LALM_MASK[loaded.model_type]: enc["attention_mask"]}


def forward(loaded, inputs: dict[str, torch.Tensor], want_hidden: bool):
    """One forward pass over a batch; hidden states cut to the batch's longest row count."""
    spec, audio = loaded.audio, inputs["audio"]
    if spec.family == "lalm":
        return loaded.model(input_ids=inputs["ids"], attention_mask=inputs["mask"], output_hidden_states=want_hidden, **audio)
    return loaded.model(**audio, output_hidden_states=want_hidden)


def measure_widths(loaded, sites: dict) -> None:
    """Each site's width from a dry run on 0.1 s of silence."""
    from .models import capture

    spec = loaded.audio
    hooked = {name: s.modules for name, s in sites.items() if s.modules}
    wave = [np.zeros(spec.rate // 10, np.float32)]
    if spec.family == "encoder":
        audio = {"input_values": spec.extractor(wave, sampling_rate=spec.rate, return_tensors="pt")["input_values"]}
        ids = None
    elif spec.family == "whisper":
        audio = {"input_features": spec.extractor(wave, sampling_rate=spec.rate, return_tensors="pt")["input_features"]}
        ids = None
    else:
        audio = _lalm_audio(loaded, wave)
        text = prompt_text(loaded, "").replace(spec.processor.audio_token, spec.processor.audio_token * audio_rows(loaded, len(wave[0])))
        ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
    inputs = {"audio": {k: v.to(loaded.device) for k, v in audio.items()}}
    if ids is not None:
        inputs.update(ids=ids.to(loaded.device), mask=torch.ones_like(ids).to(loaded.device))
    with capture(hooked) as captured, encoder_capture(loaded, sites) as encoded, torch.inference_mode():
        out = forward(loaded, inputs, True)
    for name, site in sites.items():
        got = encoded.get(name) or captured.get(name)
        site.width = int(out.hidden_states[0].shape[-1] if name == "resid" else got[0].shape[-1])


def layers_of(loaded, out, sites: dict, captured: dict, encoded: dict, inputs: dict) -> dict[str, list[torch.Tensor]]:
    """Each site's layers ``[B, rows, width]``: Whisper's window is longer than its real frames; the
    audio encoder's layers (``audio.*``) are brought to the language model's rows (:func:`_to_lm_rows`)."""
    rows = int(inputs["mask"].shape[1])
    got = {}
    for name, site in sites.items():
        if name in encoded:
            got[name] = [_to_lm_rows(loaded, h, pooled, inputs) for h, pooled in zip(encoded[name], _already_pooled(loaded, site))]
        else:
            got[name] = [out.hidden_states[i] for i in site.layers] if name == "resid" else list(captured[name])
    return {name: [h[:, :rows] for h in hs] for name, hs in got.items()}


# ----------------------------------------------------------------------------------------------
# The audio encoder of an audio-language model as sites of its own: ``audio.resid`` and ``audio.mlp``
#
# Its frames run at twice the rate of the audio tokens the language model reads: each encoder averages
# pairs of frames before its final norm and the projector (Qwen2-Audio and Audio Flamingo 3: ``avg_pooler``
# over a batch of windows, AF3's an utterance's 30 s windows in order; Qwen2.5-Omni: pairs within each
# utterance of the batch's frames concatenated, one flat ``[frames, width]`` tensor). Each
# stored layer is pooled by the encoder's own pooler and placed on the language model's audio rows,
# so that row i of ``audio.resid`` and of ``resid`` is the same stretch of speech; text and special
# rows hold zeros, and the store marks the site ``rows: audio`` so that queries read its audio rows only.

ENCODER_SITES = ("audio.resid", "audio.mlp")


def _tower(loaded, site: str):
    spec = loaded.audio
    if site not in ENCODER_SITES:
        raise NeurostoreError(f"unknown site {site!r}: use resid, mlp, audio.resid or audio.mlp")
    if spec.family != "lalm":
        raise NeurostoreError(
            f"site {site}: {loaded.model_type} is a speech encoder, whose layers are the sites resid and mlp; "
            "audio.* sites are the audio encoder of an audio-language model"
        )
    if spec.tower is None:
        raise NeurostoreError(
            f"site {site}: the audio encoder of {loaded.model_type} is not read yet (audio.* sites: {', '.join(ENCODER_READ)}); "
            "its language model's sites resid and mlp are"
        )
    return spec.tower


def encoder_site(loaded, site: str, layers: list[int] | None):
    """The ``models.Site`` of an ``audio.*`` site: encoder layers 0..L (resid: 0 is the block input,
    L the encoder's output as the projector reads it) or 0..L-1 (mlp), values on audio rows only."""
    from .models import Site, _pick_layers

    tower = _tower(loaded, site)
    n = len(tower.layers)
    if site == "audio.mlp":
        acts = [block.activation_fn for block in tower.layers]
        if len({id(m) for m in acts}) != n:
            raise NeurostoreError(f"site audio.mlp: {loaded.model_type}'s encoder shares one activation module between blocks")
    available = list(range(n + 1 if site == "audio.resid" else n))
    return Site(site, _pick_layers(site, available, layers), 0, None, row_kind="audio")


def _already_pooled(loaded, site) -> list[bool]:
    """Per stored layer: whether the value is already at the audio-token rate (the encoder's output)."""
    n = len(loaded.audio.tower.layers)
    return [site.name == "audio.resid" and layer == n for layer in site.layers]


@contextlib.contextmanager
def encoder_capture(loaded, sites: dict):
    """Hooks on the audio encoder for the ``audio.*`` sites among ``sites``; yields
    ``{site: [tensor per stored layer]}`` filled by the next forward, removed on exit."""
    wanted = {name: s for name, s in sites.items() if name in ENCODER_SITES}
    captured: dict[str, list] = {name: [None] * len(s.layers) for name, s in wanted.items()}
    handles = []

    def keep(name: str, j: int, what: str):
        def hook(_module, args, output):
            if what == "input":  # a pre-hook with kwargs: (module, args, kwargs)
                value = args[0] if args else output["hidden_states"]
            else:
                value = output
            if what == "output" and hasattr(value, "last_hidden_state"):
                value = value.last_hidden_state
            captured[name][j] = value[0] if isinstance(value, tuple) else value

        return hook

    try:
        for name, site in wanted.items():
            tower = _tower(loaded, name)
            n = len(tower.layers)
            for j, layer in enumerate(site.layers):
                if name == "audio.mlp":
                    handles.append(tower.layers[layer].activation_fn.register_forward_hook(keep(name, j, "output")))
                elif layer == 0:
                    handles.append(tower.layers[0].register_forward_pre_hook(keep(name, j, "input"), with_kwargs=True))
                elif layer < n:
                    handles.append(tower.layers[layer - 1].register_forward_hook(keep(name, j, "output")))
                else:  # the encoder's output before its projection (Qwen2.5-Omni: ln_post, then proj)
                    final = tower.ln_post if hasattr(tower, "ln_post") else tower
                    handles.append(final.register_forward_hook(keep(name, j, "output")))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def audio_token_counts(loaded, inputs: dict) -> torch.Tensor:
    """Audio tokens per utterance of the batch, as the model counts them from its feature mask."""
    mel = inputs["audio"][LALM_MASK[loaded.model_type]].sum(-1)  # per utterance, or per window (AF3: the windows in order)
    return loaded.audio.tower._get_feat_extract_output_lengths(mel)[1]


def row_masks(loaded, sites: dict, inputs: dict) -> dict[str, torch.Tensor]:
    """``[B, rows]`` masks of the rows that hold values, for the sites stored on some rows only
    (pooled vectors of an ``audio.*`` site average its audio rows, not the prompt's zeros)."""
    if not any(s.row_kind for s in sites.values()):
        return {}
    audio_rows_ = inputs["ids"] == loaded.audio.audio_token_id
    return {name: audio_rows_ for name, s in sites.items() if s.row_kind == "audio"}


def _to_lm_rows(loaded, h: torch.Tensor, pooled: bool, inputs: dict) -> torch.Tensor:
    """Encoder frames ``[B, T, W]`` as the language model's rows ``[B, S, W]``: pooled to the token
    rate by the encoder's own pooler, each utterance's first n tokens (n as the model counts them)
    placed on its ``<|AUDIO|>`` positions in order, the way the model fills them; zeros elsewhere."""
    spec = loaded.audio
    ids = inputs["ids"]
    if h.dim() == 2:  # Qwen2.5-Omni: the utterances' frames concatenated; already the tokens when pooled
        if "pairs" not in inputs:  # the batch's pair indices, computed once (a host sync) for all its layers
            inputs["pairs"] = _pair_starts(inputs["audio"][LALM_MASK[loaded.model_type]].sum(-1)).to(h.device)
        tokens = h if pooled else (h[inputs["pairs"]] + h[inputs["pairs"] + 1]) / 2
    else:
        if not pooled:
            h = spec.tower.avg_pooler(h.transpose(1, 2)).transpose(1, 2)
        counts = audio_token_counts(loaded, inputs).to(h.device)
        tokens = h[torch.arange(h.shape[1], device=h.device)[None, :] < counts[:, None]]
    out = h.new_zeros((ids.shape[0], ids.shape[1], h.shape[-1]))
    out[ids == spec.audio_token_id] = tokens
    return out


def _pair_starts(mel: torch.Tensor) -> torch.Tensor:
    """The first frame of each pair (2k, 2k+1) within each utterance of a flat ``[frames, width]``
    tensor whose utterances have ``(mel - 1) // 2 + 1`` frames each: ``(frames - 2) // 2 + 1`` tokens
    apiece, in order."""
    frames = ((mel - 1) // 2 + 1).tolist()
    starts = np.concatenate(([0], np.cumsum(frames)[:-1]))
    return torch.from_numpy(np.concatenate([s + 2 * np.arange((c - 2) // 2 + 1) for s, c in zip(starts, frames)]))
