"""extract --parts N: one folder of part stores, read as one; run here, on a local cluster (a killed
worker survived), or resumed; refusals in one line."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import neurostore
import tiny
from neurostore import query as q
from neurostore.errors import NeurostoreError
from neurostore.extract import ExtractOptions, extract
from neurostore.parts import extract_parts

ROOT = Path(__file__).resolve().parent.parent
OPTS = dict(sites=["resid"], pool=["mean"], max_batch_tokens=128, buffer_mb=1, device="cpu")


def _arrays(path: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {f"{sub}/{name}": np.asarray(arr[...]) for sub in ("acts", "pooled/resid", "docs", "tokens") for name, arr in group[sub].arrays()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny.sample_subset(tmp_path_factory.mktemp("parts") / "subset.jsonl", every=2)


@pytest.fixture(scope="module")
def by_hand(tiny_models, corpus, tmp_path_factory) -> list[str]:
    """The two parts extracted by hand with --part i/2: what --parts 2 must write."""
    folder = tmp_path_factory.mktemp("by_hand")
    paths = []
    for i in range(2):
        paths.append(str(folder / f"p{i}.zarr"))
        extract([str(corpus)], paths[-1], model=str(tiny_models["bert"]), options=ExtractOptions(**OPTS, part=(i, 2)))
    return paths


def test_parts_folder_is_one_store_and_resumes(tiny_models, corpus, by_hand, tmp_path):
    out = tmp_path / "acts"
    model = str(tiny_models["bert"])

    def stop_after_first(docs, tokens, total):
        raise KeyboardInterrupt  # interrupted once the first part is done

    with pytest.raises(KeyboardInterrupt):
        extract_parts([str(corpus)], str(out), 2, model=model, options=ExtractOptions(**OPTS), on_progress=stop_after_first)
    with pytest.raises(NeurostoreError, match="part part-1-of-2.zarr was never started; finish it with extract --parts ... --resume"):
        neurostore.open(str(out))
    with pytest.raises(NeurostoreError, match="already exists; pass --resume"):
        extract_parts([str(corpus)], str(out), 2, model=model, options=ExtractOptions(**OPTS))
    with pytest.raises(NeurostoreError, match="--parts 3: .* holds 2 parts"):
        extract_parts([str(corpus)], str(out), 3, model=model, options=ExtractOptions(**OPTS), resume=True)
    done = extract_parts([str(corpus)], str(out), 2, model=model, options=ExtractOptions(**OPTS), resume=True)
    assert done.docs == sum(neurostore.open(p).n_docs for p in by_hand)
    folder, hand = neurostore.open(str(out)), neurostore.open(by_hand)
    assert folder.n_docs == hand.n_docs and folder.complete
    for mine, theirs in zip(folder.paths, hand.paths):  # the same plan per part: the same bytes
        a, b = _arrays(mine), _arrays(theirs)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(q.lape(folder, "resid", cache=False).P, q.lape(hand, "resid", cache=False).P)


def test_parts_against_one_process(tiny_models, corpus, tmp_path):
    """Against a single-process store the batches differ, so values differ by float rounding only;
    the sentences, tokens and codes are identical."""
    model = str(tiny_models["bert"])
    extract_parts([str(corpus)], str(tmp_path / "acts"), 2, model=model, options=ExtractOptions(**OPTS))
    extract([str(corpus)], str(tmp_path / "one.zarr"), model=model, options=ExtractOptions(**OPTS))
    folder, one = neurostore.open(str(tmp_path / "acts")), neurostore.open(str(tmp_path / "one.zarr"))
    for column in ("label", "lang"):
        assert np.array_equal(folder.doc_column(column), one.doc_column(column))
    assert np.array_equal(folder.token_column("token_id"), one.token_column("token_id"))
    a, b = np.asarray(folder.acts("resid").compute(), np.float64), np.asarray(one.acts("resid").compute(), np.float64)
    assert np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b))  # float16 rounding of other batch shapes


@pytest.mark.slow  # starts a local cluster of 2 worker processes
def test_local_cluster_survives_a_killed_worker(tiny_models, corpus, by_hand, tmp_path):
    out = tmp_path / "acts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the worker running part 0 is SIGKILLed at its second batch; the scheduler retries the
        # part on a worker, which takes over the lock (same run) and resumes from the last commit
        extract_parts([str(corpus)], str(out), 2, model=str(tiny_models["bert"]), options=ExtractOptions(**OPTS),
                      devices=["cpu", "cpu"], faults={0: "batch:2"})
    folder = neurostore.open(str(out))
    assert folder.complete
    for mine, theirs in zip(folder.paths, by_hand):
        a, b = _arrays(mine), _arrays(theirs)
        assert a.keys() == b.keys()
        for k in b:
            if b[k].dtype.kind == "f":
                # a Dask worker runs torch with one thread (the nanny sets OMP_NUM_THREADS=1): the
                # same batches, another summation order, so the last float16 bit may differ
                np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=1e-3, err_msg=k)
            else:
                assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("extra, message", [
    (["--devices", "cpu,cpu"], "--devices/--scheduler: they run the parts of --parts N; add --parts"),
    (["--parts", "2", "--part", "0/2"], "--part and --parts"),
    (["--parts", "2", "--devices", "cpu", "--scheduler", "tcp://127.0.0.1:1"], "--devices and --scheduler: give one"),
    (["--parts", "0"], "--parts 0: give a number of parts"),
])
def test_parts_options_refused_in_one_line(tiny_models, corpus, tmp_path, extra, message):
    done = subprocess.run([sys.executable, "-m", "cli.main", "extract", str(corpus), "--out", str(tmp_path / "x"), "--model",
                           str(tiny_models["bert"]), "--device", "cpu", "--quiet", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_a_retry_takes_over_the_lock_of_its_own_run_only(tmp_path):
    """A part retried on another host finds the dead worker's lock: the same run's owner token lets it
    take over; another run's lock is never taken."""
    import json

    from neurostore import lock
    from neurostore import store as st

    target = st.zarr_store(str(tmp_path / "p.zarr"))
    (tmp_path / "p.zarr").mkdir()
    (tmp_path / "p.zarr" / lock.KEY).write_text(json.dumps({"host": "another-host", "pid": 1, "token": "t", "owner": "run-a/0"}))
    with pytest.raises(NeurostoreError, match="another extraction is writing this store"):
        lock.acquire(target, "p.zarr", owner="run-b/0")
    with pytest.warns(UserWarning, match="taking over"):
        held = lock.acquire(target, "p.zarr", owner="run-a/0")
    assert lock.read(target)["token"] == held.token
    lock.release(held)
