"""`extract` as a new user meets it: missing label/language columns, unusable rows, an unwritable or
existing --out, option defaults in --help, model names that are the packaged default or unreachable,
and the store's size checked against the free space before anything is written."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cli.main import app
from neurostore import models, space
from neurostore.extract import ExtractOptions, extract

runner = CliRunner()


def invoke(*args, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def assert_one_line(result, prefix: str, *fragments: str) -> str:
    """Exactly one stderr line starting with ``prefix``, no traceback; returns it."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output + result.stderr
    text = result.stderr.strip()
    assert text.startswith(prefix) and "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


def info(store: Path) -> dict:
    result = invoke("info", store, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture()
def emotions_csv(tmp_path) -> Path:
    """The issue's corpus: columns named otherwise than text/label/lang."""
    path = tmp_path / "corpus.csv"
    path.write_text(
        "sentence,emotion,language\nI am so happy today,joy,en\nEstoy muy triste,sadness,es\nIt rains.,neutral,en\n",
        encoding="utf-8",
    )
    return path


COLUMNS = ("--text-col", "sentence", "--label-col", "emotion", "--lang-col", "language")


# ----------------------------------------------------------------------------------------------
# A. label and language columns; --skip-bad


def test_missing_label_and_lang_columns_warn_once_and_are_recorded(emotions_csv, tmp_path, tiny_models):
    out = tmp_path / "s.zarr"
    result = invoke("extract", emotions_csv, "--text-col", "sentence", "--out", out, "--model", tiny_models["bert"], "-q")
    assert result.exit_code == 0, result.output
    assert_one_line(result, "warning:", "corpus.csv", "sentence, emotion, language", "--label-col", "--lang-col")
    got = info(out)
    assert got["sources"] == {"label": None, "lang": None}
    assert got["counts"]["label"] == {"(missing)": 3}
    table = invoke("info", out)
    assert table.exit_code == 0 and "labels from" in table.stdout and "--label-col" in table.stdout

    named = tmp_path / "named.zarr"
    result = invoke("extract", emotions_csv, "--text-col", "sentence", "--label-col", "emotion", "--lang-col", "language",
                    "--out", named, "--model", tiny_models["bert"], "-q")
    assert result.exit_code == 0 and result.stderr.strip() == "", result.stderr
    got = info(named)
    assert got["sources"] == {"label": "column 'emotion'", "lang": "column 'language'"}
    assert got["counts"]["lang"] == {"en": 2, "es": 1}


def test_lang_option_and_one_missing_column(emotions_csv, tmp_path, tiny_models):
    out = tmp_path / "s.zarr"
    result = invoke("extract", emotions_csv, "--text-col", "sentence", "--lang", "en", "--out", out, "--model", tiny_models["bert"], "-q")
    assert result.exit_code == 0, result.output
    line = assert_one_line(result, "warning:", "no column 'label'", "--label-col")
    assert "--lang-col" not in line  # --lang gave the languages
    assert info(out)["sources"] == {"label": None, "lang": "--lang en"}


@pytest.fixture()
def bad_rows(tmp_path) -> Path:
    path = tmp_path / "bad.jsonl"
    rows = [{"text": "fine one", "label": "a"}, {"text": "  ", "label": "b"}, {"text": "fine two", "label": "a"},
            {"label": "c"}, {"text": 7, "label": "c"}, {"text": "fine three", "label": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_bad_rows_error_names_the_row_or_are_skipped_and_counted(bad_rows, tmp_path, tiny_models):
    out = tmp_path / "s.zarr"
    refused = invoke("extract", bad_rows, "--out", out, "--model", tiny_models["bert"], "-q")
    assert refused.exit_code == 2
    assert_one_line(refused, "error:", "bad.jsonl:2", "empty text", "--skip-bad")
    assert not out.exists()

    done = invoke("extract", bad_rows, "--out", out, "--model", tiny_models["bert"], "-q", "--skip-bad")
    assert done.exit_code == 0, done.output
    assert "3 unusable corpus rows skipped" in done.stdout
    got = info(out)
    assert got["skipped"] == 3 and got["docs"] == 3
    assert got["counts"]["label"] == {"a": 2, "b": 1}
    texts = list(zarr.open_group(str(out), mode="r")["docs/text"][:])
    assert texts == ["fine one", "fine two", "fine three"]
    assert "skipped rows" in invoke("info", out).stdout


def test_resume_reads_the_corpus_as_the_store_was_made(bad_rows, tmp_path, tiny_models):
    """A resume without --skip-bad skips the same rows (the store says it was made with it) and
    rewrites the same bytes."""
    out = tmp_path / "s.zarr"
    assert invoke("extract", bad_rows, "--out", out, "--model", tiny_models["bert"], "-q", "--skip-bad").exit_code == 0
    group = zarr.open_group(str(out), mode="r+")
    before = np.asarray(group["acts/resid"][:])
    meta = dict(group.attrs["neurostore"])
    group.attrs["neurostore"] = dict(meta, committed_docs=0, committed_tokens=0, complete=False)  # as if killed
    group["acts/resid"][:] = 0
    again = invoke("extract", bad_rows, "--out", out, "--resume", "-q")
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.asarray(zarr.open_group(str(out), mode="r")["acts/resid"][:]), before)
    assert info(out)["skipped"] == 3


# ----------------------------------------------------------------------------------------------
# B. --out that cannot be written; an existing folder is kept


def test_out_under_a_file_is_one_line(emotions_csv, tmp_path, tiny_models):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = invoke("extract", emotions_csv, *COLUMNS, "--out", blocker / "s.zarr", "--model", tiny_models["bert"], "-q")
    assert result.exit_code == 2
    assert_one_line(result, "error:", "is a file", "--out")


def test_out_in_a_read_only_folder_is_one_line(emotions_csv, tmp_path, tiny_models, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the permission check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder else real(p, mode, **kw))
    try:
        for out in (folder / "s.zarr", folder / "deeper" / "s.zarr"):
            result = invoke("extract", emotions_csv, *COLUMNS, "--out", out, "--model", tiny_models["bert"], "-q")
            assert result.exit_code == 2
            assert_one_line(result, "error:", "cannot write in", str(folder))
        assert list(folder.iterdir()) == []
        assert stat.S_IMODE(folder.stat().st_mode) == 0o555
    finally:
        folder.chmod(0o755)


def test_out_refused_by_the_system_is_one_line(emotions_csv, tmp_path, tiny_models, monkeypatch):
    """What no permission check foresees (ACLs, root on a pseudo file system): the folder cannot be made."""
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    result = invoke("extract", emotions_csv, *COLUMNS, "--out", tmp_path / "s.zarr", "--model", tiny_models["bert"], "-q")
    assert result.exit_code == 2
    assert_one_line(result, "error:", "cannot create the store's folder", "Operation not permitted")


def test_existing_empty_folder_is_kept_and_filled(emotions_csv, tmp_path, tiny_models):
    folder = tmp_path / "mine"
    folder.mkdir()
    folder.chmod(0o710)
    inode = folder.stat().st_ino
    result = invoke("extract", emotions_csv, "--text-col", "sentence", "--out", folder, "--model", tiny_models["bert"], "-q")
    assert result.exit_code == 0, result.output
    assert (folder / "zarr.json").exists() and (folder / "acts").is_dir()  # the store is the folder itself
    assert folder.stat().st_ino == inode and stat.S_IMODE(folder.stat().st_mode) == 0o710
    again = invoke("extract", emotions_csv, "--text-col", "sentence", "--out", folder, "--model", tiny_models["bert"], "-q", "--overwrite")
    assert again.exit_code == 0, again.output
    assert folder.stat().st_ino == inode and stat.S_IMODE(folder.stat().st_mode) == 0o710
    assert info(folder)["complete"]


# ----------------------------------------------------------------------------------------------
# C. every option shows its default


def test_help_shows_every_default():
    result = invoke("extract", "--help", env={"COLUMNS": "400", "TERM": "dumb"})
    assert result.exit_code == 0
    lines = [line for line in result.stdout.splitlines() if line.lstrip("│ ").startswith("--")]
    for fragment in ("[default: resid]", "[default: all layers]", "[default: first,mean]", "[default: the model's limit]",
                     "[default: auto from the device", "hidden_states[i]"):
        assert fragment in result.stdout, fragment
    for line in lines:
        if "<bool>" not in line:  # flags are off unless given
            assert "[default:" in line, line
    assert {"--max-batch-tokens", "--buffer-mb", "--sites", "--pool", "--layers", "--max-length"} <= {
        line.lstrip("│ ").split()[0] for line in lines if "[default:" in line}


# ----------------------------------------------------------------------------------------------
# D. model names: the packaged default by its name, an unreachable hub fails in seconds


@pytest.fixture()
def online(monkeypatch):
    """HF_HUB_OFFLINE unset and the hub at a local port that refuses connections (no network here)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(models, "_resolved", {})
    return port


def test_packaged_model_answers_to_its_name(minilm, online):
    assert models.resolve(models.DEFAULT_NAME) == str(minilm)
    assert models.resolve(None) == str(minilm)


def test_store_model_name_works_offline_for_extract_and_intervene(minilm, online, tmp_path, emotions_csv):
    name = models.DEFAULT_NAME
    out = tmp_path / "s.zarr"
    t = time.perf_counter()
    dry = invoke("extract", emotions_csv, "--text-col", "sentence", "--label-col", "emotion", "--lang-col", "language",
                 "--out", out, "--model", name, "--dry-run", "--format", "json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["arrays"][0]["shape"][1:] == [7, 384]  # MiniLM: 6 layers + embeddings
    # intervene loads it by the same name (then says it is no classifier): no hub, no wait
    result = invoke("intervene", emotions_csv, "--text-col", "sentence", "--label-col", "emotion", "--model", name,
                    "--neurons", "1:1", "--site", "resid")
    assert result.exit_code == 2
    assert_one_line(result, "error:", "neither a sequence classifier nor a causal LM")
    assert time.perf_counter() - t < 30


def test_unreachable_model_name_fails_in_seconds(online, tmp_path, emotions_csv):
    t = time.perf_counter()
    result = invoke("extract", emotions_csv, *COLUMNS, "--out", tmp_path / "s.zarr", "--model", "nobody/no-such-model", "-q")
    assert result.exit_code == 2
    assert_one_line(result, "error:", "nobody/no-such-model", "cannot be reached", "local model folder")
    assert time.perf_counter() - t < 5
    assert not (tmp_path / "s.zarr").exists()


def test_silent_hub_times_out(online, monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts, never answers
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(models, "HUB_TIMEOUT", 0.5)
        t = time.perf_counter()
        with pytest.raises(models.NeurostoreError, match="cannot be reached"):
            models.resolve("nobody/silent")
        assert time.perf_counter() - t < 3
    finally:
        server.close()


def test_offline_names_fail_at_once(monkeypatch, tmp_path, emotions_csv):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_resolved", {})
    result = invoke("extract", emotions_csv, *COLUMNS, "--out", tmp_path / "s.zarr", "--model", "nobody/no-such-model", "-q")
    assert result.exit_code == 2
    assert_one_line(result, "error:", "HF_HUB_OFFLINE")


# ----------------------------------------------------------------------------------------------
# E. the store's size against the free space


def test_estimate_counts_every_array():
    n_tokens = np.array([3, 5, 2])
    est = space.estimate({"resid": (4, 32), "mlp": (3, 48)}, store_dtype="float16", pool=["first", "mean"], tokens=True,
                         n_tokens=n_tokens, texts=["abc", "de", "é"], compression="lz4")
    by_name = {a["name"]: a for a in est.arrays}
    assert by_name["acts/resid"]["raw_bytes"] == 10 * 4 * 32 * 2
    assert by_name["acts/mlp"]["raw_bytes"] == 10 * 3 * 48 * 2
    assert by_name["pooled/mlp/mean"]["raw_bytes"] == 3 * 3 * 48 * 2
    activations = 2 * (10 + 3 + 3) * (4 * 32 + 3 * 48)
    assert by_name["docs/*"]["raw_bytes"] == 3 * space.DOC_TABLE_BYTES + 7
    assert est.raw_bytes == activations + 3 * space.DOC_TABLE_BYTES + 7 + 10 * space.TOKEN_TABLE_BYTES
    assert est.disk_bytes < est.raw_bytes + len(est.arrays) * space.ARRAY_OVERHEAD
    left = space.estimate({"resid": (4, 32)}, store_dtype="float32", pool=[], tokens=True, n_tokens=n_tokens,
                          compression="none", done_docs=2, done_tokens=8)
    assert left.resume and left.tokens == 2 and left.raw_bytes == left.disk_bytes == 2 * 4 * 32 * 4


Usage = namedtuple("Usage", "total used free")


def test_short_of_space_refuses_before_creating_anything(emotions_csv, tmp_path, tiny_models, monkeypatch):
    monkeypatch.setattr(space.shutil, "disk_usage", lambda path: Usage(10**6, 10**6 - 2048, 2048))
    out = tmp_path / "new" / "s.zarr"
    args = ("extract", emotions_csv, *COLUMNS, "--out", out, "--model", tiny_models["bert"], "-q")
    result = invoke(*args)
    assert result.exit_code == 1
    assert_one_line(result, "error:", "needs about", "2.0 KB free", "--no-space-check")
    assert not (tmp_path / "new").exists()
    forced = invoke(*args, "--no-space-check")
    assert forced.exit_code == 0, forced.output
    assert info(out)["complete"]


def test_library_refusal_is_a_fault(emotions_csv, tmp_path, tiny_models, monkeypatch):
    from neurostore.errors import Fault

    monkeypatch.setattr(space.shutil, "disk_usage", lambda path: Usage(10**6, 10**6, 0))
    corpus = dict(text_col="sentence", label_col="emotion", lang_col="language")
    with pytest.raises(Fault, match="needs about"):
        extract([str(emotions_csv)], str(tmp_path / "s.zarr"), model=str(tiny_models["bert"]), corpus_options=corpus)
    done = extract([str(emotions_csv)], str(tmp_path / "s.zarr"), model=str(tiny_models["bert"]), corpus_options=corpus,
                   options=ExtractOptions(device="cpu"), space_check=False)
    assert done.meta["complete"]


def test_dry_run_prints_the_estimate_and_creates_nothing(emotions_csv, tmp_path, tiny_models):
    out = tmp_path / "new" / "s.zarr"
    base = ("extract", emotions_csv, "--text-col", "sentence", "--label-col", "emotion", "--lang-col", "language",
            "--out", out, "--model", tiny_models["bert"], "--sites", "resid,mlp", "--dry-run")
    table = invoke(*base)
    assert table.exit_code == 0, table.output
    assert "nothing written" in table.stdout and "acts/mlp" in table.stdout and "fits" in table.stdout
    as_json = invoke(*base, "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    est = json.loads(as_json.stdout)
    assert est["tokens"] == est["tokens_total"] > 0 and est["docs"] == 3
    assert est["compression"] == "lz4" and est["ratio"] == space.COMPRESSION_RATIOS["lz4"]
    assert est["fits"] is True and est["free_bytes"] > 0 and est["free_at"] == str(tmp_path)
    assert {a["name"] for a in est["arrays"]} >= {"acts/resid", "acts/mlp", "pooled/resid/first", "pooled/mlp/mean"}
    assert not (tmp_path / "new").exists()

    remote = invoke("extract", emotions_csv, "--text-col", "sentence", "--out", "memory://nowhere", "--model", tiny_models["bert"],
                    "--dry-run", "--format", "json")
    assert remote.exit_code == 0, remote.output
    est = json.loads(remote.stdout)
    assert est["free_bytes"] is None and est["fits"] is None and "object store" in est["note"]


def test_dry_run_on_resume_counts_only_what_is_left(emotions_csv, tmp_path, tiny_models):
    out = tmp_path / "s.zarr"
    args = ("extract", emotions_csv, "--text-col", "sentence", "--out", out, "--model", tiny_models["bert"], "-q")
    assert invoke(*args).exit_code == 0
    est = json.loads(invoke(*args, "--resume", "--dry-run", "--format", "json").stdout)
    assert est["resume"] and est["tokens"] == 0 and est["disk_bytes"] == 0


def test_corpus_format_keeps_its_old_spelling(tmp_path, tiny_models):
    corpus = tmp_path / "corpus.data"
    corpus.write_text("one sentence\nanother sentence\n")
    for flag in ("--input-format", "--format"):
        out = tmp_path / f"{flag}.zarr"
        result = invoke("extract", corpus, flag, "text", "--out", out, "--model", tiny_models["bert"], "-q")
        assert result.exit_code == 0, result.output
        assert info(out)["docs"] == 2


@pytest.mark.slow  # extracts the sample corpus with the packaged MiniLM (~15 s on 2 cores)
def test_estimate_matches_the_store_on_disk(minilm, tmp_path):
    out = tmp_path / "s.zarr"
    est = json.loads(invoke("extract", "--out", out, "--dry-run", "--format", "json").stdout)
    assert invoke("extract", "--out", out, "-q").exit_code == 0
    on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert on_disk <= est["disk_bytes"] <= 1.05 * on_disk
