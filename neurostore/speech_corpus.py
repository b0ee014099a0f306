"""A small labelled speech corpus synthesized with espeak-ng, and a random speech encoder to read it.

Four "emotions" are voice settings, not acted emotion: joy speaks high and fast, sadness low, slow
and soft, anger loud and fast, neutral with espeak's defaults. That is enough for a selector to find
label-sensitive neurons and for tests and the demo to have real speech with labels and languages; it
is no benchmark of emotion recognition. Clips are 16 kHz mono 16-bit FLAC (espeak's 22050 Hz output
resampled with ``scipy.signal.resample_poly``); the output is deterministic for one espeak-ng
version. The repository's ``data/speech/`` was written by ``python -m neurostore.speech_corpus data``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import NeurostoreError

RATE = 16000
# espeak-ng options per label: -p pitch (0-99), -s words per minute, -a amplitude (0-200), -g word gap (10 ms)
VOICES = {
    "neutral": ["-p", "50", "-s", "160"],
    "joy": ["-p", "85", "-s", "200"],
    "sadness": ["-p", "20", "-s", "115", "-g", "6", "-a", "70"],
    "anger": ["-p", "40", "-s", "220", "-a", "190"],
}
# Short sentences, the same meaning in each language; four per language, one clip per (sentence, label).
SENTENCES = {
    "en": ["The train leaves at nine.", "We found the old letter.", "She opened the window.", "They are coming home today."],
    "es": ["El tren sale a las nueve.", "Encontramos la carta vieja.", "Ella abrió la ventana.", "Hoy vuelven a casa."],
    "fr": ["Le train part à neuf heures.", "Nous avons trouvé la vieille lettre.", "Elle a ouvert la fenêtre.", "Ils rentrent aujourd'hui."],
}


def available() -> bool:
    """Whether espeak-ng is on PATH (the only thing synthesis needs beyond soundfile)."""
    return shutil.which("espeak-ng") is not None


def speak(text: str, lang: str, options: Sequence[str]) -> np.ndarray:
    """espeak-ng's waveform of ``text`` as float32 at RATE, silence trimmed to 50 ms each side."""
    from scipy.signal import resample_poly

    try:
        wav = subprocess.run(["espeak-ng", "-v", lang, *options, "--stdout", text], check=True, capture_output=True).stdout
    except FileNotFoundError:
        raise NeurostoreError("speech synthesis needs espeak-ng on PATH (Debian/Ubuntu: apt-get install espeak-ng)") from None
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace").strip().splitlines()
        raise NeurostoreError(f"espeak-ng -v {lang} failed on {text!r}: {err[-1] if err else f'exit {e.returncode}'}") from None
    # a streaming WAV header (sizes 0x7fffffff) that libsndfile refuses: 16-bit mono PCM after 44 bytes
    rate = int.from_bytes(wav[24:28], "little")
    data = np.frombuffer(wav[44 : 44 + (len(wav) - 44) // 2 * 2], dtype="<i2").astype(np.float32) / 32768
    data = resample_poly(data, RATE, rate).astype(np.float32) if rate != RATE else data
    loud = np.flatnonzero(np.abs(data) > 0.01)
    pad = RATE // 20
    return data[max(0, loud[0] - pad) : loud[-1] + pad] if len(loud) else data


def synthesize(
    out_dir: str | Path, langs: Sequence[str] = tuple(SENTENCES), labels: Sequence[str] = tuple(VOICES),
    sentences: int = 4, clips: int | None = None,
) -> Path:
    """Write ``<out_dir>/speech/*.flac`` and ``<out_dir>/speech.jsonl`` (columns audio, label, lang,
    text; audio relative to the JSONL) and return the JSONL's path. Clips go sentence by sentence,
    then language, then label (the order of ``data/speech.jsonl``); ``clips`` keeps the first N, so a
    quick run still has every language and label. Refused in one line without espeak-ng or soundfile."""
    if not available():
        raise NeurostoreError("speech synthesis needs espeak-ng on PATH (Debian/Ubuntu: apt-get install espeak-ng)")
    try:
        import soundfile as sf
    except ImportError:
        raise NeurostoreError("writing speech clips needs soundfile: pip install 'neurostore[speech]'") from None
    unknown = [l for l in langs if l not in SENTENCES] + [g for g in labels if g not in VOICES]
    if unknown:
        raise NeurostoreError(f"speech corpus: no sentences or voice for {', '.join(unknown)} "
                              f"(languages: {', '.join(SENTENCES)}; labels: {', '.join(VOICES)})")
    if not 1 <= sentences <= 4:
        raise NeurostoreError(f"speech corpus: sentences={sentences}, expected 1 to 4")
    if clips is not None and clips < 1:
        raise NeurostoreError(f"--speech-clips {clips}: expected at least 1")
    out_dir = Path(out_dir)
    folder = out_dir / "speech"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    plan = [(n, l, g) for n in range(sentences) for l in langs for g in labels][:clips]
    for number, lang, label in plan:
        text = SENTENCES[lang][number]
        name = f"{lang}_{number}_{label}.flac"
        sf.write(folder / name, speak(text, lang, VOICES[label]), RATE, subtype="PCM_16")
        rows.append({"audio": f"speech/{name}", "label": label, "lang": lang, "text": text})
    path = out_dir / "speech.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# the real models' convolutional front end (320 samples a frame at 16 kHz), with few channels
_CONV = dict(conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))


def random_encoder(folder: str | Path, *, hidden: int = 64, layers: int = 3, seed: int = 0) -> Path:
    """Save a small wav2vec2 with RANDOM weights and its feature extractor in ``folder`` (nothing is
    downloaded). Its neurons still react to pitch, speed and loudness, which is what the synthesized
    corpus's labels are; it says nothing about what a trained model learns."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    config = T.Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden,
                              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                              do_stable_layer_norm=True, **_CONV)
    model = T.Wav2Vec2Model(config)
    extractor = T.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=RATE, padding_value=0.0, do_normalize=True,
                                           return_attention_mask=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bars = T.utils.logging.is_progress_bar_enabled()
    T.utils.logging.disable_progress_bar()  # "Writing model shards" of one tiny shard is noise in the demo's output
    try:
        model.save_pretrained(folder)
        extractor.save_pretrained(folder)
    finally:
        if bars:
            T.utils.logging.enable_progress_bar()
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m neurostore.speech_corpus [OUT_DIR]``: write OUT_DIR/speech/ and OUT_DIR/speech.jsonl."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m neurostore.speech_corpus [OUT_DIR]   (writes OUT_DIR/speech/ and OUT_DIR/speech.jsonl; default: .)"
    if args in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(args) > 1 or any(a.startswith("-") for a in args):
        print(usage, file=sys.stderr)
        return 2
    try:
        path = synthesize(Path(args[0] if args else "."))
    except NeurostoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    clips = sorted((path.parent / "speech").glob("*.flac"))
    print(f"{len(clips)} clips, {sum(c.stat().st_size for c in clips) / 1e6:.2f} MB -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
