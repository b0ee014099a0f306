"""The README's first command runs end to end (on a tiny model here, to stay fast), and its speech
part where espeak-ng is on PATH."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from neurostore import speech_corpus


def test_demo_writes_store_tables_and_figures(tmp_path, tiny_models, monkeypatch):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out-dir", str(out), "--model", str(tiny_models["bert"]), "--no-speech"])
    assert result.exit_code == 0, result.output + result.stderr
    for fragment in ("label-variance", "Spearman", "polyglot", "LAPE", "figures in"):
        assert fragment in result.stdout
    assert "speech" not in result.stdout and not (out / "speech.zarr").exists()
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert len(figures) == 5 and all(p.endswith(".png") and (out / "figures" / p).stat().st_size > 10_000 for p in figures)
    monkeypatch.setattr(speech_corpus, "available", lambda: False)  # auto: no espeak-ng, the speech part says it is skipped
    again = CliRunner().invoke(app, ["demo", "--out-dir", str(out), "--model", str(tiny_models["bert"])])
    assert again.exit_code == 0 and "already complete" in again.stdout
    assert "speech part skipped: espeak-ng is not on PATH" in again.stdout and not (out / "speech.zarr").exists()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the speech part synthesizes its corpus with espeak-ng")
def test_demo_speech_part(tmp_path, tiny_models):
    pytest.importorskip("soundfile")
    from neurostore import open as open_store

    out = tmp_path / "demo"
    args = ["demo", "--out-dir", str(out), "--model", str(tiny_models["bert"]), "--speech-clips", "24"]  # 2 sentences x en/es/fr x 4 voices
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + result.stderr
    assert "label-variance" in result.stdout and result.stdout.index("label-variance") < result.stdout.index("speech corpus")  # text first
    assert "random weights" in result.stdout and "label-sensitive MLP neurons" in result.stdout
    table = result.stdout[result.stdout.index("label-sensitive MLP neurons"):]
    for label in speech_corpus.VOICES:
        assert f"│ {label}" in table
    assert "LAPE language-specific MLP neurons (audio frames" in table
    store = open_store(str(out / "speech.zarr"))
    kinds = np.asarray(store.token_column("kind"))
    assert len(kinds) > 24 and (kinds == 2).all()  # every frame a token row of kind audio
    assert sorted(store.sites) == ["mlp", "resid"]
    packaged = (Path(__file__).resolve().parent.parent / "data" / "speech.jsonl").read_text(encoding="utf-8").splitlines()
    assert (out / "speech" / "speech.jsonl").read_text(encoding="utf-8").splitlines() == packaged[:24]  # data/speech.jsonl's rows, in order
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.stdout.count("already complete") == 2 and "exists: reusing it" in again.stdout


def test_demo_speech_without_espeak_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng on PATH
    result = CliRunner().invoke(app, ["demo", "--out-dir", str(tmp_path / "demo"), "--speech"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --speech: espeak-ng is not on PATH") and "Traceback" not in result.output
    assert not (tmp_path / "demo").exists()  # refused before any work


def test_synthesize_without_espeak_is_refused(tmp_path, monkeypatch):
    from neurostore.errors import NeurostoreError

    monkeypatch.setattr(speech_corpus, "available", lambda: False)
    with pytest.raises(NeurostoreError, match="espeak-ng"):
        speech_corpus.synthesize(tmp_path)
    # python -m neurostore.speech_corpus: the same refusal as one line and exit 2; usage errors too
    assert speech_corpus.main([str(tmp_path)]) == 2 and speech_corpus.main(["a", "b"]) == 2 and speech_corpus.main(["--help"]) == 0
    assert not (tmp_path / "speech.jsonl").exists()


def test_demo_speech_model_missing_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out-dir", str(tmp_path / "demo"), "--speech-model", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [f"error: --speech-model {tmp_path / 'nope'}: no such folder; give a speech encoder saved with save_pretrained, or leave it out"]
