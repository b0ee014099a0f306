"""The batch plan, the parallel writer and what extraction records about itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from cli.main import app
from neurostore import batching, models
from neurostore.extract import ExtractOptions, extract

import tiny


def mixed_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Sentence and paragraph lengths as in a mixed-language corpus: 5 to ~380 tokens."""
    rng = np.random.default_rng(seed)
    k = np.where(rng.random(n) < 0.5, 1, rng.integers(2, 7, n))
    return np.array([int(rng.integers(8, 64, kk).sum()) for kk in k])


def test_plan_v2_keeps_padding_under_a_fifth_at_the_cuda_budget():
    lengths = mixed_lengths(2400)
    per_token = 13 * 768 * 2  # XLM-R base, every layer, float16
    budget = batching.default_batch_tokens(torch.device("cuda"), per_token)
    buffer = batching.default_buffer_mb(torch.device("cuda"), budget, per_token)
    windows = batching.plan_windows(lengths, per_token, 0, buffer << 20)
    for version, low, high in ((1, 0.0, 0.8), (2, 0.8, 1.0)):
        real = padded = 0
        for d0, d1 in windows:
            for b in batching.plan_batches(lengths, budget, np.arange(d0, d1), version):
                assert len(b) * lengths[b].max() <= max(budget, lengths[b].max())
                real += int(lengths[b].sum())
                padded += len(b) * int(lengths[b].max())
        assert low <= real / padded <= high, (version, real / padded)
    # even where one window spans every length (the old 256 MB window: 0.38 real on main), no
    # batch of plan 2 computes more than a fifth padding
    small = batching.plan_windows(lengths, per_token, 0, 256 << 20)
    share = [lengths[b].sum() / (len(b) * lengths[b].max()) for d0, d1 in small for b in batching.plan_batches(lengths, budget, np.arange(d0, d1))]
    assert min(share) >= batching.MIN_REAL_SHARE


def test_plan_covers_every_sentence_once_and_is_deterministic():
    lengths = mixed_lengths(500, seed=3)
    for version in (1, 2):
        plan = batching.plan_batches(lengths, 700, np.arange(100, 400), version)
        flat = np.concatenate(plan)
        assert sorted(flat.tolist()) == list(range(100, 400))
        again = batching.plan_batches(lengths, 700, np.arange(100, 400), version)
        assert all(np.array_equal(a, b) for a, b in zip(plan, again))


def test_pad_host_matches_a_per_row_loop():
    rows = [[5, 6, 7], [1], [2, 3]]
    p = batching.pad_host(rows, 0)
    assert p.ids.tolist() == [[5, 6, 7], [1, 0, 0], [2, 3, 0]]
    assert p.mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert p.real.tolist() == [0, 1, 2, 3, 6, 7]


def arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    out = {}
    for prefix in ("acts", "pooled/resid", "pooled/mlp", "docs"):
        if prefix in group:
            out.update({f"{prefix}/{n}": np.asarray(a[:]) for n, a in group[prefix].arrays()})
    return out


def test_writer_count_and_compression_do_not_change_the_values(tiny_models, tmp_path):
    base = dict(sites=["resid", "mlp"], max_batch_tokens=128, buffer_mb=1, device="cpu")
    corpus = tiny.sample_subset(tmp_path / "sample.jsonl", every=2)  # half the sample corpus: still several 1 MB windows
    ref = tmp_path / "w1.zarr"
    extract([str(corpus)], str(ref), model=str(tiny_models["gpt2"]), options=ExtractOptions(writers=1, **base))
    want = arrays(ref)
    for name, extra in (("w3", dict(writers=3)), ("none", dict(writers=2, compression="none")), ("zstd", dict(compression="zstd:5"))):
        out = tmp_path / f"{name}.zarr"
        res = extract([str(corpus)], str(out), model=str(tiny_models["gpt2"]), options=ExtractOptions(**base, **extra))
        assert res.meta["compression"] == extra.get("compression", "lz4")
        got = arrays(out)
        assert got.keys() == want.keys()
        for key in want:
            assert np.array_equal(got[key], want[key]), (name, key)
    # same options, another writer count: the same files, byte for byte
    files = lambda p: {f.relative_to(p).as_posix(): f.read_bytes() for f in p.rglob("*") if f.is_file() and f.name != "zarr.json"}  # noqa: E731
    assert files(ref) == files(tmp_path / "w3.zarr")


def test_a_loaded_model_can_be_passed(tiny_models, tmp_path):
    loaded = models.load(str(tiny_models["bert"]), torch.device("cpu"))
    out = tmp_path / "s.zarr"
    res = extract([str(tiny.DATA)], str(out), model=loaded, options=ExtractOptions(max_batch_tokens=256))
    assert res.meta["model"]["path"] == str(tiny_models["bert"])
    assert res.meta["plan"] == batching.PLAN_VERSION
    b = res.meta["batches"]
    assert b["real_tokens"] == res.tokens and 0.8 <= b["real_tokens"] / b["padded_tokens"] <= 1
    assert set(res.stages) >= {"gather", "scatter", "encode", "write", "commit", "wait_slot", "ring"}


def test_a_store_without_a_plan_version_resumes_with_plan_1(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    opts = ExtractOptions(max_batch_tokens=256, buffer_mb=1)
    extract([str(tiny.DATA)], str(out), model=str(tiny_models["bert"]), options=opts)
    group = zarr.open_group(str(out), mode="r+")  # as a store written before plan versions existed
    meta = {k: v for k, v in group.attrs["neurostore"].items() if k != "plan"}
    group.attrs["neurostore"] = dict(meta, committed_docs=0, committed_tokens=0, complete=False)
    used = []
    real = batching.plan_batches
    monkeypatch.setattr(batching, "plan_batches", lambda *a, **k: used.append(a[3] if len(a) > 3 else k.get("version")) or real(*a, **k))
    extract([str(tiny.DATA)], str(out), model=str(tiny_models["bert"]), options=ExtractOptions(), resume=True)
    assert used and set(used) == {1}


@pytest.fixture(scope="module")
def overflowing(tiny_models, tmp_path_factory) -> Path:
    """The tiny BERT with its embedding LayerNorm scaled by 1e6: hidden_states[0] leaves float16."""
    folder = tmp_path_factory.mktemp("big") / "bert-big"
    loaded = models.load(str(tiny_models["bert"]), torch.device("cpu"))
    with torch.no_grad():
        loaded.model.embeddings.LayerNorm.weight.mul_(1e6)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def test_float16_overflow_is_counted_and_reported(overflowing, tmp_path):
    out = tmp_path / "s.zarr"
    res = extract([str(tiny.DATA)], str(out), model=str(overflowing), options=ExtractOptions(sites=["resid", "mlp"], max_batch_tokens=256, buffer_mb=1))
    counts = res.meta["nonfinite"]
    got = arrays(out)
    # the reference: non-finite values actually in the stored arrays, per array and layer
    want = {}
    for key, values in got.items():
        if key.startswith(("acts/", "pooled/")) and not key.endswith("_layer"):  # not the layer coordinates
            layers = zarr.open_group(str(out), mode="r")[key].attrs["layers"]
            bad = (~np.isfinite(values.astype(np.float32))).sum(axis=(0, 2))
            per = {str(layers[j]): int(n) for j, n in enumerate(bad) if n}
            if per:
                want[key] = per
    assert want and counts == want
    assert "acts/resid" in counts and "0" in counts["acts/resid"]
    assert res.warnings and "--store-dtype bfloat16" in res.warnings[0]
    runner = CliRunner()
    shown = runner.invoke(app, ["info", str(out)])
    assert shown.exit_code == 0 and "non-finite" in shown.output and "acts/resid" in shown.output
    info = json.loads(runner.invoke(app, ["info", str(out), "--format", "json"]).output)
    assert info["nonfinite"] == counts and info["real_token_share"] >= 0.8
    # float32 storage keeps them: nothing counted
    out32 = tmp_path / "s32.zarr"
    res32 = extract([str(tiny.DATA)], str(out32), model=str(overflowing), options=ExtractOptions(store_dtype="float32", max_batch_tokens=256))
    assert res32.meta["nonfinite"] == {} and not res32.warnings


def test_cli_warns_once_per_site(overflowing, tmp_path):
    result = CliRunner().invoke(app, ["extract", str(tiny.DATA), "--out", str(tmp_path / "s.zarr"), "--model", str(overflowing), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "site resid" in lines[0] and "layers 0" in lines[0] and "acts/resid" in lines[0]


@pytest.mark.parametrize("option, value, says", [("--compression", "gzip", "--compression 'gzip'"), ("--writers", "-3", "--writers -3")])
def test_bad_pipeline_option_is_one_line_and_writes_nothing(tmp_path, tiny_models, option, value, says):
    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, ["extract", str(tiny.DATA), "--out", str(out), "--model", str(tiny_models["bert"]), option, value])
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output
    assert not out.exists()
