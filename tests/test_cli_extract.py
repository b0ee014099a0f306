"""The extract and info commands as a user meets them: one-line errors, JSON output, progress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    text = result.stderr.strip()
    assert "Traceback" not in result.output + result.stderr
    assert text.startswith("error:") and "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture()
def good(tmp_path) -> Path:
    path = tmp_path / "good.csv"
    path.write_text("text,label,lang\nI am so happy today,joy,en\nEstoy muy triste,sadness,es\nIt rains.,neutral,en\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "content, fragments",
    [
        (b'{"text": "fine"}\n{"text": "  "}\n', ["bad.jsonl:2", "empty text"]),
        (b'{"sentence": "fine"}\n', ["no column 'text'", "'sentence'"]),
        (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', ["bad.jsonl:2", "UTF-8"]),
        (b'{"text": "fine"}\n{"text": \n', ["bad.jsonl:2", "JSON"]),
        (b"", ["no sentences"]),
    ],
)
def test_bad_corpus(content, fragments, tmp_path, tiny_models):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    result = invoke("extract", bad, "--out", tmp_path / "s.zarr", "--model", tiny_models["bert"], "-q")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--sites", "attn"], ["unknown site 'attn'"]),
        (["--layers", "9"], ["--layers 9", "0-3"]),
        (["--layers", "a,b"], ["--layers"]),
        (["--dtype", "int8"], ["--dtype"]),
        (["--store-dtype", "float64"], ["--store-dtype"]),
        (["--pool", "max"], ["unknown pooling 'max'"]),
        (["--part", "2/2"], ["--part 2/2"]),
        (["--part", "x"], ["--part"]),
        (["--max-length", "100000"], ["--max-length"]),
        (["--text-col", "sentence"], ["no column 'sentence'", "'text'"]),
        (["--lang", "en,de"], ["--lang"]),
        (["--no-tokens", "--pool", "none"], ["store nothing"]),
    ],
)
def test_bad_options(args, fragments, good, tmp_path, tiny_models):
    result = invoke("extract", good, "--out", tmp_path / "s.zarr", "--model", tiny_models["bert"], "-q", *args)
    assert_one_line_error(result, *fragments)


def test_missing_file_and_bad_model(good, tmp_path):
    assert_one_line_error(invoke("extract", tmp_path / "nope.jsonl", "--out", tmp_path / "s.zarr"), "nope.jsonl", "no such file")
    assert_one_line_error(invoke("extract", good, "--out", tmp_path / "s.zarr", "--model", tmp_path / "no-model"), "no such folder")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert_one_line_error(invoke("extract", good, "--out", tmp_path / "s.zarr", "--model", empty), "cannot load model")


def test_existing_store_refused_then_resumed_and_info(good, tmp_path, tiny_models):
    out = tmp_path / "s.zarr"
    first = invoke("extract", good, "--out", out, "--model", tiny_models["bert"], "--sites", "resid,mlp", "--pool", "first,last")
    assert first.exit_code == 0, first.output
    assert_one_line_error(invoke("extract", good, "--out", out, "--model", tiny_models["bert"]), "already exists", "--resume", "--overwrite")
    again = invoke("extract", good, "--out", out, "--resume")  # model and options come from the store
    assert again.exit_code == 0 and "already complete" in again.output
    assert_one_line_error(invoke("extract", good, "--out", out, "--resume", "--sites", "resid"), "--sites resid differs")
    other = tmp_path / "other.csv"
    other.write_text("text\nsomething else\n")
    assert_one_line_error(invoke("extract", other, "--out", out, "--resume"), "another corpus")
    result = invoke("info", out, "--verify", "--format", "json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["complete"] and info["docs"] == 3 and info["verify"]["ok"]
    assert info["counts"]["label"] == {"joy": 1, "neutral": 1, "sadness": 1}
    assert info["counts"]["lang"] == {"en": 2, "es": 1}
    assert info["sites"]["mlp"]["width"] == 48 and info["sites"]["resid"]["n_layers"] == 4
    table = invoke("info", out)
    assert table.exit_code == 0 and "complete" in table.stdout and "sadness" in table.stdout
    overwritten = invoke("extract", good, "--out", out, "--model", tiny_models["bert"], "--overwrite", "-q")
    assert overwritten.exit_code == 0, overwritten.output


def test_refuses_to_write_into_a_foreign_folder(good, tmp_path, tiny_models):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"x")
    assert_one_line_error(invoke("extract", good, "--out", folder, "--model", tiny_models["bert"], "--overwrite"), "not a Zarr store")
    assert (folder / "cat.jpg").exists()


def test_info_errors(tmp_path):
    assert_one_line_error(invoke("info", tmp_path / "nothing.zarr"), "not a neurostore store")


def test_lang_per_file_and_text_format(tmp_path, tiny_models):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Hello there\nGood morning\n")
    b.write_text("Guten Morgen\n")
    out = tmp_path / "s.zarr"
    result = invoke("extract", a, b, "--lang", "en,de", "--out", out, "--model", tiny_models["bert"], "-q")
    assert result.exit_code == 0, result.output
    info = json.loads(invoke("info", out, "--format", "json").stdout)
    assert info["counts"]["lang"] == {"de": 1, "en": 2}
    assert info["counts"]["label"] == {"(missing)": 3}
