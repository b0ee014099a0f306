"""Synthesize the small labelled speech corpus in data/speech/ with espeak-ng (Debian: ``espeak-ng``).

    python data/make_speech.py            # writes data/speech/*.flac and data/speech.jsonl

The voices, sentences and synthesis live in ``neurostore.speech_corpus`` (the demo's speech part uses
them too): four "emotions" that are voice settings (pitch, speed, loudness), three languages, four
sentences, 48 clips of 16 kHz mono 16-bit FLAC, so CI needs no espeak. The output is deterministic for
one espeak-ng version.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's neurostore, installed or not

from neurostore.speech_corpus import synthesize  # noqa: E402


def main() -> None:
    path = synthesize(HERE)
    folder = HERE / "speech"
    rows = sum(1 for _ in path.open(encoding="utf-8"))
    total = sum(p.stat().st_size for p in folder.glob("*.flac"))
    print(f"{rows} clips, {total / 1e6:.2f} MB in {folder}")


if __name__ == "__main__":
    main()
