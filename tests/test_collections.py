"""Collections: stores of one model from different corpora read as one ("add a language later").

Corpus A holds en/es/fr without the label ``anger``, corpus B de/it with every label, so B's label
codes differ from A's and must be remapped on read. The full collection is checked against numpy
over the members' own arrays and category names; the stats-only collection against the full one.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import neurostore
import tiny
from synth import close_results
from cli.main import app
from neurostore import query as q
from neurostore.errors import NeurostoreError
from neurostore.extract import ExtractOptions, extract

COMMON = dict(sites=["resid", "mlp"], pool=["first", "mean"], max_batch_tokens=128, buffer_mb=1, device="cpu")
runner = CliRunner()


@pytest.fixture(scope="module")
def members(tiny_models, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("collection")
    rows = [json.loads(line) for line in tiny.DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    corpora = {
        "a": [r for r in rows[:100] if r["lang"] in ("en", "es", "fr") and r["label"] != "anger"],
        "b": [r for r in rows[:100] if r["lang"] in ("de", "it")],
    }
    out = {}
    for name, subset in corpora.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in subset), encoding="utf-8")
        for mode in ("full", "stats"):
            out[f"{name}-{mode}"] = str(folder / f"{name}-{mode}.zarr")
            extract([str(path)], out[f"{name}-{mode}"], model=str(tiny_models["bert"]),
                    options=ExtractOptions(**COMMON, stats_only=mode == "stats"))
    return out


def test_categories_merged_and_codes_remapped(members):
    coll = neurostore.open([members["a-full"], members["b-full"]])
    a, b = zarr.open_group(members["a-full"], mode="r"), zarr.open_group(members["b-full"], mode="r")
    assert coll.categories("lang") == ["en", "es", "fr", "de", "it"]
    assert coll.categories("label") == list(a["docs/label"].attrs["categories"]) + ["anger"]
    assert coll.n_docs == a["docs/label"].shape[0] + b["docs/label"].shape[0]
    for column in ("label", "lang"):
        names = [np.array(g[f"docs/{column}"].attrs["categories"])[g[f"docs/{column}"][:]] for g in (a, b)]
        got = np.array(coll.categories(column))[coll.doc_column(column)]
        assert list(got) == list(np.concatenate(names))
    # token rows index the whole: the second member's rows point past the first member's sentences
    assert coll.token_column("doc")[-1] == coll.n_docs - 1


def test_full_collection_against_numpy(members):
    coll = neurostore.open([members["a-full"], members["b-full"]])
    got = q.stats(coll, "resid", 1, by="label", rows="mean", quantiles=False, cache=False)
    sums: dict[tuple[str, str], list] = {}
    for path in (members["a-full"], members["b-full"]):
        g = zarr.open_group(path, mode="r")
        layer = list(g["pooled/resid/mean"].attrs["layers"]).index(1)
        values = np.asarray(g["pooled/resid/mean"][:, layer, :], dtype=np.float64)
        langs = np.array(g["docs/lang"].attrs["categories"])[g["docs/lang"][:]]
        labels = np.array(g["docs/label"].attrs["categories"])[g["docs/label"][:]]
        for row, lang, label in zip(values, langs, labels):
            sums.setdefault((lang, label), []).append(row)
    for i, lang in enumerate(got.langs):
        for j, label in enumerate(got.groups):
            rows = sums.get((lang, label), [])
            assert got.count[i, j] == len(rows)
            if rows:
                np.testing.assert_allclose(got.mean[i][j], np.mean(rows, axis=0), rtol=1e-6, atol=1e-9)


def test_full_collection_tokens_against_numpy(members):
    coll = neurostore.open([members["a-full"], members["b-full"]])
    got = q.stats(coll, "mlp", 0, by="label", rows="tokens", quantiles=False, cache=False)
    rows: dict[tuple[str, str], list] = {}
    for path in (members["a-full"], members["b-full"]):
        g = zarr.open_group(path, mode="r")
        values = np.asarray(g["acts/mlp"][:, 0, :], dtype=np.float64)
        doc = g["tokens/doc"][:]
        langs = np.array(g["docs/lang"].attrs["categories"])[g["docs/lang"][:]][doc]
        labels = np.array(g["docs/label"].attrs["categories"])[g["docs/label"][:]][doc]
        for row, lang, label in zip(values, langs, labels):
            rows.setdefault((lang, label), []).append(row)
    for i, lang in enumerate(got.langs):
        for j, label in enumerate(got.groups):
            kept = rows.get((lang, label), [])
            assert got.count[i, j] == len(kept)
            if kept:
                np.testing.assert_allclose(got.mean[i][j], np.mean(kept, axis=0), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("call", [
    lambda s, **c: q.variance(s, "mlp", by="label", **c),
    lambda s, **c: q.variance(s, "resid", 1, by="label", per="lang", rows="tokens", **c),
    lambda s, **c: q.lape(s, "mlp", top_rate=0.05, **c),
    lambda s, **c: q.stats(s, "resid", by="lang", rows="tokens", **c),
    lambda s, **c: q.select(s, "resid", method="contrast", label=["joy", "anger"], **c),
], ids=["variance", "variance-per-lang", "lape", "stats-by-lang", "contrast"])
def test_stats_only_collection_equals_full_collection(members, call):
    full = neurostore.open([members["a-full"], members["b-full"]])
    stats = neurostore.open([members["a-stats"], members["b-stats"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        close_results(call(full, cache=False).to_json(), call(stats).to_json())


def test_stats_only_collection_top_examples(members):
    full = neurostore.open([members["a-full"], members["b-full"]])
    stats = neurostore.open([members["a-stats"], members["b-stats"]])
    for options in (dict(site="resid", layer=None, neuron=3, k=10), dict(site="mlp", layer=1, neuron=5, k=5, label=["anger"])):
        a, b = q.top_examples(full, **options), q.top_examples(stats, **options)
        assert [(e.row, e.doc, e.value) for e in a] == [(e.row, e.doc, e.value) for e in b]


def test_cache_is_valid_for_the_collection(members, tmp_path):
    import shutil

    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    shutil.copytree(members["a-full"], a)
    shutil.copytree(members["b-full"], b)
    alone = q.stats(neurostore.open(a), "mlp", by="label").to_json()
    both = q.stats(neurostore.open([a, b]), "mlp", by="label").to_json()
    assert alone["groups"] != both["groups"] or alone["langs"] != both["langs"]
    # each read back from the cache (the entries coexist in a's cache) equals its first answer
    close_results(q.stats(neurostore.open(a), "mlp", by="label").to_json(), alone)
    close_results(q.stats(neurostore.open([a, b]), "mlp", by="label").to_json(), both)
    close_results(q.stats(neurostore.open([a, b]), "mlp", by="label", cache=False).to_json(), both)
    assert len([k for k in zarr.open_group(a, mode="r", use_consolidated=False)["cache"].group_keys()]) >= 2


def test_refusals(members):
    with pytest.raises(NeurostoreError, match="the same corpus as"):
        neurostore.open([members["a-full"], members["a-full"]])
    with pytest.raises(NeurostoreError, match="stats-only store and a full store"):
        neurostore.open([members["a-full"], members["b-stats"]])


def test_cli_reads_a_collection(members):
    res = runner.invoke(app, ["info", members["a-full"], members["b-full"], "--format", "json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert set(info["counts"]["lang"]) == {"en", "es", "fr", "de", "it"}
    res = runner.invoke(app, ["query", "stats", members["a-full"], members["b-full"], "--site", "mlp", "--format", "json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["info", members["a-full"], members["a-full"]])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "same corpus" in lines[0] and "Traceback" not in res.output
