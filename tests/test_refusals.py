"""Results that cannot mislead: analyses that would print numbers meaning nothing are refused (exit 2,
one stderr line, no traceback); what is left out is said in one warning line; every query's JSON
says where it came from; plot and query agree on their default statistic; every option shows its
default in --help."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import typer.main
import zarr
from typer.testing import CliRunner

import neurostore
from cli.plot import app as plot_app
from cli.query import app
from neurostore import moments as mo
from neurostore import query as q
from neurostore.errors import NeurostoreError
from synth import make_store
from test_moments import close, rows_of

runner = CliRunner()


def _recode(path: str, column: str, codes: np.ndarray | None) -> None:
    """Rewrite a per-sentence column: ``None`` = missing everywhere with no categories, as a corpus
    whose label (or language) column was not found at extraction is stored."""
    arr = zarr.open_group(path, mode="r+")[f"docs/{column}"]
    if codes is None:
        arr[:] = -1
        arr.attrs["categories"] = []
    else:
        arr[:] = codes


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    s = make_store(str(root / "s.zarr"), n_docs=80, seed=5)  # fear has rows in en only
    nolabel = make_store(str(root / "nolabel.zarr"), n_docs=40, seed=6)
    _recode(nolabel.path, "label", None)
    nolang = make_store(str(root / "nolang.zarr"), n_docs=40, seed=7)
    _recode(nolang.path, "lang", None)
    # every language has rows of one label only (label = language): nothing varies inside a language
    confounded = make_store(str(root / "conf.zarr"), n_docs=40, seed=8, missing_label=False)
    _recode(confounded.path, "label", confounded.lang.astype(np.int32))
    # fear has exactly one row (sentence 0)
    single = make_store(str(root / "single.zarr"), n_docs=40, seed=9, missing_label=False)
    codes = np.where(single.label == 3, 0, single.label).astype(np.int32)
    codes[0] = 3
    _recode(single.path, "label", codes)
    return {"s": s.path, "nolabel": nolabel.path, "nolang": nolang.path, "conf": confounded.path, "single": single.path, "synth": s}


def one_line_error(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    return lines[0]


REFUSALS = [
    # fewer than 2 groups
    (["variance", "{s}", "--label", "joy"], "needs at least 2 labels with rows; the selection has 1 (joy)"),
    (["variance", "{s}", "--label", "joy", "--per", "lang"], "needs at least 2 labels"),
    (["variance", "{s}", "--within", "label", "--label", "joy"], "no language has rows of 2 or more labels"),
    (["select", "{s}", "--label", "joy"], "select --method frequency needs at least 2 labels"),
    (["select", "{s}", "--by", "lang", "--lang", "en"], "needs at least 2 languages"),
    (["polyglot", "{s}", "--label", "joy"], "polyglot needs at least 2 labels"),
    (["correlate", "{s}", "--label", "joy"], "correlate needs at least 2 labels"),
    # --by lang with z-scoring within language
    (["variance", "{s}", "--by", "lang"], "--by lang with z-scoring within language"),
    (["variance", "{s}", "--within", "lang"], "--by lang with z-scoring within language"),
    (["select", "{s}", "--by", "lang", "--method", "magnitude"], "--by lang with z-scoring"),
    (["correlate", "{s}", "--by", "lang", "--no-zscore"], "the languages are what correlate compares"),
    (["polyglot", "{s}", "--by", "lang", "--no-zscore"], "the languages are what polyglot compares"),
    # fewer than 2 languages
    (["correlate", "{s}", "--lang", "en"], "correlate needs at least 2 languages with rows; the selection has 1 (en)"),
    (["polyglot", "{s}", "--lang", "en"], "polyglot needs at least 2 languages"),
    (["lape", "{s}", "--lang", "en"], "lape needs at least 2 languages"),
    (["correlate", "{s}", "--label", "fear", "--no-zscore"], "needs at least 2 languages with rows; the selection has 1 (en)"),
    (["correlate", "{s}", "--label", "fear,joy"], "after leaving out es, fr (rows of one label only"),
    # counts below 1
    (["variance", "{s}", "--top", "-3"], "--top -3: expected a count of at least 1"),
    (["select", "{s}", "--top", "0"], "--top 0"),
    (["polyglot", "{s}", "--sensitive-top", "0"], "--sensitive-top 0"),
    (["top-examples", "{s}", "--neuron", "1", "--k", "0"], "--k 0"),
    (["select", "{s}", "--method", "entropy", "--filter-rate", "0"], "--filter-rate 0"),
    (["lape", "{s}", "--top-rate", "0.001"], "--top-rate 0.001: keeps 0 of the 36 neurons"),
    # no rows at all
    (["variance", "{s}", "--label", "fear", "--lang", "es"], "no rows selected (widen --lang/--label/--where)"),
    # a store without labels / languages
    (["variance", "{nolabel}"], "the store has no labels (every sentence's label is missing); extract --label-col COLUMN"),
    (["stats", "{nolabel}"], "the store has no labels"),
    (["select", "{nolabel}"], "the store has no labels"),
    (["correlate", "{nolabel}"], "the store has no labels"),
    (["correlate", "{nolang}"], "the store has no languages (every sentence's lang is missing); extract --lang-col COLUMN"),
    (["polyglot", "{nolang}"], "the store has no languages"),
    (["lape", "{nolang}"], "the store has no languages"),
    (["variance", "{nolang}", "--per", "lang"], "the store has no languages"),
    # one label per language
    (["variance", "{conf}"], "no language has rows of 2 or more labels; z-scored within language"),
    (["variance", "{conf}", "--per", "lang", "--no-zscore"], "no language has rows of 2 or more labels: keep more labels"),
    (["polyglot", "{conf}", "--no-zscore"], "no label has rows in 2 or more languages"),
]


@pytest.mark.parametrize("args,message", REFUSALS, ids=[" ".join(a) for a, _ in REFUSALS])
def test_query_refusals_are_one_line(stores, args, message):
    line = one_line_error(runner.invoke(app, [a.format(**stores) for a in args]))
    assert message in line, line


PLOT_REFUSALS = [
    (["variance", "{s}", "--label", "joy"], "needs at least 2 labels"),
    (["variance", "{s}", "--top", "0"], "--top 0"),
    (["means", "{s}", "--label", "joy", "--top", "0"], "--top 0"),
    (["means", "{s}", "--label", "joy", "--by", "lang"], "--by lang with z-scoring"),
    (["correlate", "{s}", "--lang", "en"], "needs at least 2 languages"),
    (["polyglot", "{nolang}"], "the store has no languages"),
    (["lape", "{s}", "--lang", "fr"], "lape needs at least 2 languages"),
]


@pytest.mark.parametrize("args,message", PLOT_REFUSALS, ids=[" ".join(a) for a, _ in PLOT_REFUSALS])
def test_plot_refusals_are_one_line(stores, tmp_path, args, message):
    res = runner.invoke(plot_app, [a.format(**stores) for a in args] + ["--out", str(tmp_path / "f.png")])
    assert message in one_line_error(res)
    assert not (tmp_path / "f.png").exists()


def test_library_refuses_too(stores):
    store = neurostore.open(stores["s"])
    for call in (lambda: q.variance(store, label=["joy"]), lambda: q.correlate(store, lang=["en"]),
                 lambda: q.lape(store, lang=["en"]), lambda: q.variance(store, top=-3),
                 lambda: q.top_examples(store, k=0), lambda: q.group_means(store, by="lang")):
        with pytest.raises(NeurostoreError):
            call()


def test_left_out_language_is_one_warning_and_matches_a_reference(stores):
    """--label joy,fear: fear has rows in en only, so es and fr have rows of one label. z-scored,
    they are left out (one warning) and the variance is that of en alone; --per lang keeps en only."""
    s = stores["synth"]
    res = runner.invoke(app, ["variance", s.path, "--label", "joy,fear", "--layer", "1", "--format", "json"])
    assert res.exit_code == 0, res.stderr
    warning = res.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: left out language es, fr: rows of one label only"), res.stderr
    out = json.loads(res.stdout)
    assert out["provenance"]["notes"] == [warning[0].removeprefix("warning: ")]
    x, lang, lab = rows_of(s, "resid", "mean", 1)
    joy, fear = s.labels.index("joy"), s.labels.index("fear")
    keep = (lang == s.langs.index("en")) & np.isin(lab, [joy, fear])
    x, lab = x[keep], lab[keep]
    sd = x.std(0)
    z = np.where(sd > 0, (x - x.mean(0)) / np.where(sd > 0, sd, 1), 0.0)
    ref = np.var(np.stack([z[lab == joy].mean(0), z[lab == fear].mean(0)]), axis=0)
    close(np.array(out["variance"], float), ref)
    per = runner.invoke(app, ["variance", s.path, "--label", "joy,fear", "--per", "lang", "--no-zscore", "--format", "json"])
    assert per.exit_code == 0 and len(per.stderr.strip().splitlines()) == 1 and "nothing varies over labels" in per.stderr
    assert json.loads(per.stdout)["groups"] == ["en"]


def test_a_group_of_one_row_is_left_out_of_within_variances(stores):
    """Its variance is 0 for every neuron, so its "top" would be neuron order."""
    for extra in ([], ["--per", "lang"]):
        res = runner.invoke(app, ["variance", stores["single"], "--within", "label", "--no-zscore", *extra, "--format", "json"])
        assert res.exit_code == 0, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("warning: left out ") and lines[0].endswith(": one row only, no spread to measure"), res.stderr
        assert "fear" in lines[0]
        groups = json.loads(res.stdout)["groups"]
        assert groups and not any(g.endswith("fear") for g in groups)


def test_empty_groups_are_not_rows_of_nan(stores):
    """--within over a filtered selection lists the kept groups only; select gives no empty group."""
    store = neurostore.open(stores["s"])
    within = q.variance(store, within=True, label=["joy", "anger"], zscore=False)
    assert within.groups == ["anger", "joy"] and np.isfinite(within.variance).all()
    sel = q.select(store, label=["joy", "anger"])
    assert sorted(sel.selected) == ["anger", "joy"]
    with pytest.warns(UserWarning, match="left out label fear: rows in one language only"):
        poly = q.polyglot(store, threshold=0.2)
    assert "fear" not in poly.groups  # rows in en only
    assert all(set(poly.monolingual[g]) == {"en", "es", "fr"} for g in poly.groups)


# ----------------------------------------------------------------------------------------------
# provenance


PROVENANCE = [
    ("variance", ["--lang", "en,es", "--pool", "first", "--top", "3"], {"top": 3, "zscore": True, "mode": "by"}),
    ("correlate", ["--method", "cosine", "--no-zscore"], {"method": "cosine", "zscore": False}),
    ("polyglot", ["--threshold", "0.25", "--sensitive-top", "4"], {"threshold": 0.25, "sensitive_top": 4}),
    ("lape", ["--top-rate", "0.2", "--where", "label=joy,anger"], {"top_rate": 0.2, "filter_rate": 0.95}),
    ("select", ["--method", "contrast", "--tokens", "--layer", "0,2"], {"method": "contrast", "top": 20}),
    ("stats", ["--no-quantiles", "--label", "joy,anger"], {"quantiles": False}),
    ("top-examples", ["--neuron", "2", "--k", "3"], {"neuron": 2, "k": 3}),
]


@pytest.mark.parametrize("command,args,params", PROVENANCE, ids=[c for c, _, _ in PROVENANCE])
def test_every_query_json_says_where_it_came_from(stores, command, args, params):
    path = stores["s"]
    res = runner.invoke(app, [command, path, *args, "--format", "json"])
    assert res.exit_code == 0, (res.stderr, res.exception)
    out = json.loads(res.stdout)
    assert {"site", "layer"} <= set(out)  # the documented keys stay
    prov = out["provenance"]
    assert prov["neurostore_version"] == neurostore.__version__
    assert prov["store"]["paths"] == [path] and prov["store"]["model"] == "synth-model"
    assert prov["store"]["docs"] == 80 and prov["store"]["complete"] is True
    sel = prov["selection"]
    assert {f.name for f in dataclasses.fields(mo.Selection)} <= set(sel)  # every field of the pass's selection
    assert sel["site"] == ("mlp" if command == "lape" else "resid")
    assert prov["parameters"].items() >= params.items(), prov["parameters"]
    if "--lang" in args:
        assert sel["filters"] == {"lang": ["en", "es"]} and sel["rows"] == "first"
    if "--where" in args:
        assert sel["filters"] == {"label": ["anger", "joy"]}
    if command in ("lape", "top-examples") or "--tokens" in args:
        assert sel["rows"] == "tokens"
    if command == "select":
        assert sel["layers"] == [0, 2]
    json.dumps(prov, allow_nan=False)  # strict JSON


def test_table_titles_name_rows_and_filters(stores):
    res = runner.invoke(app, ["variance", stores["s"], "--pool", "first", "--lang", "en,es", "--top", "2"])
    assert res.exit_code == 0, res.stderr
    assert "resid layer 2, first-pooled sentences, lang en,es, z within language" in res.stdout


# ----------------------------------------------------------------------------------------------
# one default statistic for plot and query


def test_plot_and_query_variance_rank_the_same_neurons(stores, tmp_path, monkeypatch):
    from neurostore import plots

    drawn = []
    real = plots.variance_figure
    monkeypatch.setattr(plots, "variance_figure", lambda res: drawn.append(res) or real(res))
    res = runner.invoke(plot_app, ["variance", stores["s"], "--top", "5", "--out", str(tmp_path / "v.png")])
    assert res.exit_code == 0, res.stderr
    table = json.loads(runner.invoke(app, ["variance", stores["s"], "--top", "5", "--format", "json"]).stdout)
    assert drawn[0].mode == "by" and table["mode"] == "by"
    assert [n for n, _ in drawn[0].top] == [n for n, _ in table["top"]]
    assert drawn[0].provenance == table["provenance"]


# ----------------------------------------------------------------------------------------------
# --help shows every default


@pytest.mark.parametrize("group", [app, plot_app], ids=["query", "plot"])
def test_every_option_shows_its_default(group):
    for name in typer.main.get_command(group).commands:
        res = runner.invoke(group, [name, "--help"], env={"COLUMNS": "400"})
        assert res.exit_code == 0, res.stdout
        options = [line for line in res.stdout.splitlines() if line.lstrip("│ *").startswith("--") and "--help" not in line]
        assert options, res.stdout
        for line in options:
            assert "[default: " in line or "[required]" in line, (name, line.strip())
