"""Object storage for real: an S3 API server on localhost (moto's server mode), s3fs as the client,
nothing mocked in fsspec. extract -> SIGKILL -> --resume -> query -> intervene, all through
``neurostore --storage-option ...``, and the store equals the same extraction on a local disk."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import neurostore
import tiny
from cli.main import app

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

ROOT = Path(__file__).resolve().parent.parent
EXTRACT = ["--sites", "resid,mlp", "--pool", "first,mean", "--store-dtype", "float32", "--buffer-mb", "1",
           "--max-batch-tokens", "128", "--device", "cpu", "--quiet"]
runner = CliRunner()


@pytest.fixture(scope="module")
def s3():
    """A fresh S3 API on a free localhost port with one bucket; yields (storage options, CLI flags)."""
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem(**options).mkdir("bucket")
    flags = [x for k, v in options.items() for x in ("--storage-option", f"{k}={v}")]
    yield options, flags
    server.stop()


def _cli(flags: list[str], *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NEUROSTORE_FAULT"}
    if fault:
        env["NEUROSTORE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "cli.main", *flags, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _arrays(group: zarr.Group) -> dict[str, np.ndarray]:
    out = {}
    for sub in ("acts", "pooled/resid", "pooled/mlp", "docs", "tokens"):
        for name, arr in group[sub].arrays():
            out[f"{sub}/{name}"] = np.asarray(arr[:])
    return out


@pytest.mark.slow  # four extraction processes and an intervention
def test_extract_kill_resume_query_intervene_on_s3(s3, tiny_classifier, tmp_path):
    options, flags = s3
    corpus = tiny.sample_subset(tmp_path / "c.jsonl", every=3)
    url, local = "s3://bucket/run.zarr", str(tmp_path / "local.zarr")
    model = str(tiny_classifier)

    killed = _cli(flags, "extract", str(corpus), "--out", url, "--model", model, *EXTRACT, fault="commit:2")
    assert killed.returncode == -9, killed.stderr
    with pytest.warns(UserWarning, match="incomplete"):
        assert not neurostore.open(url, storage_options=options).complete
    # the console script takes --storage-option after the command too
    resumed = _cli([], "extract", str(corpus), "--out", url, "--model", model, *EXTRACT, "--resume", *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stderr
    done = _cli([], "extract", str(corpus), "--out", local, "--model", model, *EXTRACT)
    assert done.returncode == 0, done.stderr

    remote = zarr.open_group(url, mode="r", storage_options=options, use_consolidated=False)
    got, ref = _arrays(remote), _arrays(zarr.open_group(local, mode="r"))
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert remote.attrs["neurostore"]["complete"]
    # the consolidated metadata is current after the last commit: one read opens the whole tree
    assert zarr.open_group(url, mode="r", storage_options=options).metadata.consolidated_metadata is not None

    query = ["query", "variance", "--site", "mlp", "--by", "label", "--format", "json"]
    remote_q = runner.invoke(app, [*flags, *query[:2], url, *query[2:]])
    assert remote_q.exit_code == 0, remote_q.output
    local_q = runner.invoke(app, [*query[:2], local, *query[2:]])
    a, b = json.loads(remote_q.stdout), json.loads(local_q.stdout)
    np.testing.assert_allclose(a["variance"], b["variance"], rtol=1e-12)
    fs_keys = zarr.open_group(url, mode="r", storage_options=options, use_consolidated=False)["cache"].group_keys()
    assert list(fs_keys), "the statistics cache is written to the bucket too"

    iv = ["intervene", str(corpus), "--model", model, "--neurons", "1:3,1:5", "--site", "mlp", "--target", "joy",
          "--mode", "set", "--stat", "p90", "--of", "joy", "--positions", "first", "--controls", "1", "--device", "cpu", "--format", "json"]
    remote_iv = runner.invoke(app, [*flags, *iv, "--stats", url])
    local_iv = runner.invoke(app, [*iv, "--stats", local])
    assert remote_iv.exit_code == 0, remote_iv.output
    a, b = json.loads(remote_iv.stdout), json.loads(local_iv.stdout)
    assert a["intervened"] == b["intervened"]


@pytest.mark.slow
def test_storage_options_reach_every_reader(s3, tmp_path):
    """info with anonymous access and with credentials; a bad option is one line; the time to open
    the store over S3 with and without its consolidated metadata."""
    import synth

    options, flags = s3
    local = synth.make_store(str(tmp_path / "s.zarr"), n_docs=40)
    import s3fs

    public = s3fs.S3FileSystem(**options, s3_additional_kwargs={"ACL": "public-read"})
    public.mkdir("public", acl="public-read")
    public.put(local.path, "public/synth.zarr", recursive=True)
    s3fs.S3FileSystem(**options).put(local.path, "bucket/private.zarr", recursive=True)
    url = "s3://public/synth.zarr"
    res = runner.invoke(app, [*flags, "info", url, "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["docs"] == 40
    anon = runner.invoke(app, ["--storage-option", f"endpoint_url={options['endpoint_url']}", "--storage-option", "anon=true", "info", url])
    assert anon.exit_code == 0, anon.output  # a public bucket, read without credentials (anon=true reaches s3fs as a bool)
    private = runner.invoke(app, ["--storage-option", f"endpoint_url={options['endpoint_url']}", "--storage-option", "anon=true",
                                  "info", "s3://bucket/private.zarr"])
    lines = private.stderr.strip().splitlines()
    assert private.exit_code == 2 and len(lines) == 1 and "Traceback" not in private.output, private.output
    print(lines[0])
    bad = runner.invoke(app, ["--storage-option", "endpoint_url", "info", url])
    lines = bad.stderr.strip().splitlines()
    assert bad.exit_code == 2 and len(lines) == 1 and "KEY=VALUE" in lines[0] and "Traceback" not in bad.output

    xr = pytest.importorskip("xarray")
    seconds = {}
    for consolidated in (True, False):
        t0 = time.perf_counter()
        xr.open_datatree(url, engine="zarr", storage_options=options, consolidated=consolidated)
        seconds[consolidated] = time.perf_counter() - t0
    print(f"open_datatree over S3 (moto on localhost): consolidated {seconds[True]:.2f} s, listed {seconds[False]:.2f} s")


def test_parts_folder_on_s3_opens_with_the_storage_options(s3, tmp_path):
    """A folder written by extract --parts, on a bucket that needs credentials, stands for its parts
    (the folder's own attributes are read with the same storage options as the parts)."""
    import s3fs
    import synth

    from neurostore import parts

    options, _ = s3
    folder = tmp_path / "pf"
    parts._mark(str(folder), 2, "test")
    for i, path in enumerate(parts.part_paths(str(folder), 2)):
        synth.make_store(path, n_docs=10 + i, seed=i, fingerprint=f"corpus-{i}")
    s3fs.S3FileSystem(**options).put(str(folder), "bucket/pf.zarr", recursive=True)
    store = neurostore.open("s3://bucket/pf.zarr", storage_options=options)
    assert store.n_docs == 21 and len(store.paths) == 2
