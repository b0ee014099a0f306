"""Machine faults: a full disk or an I/O error at any write of an extraction is one line (exit 1),
leaves a store that ``info`` calls incomplete, and ``--resume`` completes it to the bytes of an
uninterrupted run. Bit flips and damaged metadata are found, named and never read as data."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import neurostore
from cli.main import app
from faults import FaultyStore, Plan
from neurostore import lock
from neurostore import store as st
from neurostore.errors import Fault, NeurostoreError
from neurostore.extract import ExtractOptions, extract
from test_extract import write_corpus

runner = CliRunner()
OPTIONS = dict(sites=["resid", "mlp"], pool=["first", "mean"], store_dtype="float16", buffer_mb=1, max_batch_tokens=64, device="cpu")


@pytest.fixture(scope="module")
def small(tiny_models, tmp_path_factory):
    """A loaded tiny model, a 40-sentence corpus and many small shards (so there are many writes)."""
    from neurostore import models

    root = tmp_path_factory.mktemp("faults")
    corpus = write_corpus(root / "c.jsonl", 40, seed=3)
    loaded = models.load(str(tiny_models["bert"]), torch.device("cpu"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(st, "CHUNK_BYTES", 2048)
        mp.setattr(st, "SHARD_BYTES", 8192)
        yield loaded, corpus, root


def _run(small, out: Path, plan: Plan | None = None, resume: bool = False, writers: int = 2):
    loaded, corpus, _ = small
    return extract([str(corpus)], str(out), model=loaded, options=ExtractOptions(**OPTIONS, writers=writers), resume=resume,
                   wrap_store=FaultyStore.wrapping(plan) if plan else None)


def files(path: Path) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(path):
        for name in names:
            full = os.path.join(d, name)
            out[os.path.relpath(full, path)] = Path(full).read_bytes()
    return out


@pytest.fixture(scope="module")
def reference(small):
    out = small[2] / "ref.zarr"
    plan = Plan()
    _run(small, out, plan)
    return files(out), plan.writes


def _check_fault(err: Fault, code: int) -> None:
    text = str(err)
    assert err.exit_code == 1 and "\n" not in text
    assert os.strerror(code) in text and "--resume" in text
    if code == errno.ENOSPC:
        assert "MiB free" in text


def _incomplete(out: Path) -> None:
    """What ``info`` meets: no store yet, a store whose creation never finished, or an incomplete one."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            store = neurostore.open(str(out))
        except NeurostoreError as err:
            assert type(err) is NeurostoreError and "not a neurostore store" in str(err), err
            return
    assert not store.complete and any("incomplete" in str(w.message) for w in caught)


@pytest.mark.slow  # ~2 x 60 extractions in-process, ~1 min
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_every_write_failing_once_resumes_to_identical_bytes(small, reference, code, tmp_path):
    ref, n_writes = reference
    assert n_writes > 20
    for n in range(1, n_writes + 1):
        out = tmp_path / f"s{n}.zarr"
        plan = Plan(fail_at=n, errno=code)
        with pytest.raises(Fault) as caught:
            _run(small, out, plan)
        assert plan.failed, n
        _check_fault(caught.value, code)
        _incomplete(out)
        _run(small, out, resume=True)
        assert files(out) == ref, f"write {n} ({plan.failed[0]})"


def test_a_few_failing_writes_resume(small, reference, tmp_path):
    """The fast form of the sweep: the lock, the store's creation, a shard, the last commit."""
    ref, n_writes = reference
    for n in (1, 2, n_writes // 2, n_writes):
        out = tmp_path / f"s{n}.zarr"
        with pytest.raises(Fault) as caught:
            _run(small, out, Plan(fail_at=n, errno=errno.ENOSPC))
        _check_fault(caught.value, errno.ENOSPC)
        assert not (out / lock.KEY).exists()  # released on the way out
        _run(small, out, resume=True)
        assert files(out) == ref


def test_full_disk_on_the_command_line(small, monkeypatch, tmp_path):
    """Through the CLI: one line on stderr, exit 1, then --resume completes."""
    loaded, corpus, _ = small
    plan = Plan(fail_at=30, errno=errno.ENOSPC)
    real = st.zarr_store
    monkeypatch.setattr(st, "zarr_store", lambda url, storage_options=None: FaultyStore(real(url, storage_options), plan))
    out = tmp_path / "s.zarr"
    args = ["extract", str(corpus), "--out", str(out), "--model", str(loaded.path), "--device", "cpu", "--quiet", "--buffer-mb", "1"]
    res = runner.invoke(app, args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert "No space left on device" in lines[0] and "--resume" in lines[0]
    plan.fail_at = None
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert neurostore.open(str(out)).complete


def test_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(small, tmp_path):
    out = tmp_path / "s.zarr"
    held = lock.acquire(st.zarr_store(str(out)), str(out))
    try:
        with pytest.raises(NeurostoreError, match=f"another extraction is writing this store .*pid {os.getpid()}") as caught:
            _run(small, out)
        assert caught.value.exit_code == 2
        res = runner.invoke(app, ["extract", str(small[1]), "--out", str(out), "--model", str(small[0].path), "--device", "cpu", "--quiet"])
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "another extraction" in res.stderr
    finally:
        lock.release(held)
    # a lock left by a process that is gone (pid of an exited child) is taken over, with a warning
    import json
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"host": __import__("socket").gethostname(), "pid": int(child.stdout), "token": "x", "started": "earlier"}
    (out / lock.KEY).write_text(json.dumps(dead))
    with pytest.warns(UserWarning, match="taking over the lock"):
        _run(small, out, resume=True)
    assert neurostore.open(str(out)).complete and not (out / lock.KEY).exists()


def test_an_empty_existing_folder_keeps_its_permissions(small, tmp_path):
    out = tmp_path / "empty"
    out.mkdir(mode=0o750)
    os.chmod(out, 0o750)
    _run(small, out)
    assert (os.stat(out).st_mode & 0o777) == 0o750 and neurostore.open(str(out)).complete


def _shard_files(out: Path, name: str) -> list[Path]:
    return sorted(p for p in (out / name).rglob("*") if p.is_file() and p.name != "zarr.json")


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture()
def store_copy(small, reference, tmp_path):
    import shutil

    out = tmp_path / "s.zarr"
    shutil.copytree(small[2] / "ref.zarr", out)
    return out


@pytest.mark.parametrize("name", ["acts/resid", "pooled/mlp/mean", "docs/text", "docs/label", "tokens/token_id", "tokens/doc", "tokens/kind"])
def test_a_flipped_bit_is_found_by_queries_and_verify(store_copy, name):
    target = _shard_files(store_copy, name)[0]
    _flip(target, 1 if not name.startswith(("acts", "pooled")) else 7)
    first = str(neurostore.open(str(store_copy)).sites["resid"]["layers"][0])  # the first chunk of a shard holds it
    args = {
        "acts/resid": ["variance", str(store_copy), "--tokens", "--layer", first, "--no-cache"],
        "pooled/mlp/mean": ["variance", str(store_copy), "--site", "mlp", "--layer", first, "--no-cache"],
        "tokens/kind": ["variance", str(store_copy), "--tokens", "--skip-special", "--no-cache"],
    }.get(name, ["top-examples", str(store_copy), "--tokens", "--neuron", "0", "--layer", first])
    from cli.query import app as query_app

    res = runner.invoke(query_app, args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert name in lines[0] and "rows" in lines[0] and "info --verify" in lines[0], lines[0]
    res = runner.invoke(app, ["info", str(store_copy), "--verify"])
    assert res.exit_code == 1 and name in res.output, res.output


@pytest.mark.parametrize("where", ["zarr.json", "docs/zarr.json", "acts/resid/zarr.json", "docs/label/zarr.json"])
@pytest.mark.parametrize("damage", ["empty", "truncated", "invalid"])
def test_damaged_metadata_is_one_line(store_copy, where, damage):
    path = store_copy / where
    text = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": text[: len(text) // 2], "invalid": b"\x00garbage"}[damage])
    for args in (["info", str(store_copy)], ["query", "variance", str(store_copy)]):
        res = runner.invoke(app, args)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
        assert where in lines[0] and "damaged" in lines[0], lines[0]


def test_an_unreadable_shard_is_one_line(store_copy):
    """An I/O error while reading (here the shard is a folder: EISDIR) names the array and rows."""
    target = _shard_files(store_copy, "acts/mlp")[0]
    target.unlink()
    target.mkdir()
    res = runner.invoke(app, ["query", "variance", str(store_copy), "--site", "mlp", "--tokens", "--no-cache"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "acts/mlp rows" in lines[0] and "I/O error" in lines[0], res.output


def test_checksums_are_in_every_chunk(store_copy):
    store = neurostore.open(str(store_copy))
    assert "checksums" in store.meta["features"]
    for name in ("acts/resid", "pooled/resid/first", "docs/text", "docs/lang", "tokens/doc"):
        arr = store.groups[0][name]
        codecs = arr.metadata.codecs[0].codecs if arr.shards else arr.metadata.codecs
        assert type(codecs[-1]).__name__ == "Crc32cCodec", name
    assert np.array_equal(np.asarray(store.acts("resid")[:5]), np.asarray(store.groups[0]["acts/resid"][:5]))


def _variance_json(path: Path) -> tuple[dict, list[str]]:
    import json

    res = runner.invoke(app, ["query", "variance", str(path), "--format", "json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), [l for l in res.stderr.splitlines() if l.strip()]


@pytest.mark.parametrize("damage", ["truncate", "flip", "metadata"])
def test_a_damaged_cache_entry_is_dropped_and_recomputed(store_copy, damage):
    fresh, warned = _variance_json(store_copy)  # computes and caches
    assert not warned
    entry = next(p for p in (store_copy / "cache").iterdir() if p.is_dir() and not p.name.startswith("."))
    target = {"metadata": entry / "zarr.json"}.get(damage) or _shard_files(entry, "mean")[0]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage != "flip" else data[:-9] + bytes([data[-9] ^ 0x01]) + data[-8:])
    again, warned = _variance_json(store_copy)
    assert again == fresh
    assert len(warned) == 1 and "cached statistics" in warned[0] and "recomputing" in warned[0], warned
    third, warned = _variance_json(store_copy)  # healed: read from the rewritten entry, no warning
    assert third == fresh and not warned


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_a_cache_write_on_a_full_disk_is_one_warning(store_copy, monkeypatch, code):
    from neurostore import cache

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(store_copy / "cache"))

    monkeypatch.setattr(cache, "_write_entry", full)
    got, warned = _variance_json(store_copy)
    monkeypatch.undo()
    ref, _ = _variance_json(store_copy)
    assert got == ref and len(warned) == 1 and "could not write the statistics cache" in warned[0], warned
    assert os.strerror(code) in warned[0], warned


def test_any_other_cache_write_failure_is_one_warning_too(store_copy, monkeypatch):
    from neurostore import cache

    def broken(*args, **kwargs):
        raise ValueError("codec pipeline refused the array")

    monkeypatch.setattr(cache, "_write_entry", broken)
    got, warned = _variance_json(store_copy)
    assert len(warned) == 1 and "could not write the statistics cache (ValueError: codec pipeline refused" in warned[0], warned
