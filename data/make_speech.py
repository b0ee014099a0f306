"""Synthesize the small labelled speech corpus in data/speech/ with espeak-ng (Debian: ``espeak-ng``).

    python data/make_speech.py            # writes data/speech/*.flac and data/speech.jsonl

Four "emotions" are voice settings, not acted emotion: joy speaks high and fast, sadness low, slow and
soft, anger loud and fast, neutral with espeak's defaults. That is
enough for a selector to find label-sensitive neurons and for tests to have real speech with
labels and languages; it is no benchmark of emotion recognition. Clips are 16 kHz mono 16-bit
FLAC (espeak's 22050 Hz output resampled with ``scipy.signal.resample_poly``), so CI needs no
espeak. The output is deterministic for one espeak-ng version.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

HERE = Path(__file__).resolve().parent
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


def speak(text: str, lang: str, options: list[str]) -> np.ndarray:
    """espeak-ng's waveform of ``text`` as float32 at RATE, silence trimmed to 50 ms each side."""
    wav = subprocess.run(["espeak-ng", "-v", lang, *options, "--stdout", text], check=True, capture_output=True).stdout
    # a streaming WAV header (sizes 0x7fffffff) that libsndfile refuses: 16-bit mono PCM after 44 bytes
    rate = int.from_bytes(wav[24:28], "little")
    data = np.frombuffer(wav[44 : 44 + (len(wav) - 44) // 2 * 2], dtype="<i2").astype(np.float32) / 32768
    data = resample_poly(data, RATE, rate).astype(np.float32) if rate != RATE else data
    loud = np.flatnonzero(np.abs(data) > 0.01)
    pad = RATE // 20
    return data[max(0, loud[0] - pad) : loud[-1] + pad] if len(loud) else data


def main() -> None:
    folder = HERE / "speech"
    folder.mkdir(exist_ok=True)
    rows = []
    for number in range(4):
        for lang, sentences in SENTENCES.items():
            for label, options in VOICES.items():
                name = f"{lang}_{number}_{label}.flac"
                sf.write(folder / name, speak(sentences[number], lang, options), RATE, subtype="PCM_16")
                rows.append({"audio": f"speech/{name}", "label": label, "lang": lang, "text": sentences[number]})
    (HERE / "speech.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    total = sum(p.stat().st_size for p in folder.glob("*.flac"))
    print(f"{len(rows)} clips, {total / 1e6:.2f} MB in {folder}")


if __name__ == "__main__":
    main()
