"""Neuron sets: `query select --method actprob90` against numpy on a store, and `neurostore compare`
(Jaccard per group and overall, layer distributions) on hand-made and real query outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import neurostore
from cli import compare as compare_cli
from cli.query import app as query_app
from neurostore import compare as cmp
from neurostore import query as q
from neurostore.errors import NeurostoreError
from synth import make_store

runner = CliRunner()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("cmp") / "s.zarr"), n_docs=80, seed=3,
                      sites={"mlp": {"layers": [0, 1, 2], "width": 40}})


def _reference_actprob90(synth, layers: list[int]) -> dict[str, list[tuple[int, int, float]]]:
    """Act-Prob-90p by numpy from the store's token rows: per language, P(x > 0) of every neuron of
    ``layers``, t = np.percentile(P, 90) (linear), neurons with P > t by P descending, then layer, neuron."""
    x = synth.acts["mlp"]  # [tokens, layers, width]
    pos = [synth.sites["mlp"]["layers"].index(layer) for layer in layers]
    lang_of_token = synth.lang[synth.doc_of_token]
    out = {}
    for k, lang in enumerate(synth.langs):
        rows = x[lang_of_token == k][:, pos]
        if not len(rows):
            continue
        P = (rows > 0).mean(axis=0)  # [layers, width]
        t = np.percentile(P, 90)
        li, ni = np.nonzero(P > t)
        order = sorted(zip(li, ni), key=lambda ln: (-P[ln], ln[0], ln[1]))
        out[lang] = [(layers[a], int(b), float(P[a, b])) for a, b in order]
    return out


@pytest.mark.parametrize("layers", [None, [0, 2]])
def test_actprob90_against_numpy(synth, layers):
    res = q.select(neurostore.open(synth.path), "mlp", layers, by="lang", method="actprob90")
    want = _reference_actprob90(synth, layers or [0, 1, 2])
    assert set(res.selected) == set(want)
    for lang, rows in want.items():
        got = res.selected[lang]
        assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in rows]
        np.testing.assert_allclose([c for *_, c in got], [c for *_, c in rows], rtol=1e-12)
        assert 0 < len(got) <= 0.1 * len(layers or [0, 1, 2]) * 40 + 1
    thresholds = res.provenance["parameters"]["thresholds"]
    assert res.provenance["parameters"]["percentile"] == 90 and set(thresholds) == set(want)
    assert all(score > thresholds[lang] for lang, rows in res.selected.items() for *_, score in rows)
    capped = q.select(neurostore.open(synth.path), "mlp", layers, by="lang", method="actprob90", top=2)
    assert all(v == res.selected[g][:2] for g, v in capped.selected.items())


def test_actprob90_ties_at_the_threshold_are_out():
    from neurostore import analysis as an

    # one group, 10 neurons: P = 0, 0.1, ..., 0.8, 0.8 -> t = percentile 90 = 0.8: nobody is strictly above
    pos = np.array([[[0, 1, 2, 3, 4, 5, 6, 7, 8, 8]]], dtype=np.float64)
    n = np.array([10])
    assert an.actprob_thresholds(n, pos)[0] == pytest.approx(0.8)
    assert an.select("actprob90", n, pos, pos, None) == [[]]
    pos[0, 0, -1] = 9  # 0.9 now: t = 0.81, one neuron above
    assert an.select("actprob90", n, pos, pos, None) == [[(0, 9, 0.9)]]


def _app() -> typer.Typer:
    app = typer.Typer()
    compare_cli.register(app)
    app.callback()(lambda: None)
    return app


def _write(tmp_path, name: str, obj: dict):
    path = tmp_path / name
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_jaccard_and_layers_by_hand(tmp_path):
    lape = {"site": "mlp", "neurons": {"en": [[0, 1], [0, 2], [1, 5]], "es": [[1, 5], [2, 7]], "fr": []}}
    select = {"site": "mlp", "selected": {"en": [[0, 1, 0.9], [2, 3, 0.8]], "es": [[2, 7, 0.7]], "de": [[0, 0, 0.5]]}}
    res = cmp.run([_write(tmp_path, "lape.json", lape), _write(tmp_path, "sel.json", select)])
    (pair,) = res["pairs"]
    assert pair["groups"]["en"] == {"a": 3, "b": 2, "intersection": 1, "union": 4, "jaccard": 0.25}
    assert pair["groups"]["es"]["jaccard"] == 0.5
    # overall: {01, 02, 15, 27} vs {01, 23, 27, 00}: 2 shared of 6
    assert pair["overall"]["intersection"] == 2 and pair["overall"]["jaccard"] == pytest.approx(2 / 6)
    assert pair["only_a"] == ["fr"] and pair["only_b"] == ["de"]
    assert res["sets"][0]["layers"] == {"0": 2, "1": 1, "2": 1} and res["sets"][0]["group_layers"]["fr"] == {}
    assert res["sets"][0]["analysis"] == "lape" and res["sets"][1]["analysis"] == "select"  # no method named
    assert cmp.jaccard(set(), set())["jaccard"] is None
    variance = {"site": "mlp", "layer": 2, "top": [[7, 1.5], [3, 1.0]]}
    poly = {"site": "mlp", "layer": 2, "polyglot": {"joy": [7]}, "monolingual": {"joy": {"en": [3], "es": []}}}
    three = cmp.run([_write(tmp_path, "v.json", variance), _write(tmp_path, "p.json", poly), _write(tmp_path, "sel.json", select)])
    assert [p["overall"]["jaccard"] for p in three["pairs"]] == [0.5, 0.5, 0.25]  # the polyglot overall leaves out the monolingual neurons
    assert three["sets"][1]["groups"] == {"joy": 1, "joy/en": 1, "joy/es": 0}


def test_cli_compares_lape_and_actprob90_of_a_store(synth, tmp_path):
    outs = {}
    for name, args in (("lape", ["lape", synth.path, "--top-rate", "0.1", "--filter-rate", "0.5"]),
                       ("ap90", ["select", synth.path, "--site", "mlp", "--by", "lang", "--method", "actprob90"])):
        res = runner.invoke(query_app, args + ["--format", "json"])
        assert res.exit_code == 0, res.output
        outs[name] = _write(tmp_path, f"{name}.json", json.loads(res.stdout))
    app = _app()
    res = runner.invoke(app, ["compare", str(outs["lape"]), str(outs["ap90"]), "--format", "json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    lape = {g: {tuple(x) for x in v} for g, v in json.loads(outs["lape"].read_text())["neurons"].items()}
    ap90 = {g: {tuple(x[:2]) for x in v} for g, v in json.loads(outs["ap90"].read_text())["selected"].items()}
    for g, j in got["pairs"][0]["groups"].items():
        assert j["jaccard"] == pytest.approx(len(lape[g] & ap90[g]) / len(lape[g] | ap90[g]))
    assert [s["analysis"] for s in got["sets"]] == ["lape", "select actprob90"]
    assert got["provenance"]["analysis"] == "compare" and got["provenance"]["inputs"][1]["parameters"]["method"] == "actprob90"

    table = runner.invoke(app, ["compare", str(outs["lape"]), str(outs["ap90"])], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "Jaccard" in table.output and "L2" in table.output
    csv = runner.invoke(app, ["compare", str(outs["lape"]), str(outs["ap90"]), "--format", "csv"])
    assert csv.stdout.splitlines()[0] == "a,b,group,n_a,n_b,intersection,union,jaccard"
    sel_table = runner.invoke(query_app, ["select", synth.path, "--site", "mlp", "--by", "lang", "--method", "actprob90"])
    assert sel_table.exit_code == 0 and "all above the 90th percentile" in sel_table.output


def test_refusals_are_one_line(tmp_path):
    app = _app()
    mlp = _write(tmp_path, "a.json", {"site": "mlp", "neurons": {"en": [[0, 1]]}})
    resid = _write(tmp_path, "b.json", {"site": "resid", "neurons": {"en": [[0, 1]]}})
    (tmp_path / "bad.json").write_text("{not json")
    cases = [
        ([mlp], "at least two"),
        ([mlp, resid], "different sites"),
        ([mlp, tmp_path / "none.json"], "no such file"),
        ([mlp, tmp_path / "bad.json"], "not a JSON file"),
        ([mlp, _write(tmp_path, "c.json", {"site": "mlp", "rows": []})], "no neuron set in it"),
        ([mlp, _write(tmp_path, "d.json", {"site": "mlp", "neurons": {"en": [["x"]]}})], "should be a list of"),
    ]
    for files, words in cases:
        res = runner.invoke(app, ["compare", *map(str, files)])
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in res.output, (words, res.output)
    with pytest.raises(NeurostoreError, match="at least two"):
        cmp.compare([])
