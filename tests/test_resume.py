"""A process SIGKILLed at any point, then resumed, leaves the same store as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import tiny

ROOT = Path(__file__).resolve().parent.parent
# small chunks and shards so that windows cross shard boundaries and the store has many files
ENV = {"NEUROSTORE_CHUNK_BYTES": "4096", "NEUROSTORE_SHARD_BYTES": "65536"}


def run(out: Path, model: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **ENV)
    env.pop("NEUROSTORE_FAULT", None)
    if fault:
        env["NEUROSTORE_FAULT"] = fault
    cmd = [sys.executable, "-m", "cli.main", "extract", str(tiny.DATA), "--out", str(out), "--model", str(model),
           "--sites", "resid,mlp", "--pool", "first,mean", "--store-dtype", "float32", "--buffer-mb", "1",
           "--max-batch-tokens", "256", "--device", "cpu", "--quiet", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(arr[:]) for name, arr in group.arrays()} | {
        f"{sub}/{name}": np.asarray(arr[:]) for sub in ("acts", "pooled/resid", "pooled/mlp", "docs", "tokens")
        for name, arr in group[sub].arrays()
    }


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    done = run(out, tiny_models["bert"])
    assert done.returncode == 0, done.stderr
    meta = zarr.open_group(str(out), mode="r").attrs["neurostore"]
    assert meta["complete"]
    return out, arrays(out)


@pytest.mark.slow  # a fault-injection sweep: each case is three to five extraction processes
@pytest.mark.parametrize(
    "faults, writers",
    [
        (["batch:3"], "1"),
        (["flush:5"], "1"),
        (["commit:2", "flush:3", "batch:1"], "1"),
        # the parallel writer: killed between scatter and write, amid shard writes, then before a commit
        (["window:2", "flush:7", "commit:1"], "3"),
    ],
)
def test_kill_and_resume_gives_identical_store(faults, writers, reference, tiny_models, tmp_path):
    ref_path, ref = reference
    out = tmp_path / "s.zarr"
    killed = run(out, tiny_models["bert"], "--writers", writers, fault=faults[0])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    meta = zarr.open_group(str(out), mode="r").attrs["neurostore"]
    assert not meta["complete"]
    assert run(out, tiny_models["bert"]).returncode != 0  # no --resume: refused, store untouched
    for fault in faults[1:]:  # killed again while resuming
        again = run(out, tiny_models["bert"], "--resume", "--writers", writers, fault=fault)
        assert again.returncode == -signal.SIGKILL, again.stderr
    done = run(out, tiny_models["bert"], "--resume", "--writers", writers)
    assert done.returncode == 0, done.stderr
    got = arrays(out)
    assert got.keys() == ref.keys()
    for name in ref:
        assert np.array_equal(got[name], ref[name]), name
    meta = zarr.open_group(str(out), mode="r").attrs["neurostore"]
    ref_meta = zarr.open_group(str(ref_path), mode="r").attrs["neurostore"]
    assert meta["complete"] and meta["committed_docs"] == ref_meta["committed_docs"] == 300
    assert meta["committed_tokens"] == ref_meta["committed_tokens"]


def test_incomplete_store_shows_committed_rows_only(tiny_models, tmp_path, reference):
    import neurostore

    out = tmp_path / "s.zarr"
    assert run(out, tiny_models["bert"], fault="commit:3").returncode == -signal.SIGKILL
    with pytest.warns(UserWarning, match="incomplete"):
        s = neurostore.open(str(out))
    assert 0 < s.n_docs < 300
    assert s.acts("resid").shape[0] == s.n_tokens == int(s.doc_column("n_tokens").sum())
    ref = reference[1]["acts/resid"]
    assert np.array_equal(np.asarray(s.acts("resid")), ref[: s.n_tokens])
    import neurostore.store as st

    assert st.verify(s) == []
