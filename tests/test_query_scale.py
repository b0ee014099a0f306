"""Scale: bounded memory on a store several times larger than the memory allowed, and the same
pass on a real ``distributed.LocalCluster`` (worker processes) giving the local result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import neurostore
from neurostore import moments as mo
from neurostore import query as q
from synth import make_store

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 64 << 20  # address space the query may add on top of the warmed-up interpreter

# Runs in a fresh interpreter: warm up (imports, Dask's thread pool, zarr's event loop) on a tiny
# store, then cap the address space at what it uses now + BUDGET, then query the big store.
CHILD = r"""
import json, resource, sys
import numpy as np
import neurostore
from neurostore import moments as mo

small, big, budget, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sel = mo.Selection("mlp", (0, 1), "tokens", "label")
mo.compute(neurostore.open(small), sel, workers=2)
import dask.array  # the control loads through dask.array, which the pass itself no longer imports

def vm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize"):
                return int(line.split()[1]) * 1024

base = vm()
resource.setrlimit(resource.RLIMIT_AS, (base + budget, base + budget))
store = neurostore.open(big)
out = {"base": base}
try:
    if mode == "query":
        mom = mo.compute(store, sel, workers=2)
        out["count"] = int(mom.count.sum())
        out["mean0"] = float(mom.mean[0, 0, 0, 3])
    else:  # what an in-memory tool would do: load one layer of the site
        x = np.asarray(store.acts("mlp")[:, 0, :])
        out["loaded"] = int(x.nbytes)
except MemoryError:
    out["error"] = "MemoryError"
out["peak_vm"] = None
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmPeak"):
            out["peak_vm"] = int(line.split()[1]) * 1024
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    sites = {"mlp": {"layers": [0, 1], "width": 768}}
    small = make_store(str(root / "small.zarr"), n_docs=50, sites=sites, store_dtype="float16", pools=(), seed=1)
    big = make_store(
        str(root / "big.zarr"), n_docs=30000, sites=sites, store_dtype="float16", pools=(), seed=2,
        chunk_bytes=1 << 20, shard_bytes=16 << 20, keep=False, block_docs=1000, max_tokens=9,
    )
    return small, big


def _child(small, big, mode):
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", CHILD, small.path, big.path, str(BUDGET), mode],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_memory_bounded_by_chunks_not_store(big):
    small, big = big
    raw = int(big.n_tokens.sum()) * 2 * 768 * 2  # token rows x layers x width x float16
    disk = sum(f.stat().st_size for f in Path(big.path).rglob("*") if f.is_file())
    assert raw > 3 * BUDGET and disk > 3 * BUDGET, (raw, disk)
    out = _child(small, big, "query")
    assert "error" not in out, out
    assert out["count"] == int(big.n_tokens[big.label >= 0].sum())
    assert out["peak_vm"] - out["base"] <= BUDGET
    print(f"store {raw / 2**20:.0f} MiB raw, {disk / 2**20:.0f} MiB on disk; query added {(out['peak_vm'] - out['base']) / 2**20:.0f} MiB"
          f" of address space (limit {BUDGET / 2**20:.0f} MiB)")
    # control: the same limit stops a tool that loads one layer into memory
    control = _child(small, big, "load")
    assert control.get("error") == "MemoryError", control


def test_local_cluster_equals_local(tmp_path):
    distributed = pytest.importorskip("distributed")
    synth = make_store(str(tmp_path / "d.zarr"), n_docs=120, seed=7)
    store = neurostore.open(synth.path)
    sel = mo.Selection("mlp", (0, 2), "tokens", "label", (("lang", ("en", "fr")),))
    local = mo.compute(store, sel, quantiles=True, workers=2)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            remote = mo.compute(store, sel, quantiles=True, scheduler=client)
            assert len(client.scheduler_info()["workers"]) == 2
        by_address = mo.compute(store, sel, scheduler=cluster.scheduler_address)
        # the CLI's --scheduler, several top examples and a full analysis through the cluster
        from cli.query import app

        res = CliRunner().invoke(app, ["variance", synth.path, "--tokens", "--format", "json", "--no-cache",
                                       "--scheduler", cluster.scheduler_address])
        assert res.exit_code == 0, res.stderr
        via_cli = json.loads(res.stdout)
        top_remote = q.top_examples(store, "resid", 1, 3, k=4, scheduler=cluster.scheduler_address)
    for key in ("count", "pos", "vmin", "vmax", "hist"):
        assert np.array_equal(getattr(local, key), getattr(remote, key)), key
    for key in ("mean", "m2"):
        np.testing.assert_allclose(getattr(remote, key), getattr(local, key), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(getattr(by_address, key), getattr(local, key), rtol=1e-12, atol=1e-12)
    ref = q.variance(store, "resid", rows="tokens", cache=False).to_json()
    np.testing.assert_allclose(np.array(via_cli["variance"], float), np.array(ref["variance"], float), rtol=1e-12)
    assert [e.row for e in top_remote] == [e.row for e in q.top_examples(store, "resid", 1, 3, k=4)]


def test_unreachable_scheduler_is_one_line(tmp_path):
    pytest.importorskip("distributed")
    synth = make_store(str(tmp_path / "u.zarr"), n_docs=20)
    from cli.query import app

    res = CliRunner().invoke(app, ["variance", synth.path, "--no-cache", "--scheduler", "tcp://127.0.0.1:1"])
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--scheduler tcp://127.0.0.1:1" in lines[0], res.stderr
