"""extract --stats-only: every query it can answer equals the answer from a full store of the same
corpus (1e-6 relative), what it cannot answer is refused in one line, and it resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import neurostore
import tiny
from synth import close_results
from neurostore import live
from neurostore import query as q
from neurostore import sketch as sk
from neurostore.errors import Fault, NeurostoreError
from neurostore.extract import ExtractOptions, extract

ROOT = Path(__file__).resolve().parent.parent
COMMON = dict(sites=["resid", "mlp"], pool=["first", "mean"], max_batch_tokens=128, buffer_mb=1, device="cpu")


# ----------------------------------------------------------------------------------------------
# the reduction itself, against numpy on fresh random data


def _stored(values: np.ndarray, store_dtype: str) -> torch.Tensor:
    return torch.tensor(values, dtype={"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[store_dtype])


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16", "float32"])
def test_host_and_device_reductions_match_numpy(store_dtype):
    rng = np.random.default_rng(7)
    n_layers, width, k, n_cells = 2, 13, 3, 4
    host = live.HostCells(n_cells, n_layers, width, store_dtype, True, k)
    dev = live.TorchCells(n_cells, n_layers, width, store_dtype, True, k, torch.device("cpu"))
    xs, cs, rs, start = [], [], [], 0
    for _ in range(5):
        n = int(rng.integers(1, 30))
        # a large common offset (an outlier dimension) and repeated values (ties in the top-k)
        x = _stored(np.round(rng.normal(40, 0.5, (n_layers, n, width)), 1) * rng.choice([-1, 1], (1, 1, width)), store_dtype)
        cell, rows = rng.integers(0, n_cells - 1, n), np.arange(start, start + n)  # the last cell never gets a row
        start += n
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # index_reduce is "beta"
            host.add(x, cell, rows)
            dev.add(x, cell, rows)
        xs.append(x.float().numpy().astype(np.float64))
        cs.append(cell)
        rs.append(rows)
    x, cell, rows = np.concatenate(xs, axis=1), np.concatenate(cs), np.concatenate(rs)
    for got in (host.entries(), dev.entries()):
        for j in range(n_layers):
            e = got[j]
            for c in range(n_cells):
                v, r = x[j][cell == c], rows[cell == c]
                assert e["count"][c] == len(v)
                if not len(v):
                    assert np.all(e["top_row"][c] == -1) and np.isinf(e["vmin"][c]).all()
                    continue
                np.testing.assert_allclose(e["mean"][c], v.mean(0), rtol=1e-12)
                np.testing.assert_allclose(e["m2"][c], ((v - v.mean(0)) ** 2).sum(0), rtol=1e-9, atol=1e-9)
                assert np.array_equal(e["pos"][c], (v > 0).sum(0))
                assert np.array_equal(e["vmin"][c], v.min(0)) and np.array_equal(e["vmax"][c], v.max(0))
                ref_hist = np.stack([np.bincount(sk.reference_bins(v[:, w]), minlength=sk.HIST_BINS) for w in range(width)])
                assert np.array_equal(e["hist"][c], ref_hist)
                for w in range(width):
                    best = np.lexsort((r, -v[:, w]))[:k]  # highest first, ties by lowest row
                    assert list(e["top_row"][c, w, :len(best)]) == list(r[best])
                    assert np.array_equal(e["top_value"][c, w, :len(best)], v[best, w])


def test_resumed_state_continues_exactly():
    rng = np.random.default_rng(3)
    batches = [(_stored(rng.normal(0, 1, (2, 9, 5)), "float16"), rng.integers(0, 3, 9), np.arange(i * 9, i * 9 + 9)) for i in range(4)]
    for make in (lambda: live.HostCells(3, 2, 5, "float16", True, 4), lambda: live.TorchCells(3, 2, 5, "float16", True, 4, torch.device("cpu"))):
        whole, first, resumed = make(), make(), make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for b in batches:
                whole.add(*b)
            for b in batches[:2]:
                first.add(*b)
            resumed.load(first.entries())
            for b in batches[2:]:
                resumed.add(*b)
        for a, b in zip(whole.entries(), resumed.entries()):
            for key in a:
                assert np.array_equal(a[key], b[key], equal_nan=True), key


# ----------------------------------------------------------------------------------------------
# the same corpus extracted both ways


@pytest.fixture(scope="module")
def pair(tiny_models, tmp_path_factory) -> tuple[neurostore.Store, neurostore.Store]:
    folder = tmp_path_factory.mktemp("stats_only")
    model = str(tiny_models["bert"])
    extract([str(tiny.DATA)], str(folder / "full.zarr"), model=model, options=ExtractOptions(**COMMON))
    extract([str(tiny.DATA)], str(folder / "stats.zarr"), model=model, options=ExtractOptions(**COMMON, stats_only=True))
    return neurostore.open(str(folder / "full.zarr")), neurostore.open(str(folder / "stats.zarr"))


@pytest.mark.parametrize("call", [
    lambda s, **c: q.variance(s, "mlp", by="label", **c),
    lambda s, **c: q.variance(s, "resid", 1, by="label", per="lang", **c),
    lambda s, **c: q.variance(s, "resid", by="label", within=True, rows="tokens", where={"token_kind": ["text"]}, **c),
    lambda s, **c: q.correlate(s, "resid", **c),
    lambda s, **c: q.correlate(s, "mlp", method="cosine", rows="first", lang=["en", "es"], **c),
    lambda s, **c: q.polyglot(s, "resid", threshold=0.1, **c),
    lambda s, **c: q.lape(s, "mlp", top_rate=0.05, **c),
    lambda s, **c: q.lape(s, "mlp", where={"token_kind": ["text"]}, **c),
    lambda s, **c: q.select(s, "mlp", method="frequency", rows="tokens", **c),
    lambda s, **c: q.select(s, "mlp", method="entropy", by="lang", rows="tokens", **c),
    lambda s, **c: q.select(s, "resid", method="contrast", label=["joy", "sadness", "anger"], **c),
    lambda s, **c: q.select(s, "resid", method="magnitude", **c),
    lambda s, **c: q.stats(s, "mlp", rows="tokens", **c),
    lambda s, **c: q.stats(s, "resid", 0, by=None, rows="first", **c),
    lambda s, **c: q.stats(s, "mlp", 1, by="lang", rows="tokens", **c),
], ids=["variance", "variance-per-lang", "variance-within-text", "correlate", "correlate-cosine", "polyglot", "lape", "lape-text",
        "select-frequency", "select-entropy-by-lang", "select-contrast", "select-magnitude", "stats", "stats-by-none", "stats-by-lang"])
def test_stats_only_answers_equal_full_store(pair, call):
    full, stats = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same left-out warnings in both
        close_results(call(full, cache=False).to_json(), call(stats).to_json())


@pytest.mark.parametrize("options", [
    dict(site="resid", layer=None, neuron=3, k=20),
    dict(site="mlp", layer=2, neuron=40, k=7, lang=["fr"], token_kind=["text"]),
    dict(site="mlp", layer=0, neuron=11, k=5, rows="mean", label=["joy"]),
    dict(site="resid", layer=1, neuron=0, k=20, token_kind=["special"]),
])
def test_top_examples_within_k_equal_full_store(pair, options):
    full, stats = pair
    a = q.top_examples(full, **options)
    b = q.top_examples(stats, **options)
    assert [(e.row, e.doc, e.value, e.token, e.kind) for e in a] == [(e.row, e.doc, e.value, e.token, e.kind) for e in b]


def test_group_values_for_intervene_equal_full_store(pair):
    full, stats = pair
    for stat in ("mean", "std", "p_active", "p90"):
        np.testing.assert_allclose(q.group_values(full, "mlp", -1, "label", "joy", stat, cache=False),
                                   q.group_values(stats, "mlp", -1, "label", "joy", stat), rtol=1e-6)


def test_store_holds_no_activations(pair):
    _, stats = pair
    group = stats.groups[0]
    assert "acts" not in group and "pooled" not in group
    assert stats.meta["stats"]["entry"] is not None and stats.meta["complete"]
    info = neurostore.store.summary(stats)
    assert info["mode"] == "stats-only" and "stats_only" in info["features"] and "stats_only" not in info["lacks"]
    assert neurostore.store.verify(stats) == []


def test_refusals_name_the_extraction_that_answers(pair, tiny_models, tmp_path):
    _, stats = pair
    with pytest.raises(NeurostoreError, match=r"--k 21: this stats-only store kept the top 20 rows"):
        q.top_examples(stats, "resid", None, 0, k=21)
    out = tmp_path / "lang.zarr"
    extract([str(tiny.sample_subset(tmp_path / "subset.jsonl", every=3))], str(out), model=str(tiny_models["bert"]),
            options=ExtractOptions(**COMMON, stats_only=True, groups=["lang"], k=2, sketch=False))
    s = neurostore.open(str(out))
    with pytest.raises(NeurostoreError, match=r"--by label: this stats-only store keeps statistics per lang only; extract --stats-only --groups lang,label"):
        q.variance(s, "resid", by="label")
    with pytest.raises(NeurostoreError, match=r"--label: this stats-only store keeps statistics per lang only"):
        q.lape(s, "mlp", label=["joy"])
    with pytest.raises(NeurostoreError, match=r"quantiles need the sketch"):
        q.group_values(s, "mlp", -1, "lang", "en", "p90")
    res = q.lape(s, "mlp", top_rate=0.05)  # per language: answered
    assert set(res.neurons) == set(s.categories("lang"))
    assert q.stats(s, "resid", by=None).p90 is None  # no sketch: no quantiles, the rest is there


def test_damaged_statistics_are_a_fault(pair, tmp_path):
    import shutil

    _, stats = pair
    copy = tmp_path / "copy.zarr"
    shutil.copytree(stats.paths[0], copy)
    entry = zarr.open_group(str(copy), mode="r").attrs["neurostore"]["stats"]["entry"]
    chunk = next(p for p in (copy / "stats" / entry / "mlp" / "tokens").rglob("*") if p.is_file() and "/mean/c" in str(p))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    s = neurostore.open(str(copy))
    with pytest.raises(Fault, match="its data, never recomputed"):
        q.variance(s, "mlp", rows="tokens", cache=False)
    assert any("checksum" in p for p in neurostore.store.verify(s))


@pytest.mark.slow  # four extractions
def test_parts_merge_exactly(pair, tiny_models, tmp_path):
    full, _ = pair
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"p{i}.zarr"))
        extract([str(tiny.DATA)], paths[-1], model=str(tiny_models["bert"]), options=ExtractOptions(**COMMON, stats_only=True, part=(i, 2)))
    parts = neurostore.open(paths)
    # the parts' batches are planned within each part, as for full --part stores: compare with those
    full_parts = []
    for i in range(2):
        full_parts.append(str(tmp_path / f"f{i}.zarr"))
        extract([str(tiny.DATA)], full_parts[-1], model=str(tiny_models["bert"]), options=ExtractOptions(**COMMON, part=(i, 2)))
    whole = neurostore.open(full_parts)
    close_results(q.lape(whole, "mlp", cache=False).to_json(), q.lape(parts, "mlp").to_json())
    close_results(q.variance(whole, "resid", rows="tokens", cache=False).to_json(), q.variance(parts, "resid", rows="tokens").to_json())
    a, b = q.top_examples(whole, "resid", None, 5, k=10), q.top_examples(parts, "resid", None, 5, k=10)
    assert [(e.row, e.value) for e in a] == [(e.row, e.value) for e in b]
    assert full.n_tokens == parts.n_tokens


# ----------------------------------------------------------------------------------------------
# the CLI: killed, resumed, refused


def _cli(out: Path, model: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("NEUROSTORE_FAULT", None)
    if fault:
        env["NEUROSTORE_FAULT"] = fault
    cmd = [sys.executable, "-m", "cli.main", "extract", str(tiny.DATA), "--out", str(out), "--model", str(model), "--sites", "resid,mlp",
           "--pool", "mean", "--buffer-mb", "1", "--max-batch-tokens", "128", "--device", "cpu", "--quiet", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _stats_arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    entry = group.attrs["neurostore"]["stats"]["entry"]
    out = {}

    def walk(g, prefix):
        for name, arr in g.arrays():
            out[f"{prefix}/{name}"] = np.asarray(arr[...])
        for name, sub in g.groups():
            walk(sub, f"{prefix}/{name}")

    walk(group[f"stats/{entry}"], "stats")
    return out


@pytest.mark.slow  # four extraction processes
def test_killed_stats_only_extraction_resumes_to_the_same_statistics(tiny_models, tmp_path):
    model = tiny_models["bert"]
    ref = tmp_path / "ref.zarr"
    assert _cli(ref, model, "--stats-only").returncode == 0
    out = tmp_path / "s.zarr"
    # killed after writing its second entry but before naming it, then again mid-window on resume
    killed = _cli(out, model, "--stats-only", "--commit-every", "0", fault="commit:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    meta = zarr.open_group(str(out), mode="r").attrs["neurostore"]
    assert not meta["complete"] and meta["committed_docs"] > 0
    assert len([p for p in (out / "stats").iterdir() if p.is_dir()]) == 2  # the committed entry and the unnamed one
    again = _cli(out, model, "--resume", "--commit-every", "0", fault="batch:3")
    assert again.returncode == -signal.SIGKILL, again.stderr
    done = _cli(out, model, "--resume", "--commit-every", "0")
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (out / "stats").iterdir() if p.is_dir()] == [zarr.open_group(str(out), mode="r").attrs["neurostore"]["stats"]["entry"]]
    got, want = _stats_arrays(out), _stats_arrays(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name], equal_nan=True), name


@pytest.mark.parametrize("extra, message", [
    (["--k", "5"], "--k: they shape a stats-only store; add --stats-only"),
    (["--stats-only", "--groups", "pred"], "--groups pred: a stats-only extraction keeps statistics per lang and/or label"),
    (["--stats-only", "--k", "-1"], "--k -1: give the number of top rows"),
])
def test_bad_stats_only_options_are_one_line(tiny_models, tmp_path, extra, message):
    done = _cli(tmp_path / "x.zarr", tiny_models["bert"], *extra)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_device_reduction_through_the_extractor_equals_host(pair, tiny_models, tmp_path, monkeypatch):
    """The CUDA branch (TorchCells: index_add by cell on the device, counts of non-finite values
    kept on the device until the commit) run by the real extraction loop on CPU tensors."""
    from neurostore import extract as ex

    class DeviceReducer(live.Reducer):
        def __init__(self, *args, **kwargs):
            kwargs["host"] = False
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ex.live, "Reducer", DeviceReducer)
    subset = tiny.sample_subset(tmp_path / "subset.jsonl", every=4)
    out, host_out = tmp_path / "device.zarr", tmp_path / "host.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract([str(subset)], str(out), model=str(tiny_models["bert"]), options=ExtractOptions(**COMMON, stats_only=True, k=4))
    monkeypatch.undo()
    extract([str(subset)], str(host_out), model=str(tiny_models["bert"]), options=ExtractOptions(**COMMON, stats_only=True, k=4))
    got, want = _stats_arrays(out), _stats_arrays(host_out)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=name)


def test_mixing_modes_is_refused(pair):
    full, stats = pair
    with pytest.raises(NeurostoreError, match="a stats-only store and a full store cannot be read as one"):
        neurostore.open([full.paths[0], stats.paths[0]])
