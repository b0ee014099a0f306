"""`neurostore query` / `neurostore plot`: JSON contracts, CSV, tables, one-line errors."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import neurostore
from cli.plot import app as plot_app
from cli.query import app
from neurostore import query as q
from synth import make_store
from test_analysis import reference_z
from test_moments import rows_of

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("cli") / "s.zarr"), n_docs=80, seed=5)


def run(*args, ok=True):
    res = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    return res


def as_json(*args):
    return json.loads(run(*args, "--format", "json").stdout)


def test_json_contracts(synth):
    p = synth.path
    v = as_json("variance", p, "--layer", "1", "--top", "3")
    assert {"variance", "f", "top", "site", "layer"} <= set(v) and v["layer"] == 1 and len(v["top"]) == 3
    assert len(v["variance"]) == 8 and v["f"][1] is None  # constant neuron: F undefined -> null
    c = as_json("correlate", p, "--method", "cosine", "--site", "mlp")
    assert {"method", "across", "groups", "matrices", "mean", "site", "layer"} <= set(c)
    assert c["method"] == "cosine" and c["across"] == synth.langs and len(c["matrices"]["joy"]) == 3
    pg = as_json("polyglot", p, "--threshold", "0.2")
    assert {"threshold", "polyglot", "monolingual", "site", "layer"} <= set(pg)
    assert set(pg["monolingual"]["joy"]) == set(synth.langs)
    lp = as_json("lape", p, "--top-rate", "0.2", "--filter-rate", "0.5")
    assert set(lp["neurons"]) == set(synth.langs) and lp["site"] == "mlp"
    assert all(len(pair) == 2 for pairs in lp["neurons"].values() for pair in pairs)
    sel = as_json("select", p, "--method", "contrast", "--top", "2", "--layer", "0,2")
    assert set(sel["selected"]) == set(synth.labels) and sel["layers"] == [0, 2]
    assert all(len(t) == 3 and t[0] in (0, 2) for ts in sel["selected"].values() for t in ts)
    # the Python API gives the same objects
    store = neurostore.open(p)
    assert v == json.loads(json.dumps(q.variance(store, "resid", 1, top=3).to_json()))
    # and the intervention can read neuron sets from them
    assert q.neuron_set_from_json(v) == ("resid", {1: sorted(n for n, _ in v["top"])})


def test_rows_filters_and_grouping(synth):
    p = synth.path
    tok = as_json("variance", p, "--tokens", "--lang", "en,es", "--label", "joy", "--label", "anger")
    store = neurostore.open(p)
    ref = q.variance(store, "resid", rows="tokens", lang=["en", "es"], label=["joy", "anger"]).to_json()
    assert tok["variance"] == pytest.approx([x if x is not None else np.nan for x in ref["variance"]], nan_ok=True)
    per = as_json("variance", p, "--per", "lang", "--pool", "first")
    assert set(per["variance"]) == set(synth.langs)
    within = as_json("variance", p, "--within", "label", "--no-zscore")
    assert set(within["top"]) == set(synth.labels) and within["zscore"] is False
    w = as_json("variance", p, "--where", "label=joy,sadness", "--where", "lang=fr")
    assert w["provenance"]["selection"]["filters"] == {"label": ["joy", "sadness"], "lang": ["fr"]}
    # against the raw rows: z within French over the joy and sadness rows, variance of the two label means
    x, lang, lab = rows_of(synth, "resid", w["provenance"]["selection"]["rows"], synth.sites["resid"]["layers"].index(w["layer"]))
    groups = [synth.labels.index("joy"), synth.labels.index("sadness")]
    keep = (lang == synth.langs.index("fr")) & np.isin(lab, groups)
    z = reference_z(x[keep], lang[keep])
    means = np.stack([z[lab[keep] == g].mean(0) for g in groups])
    assert w["variance"] == pytest.approx(means.var(0), rel=1e-6, abs=1e-9)


def test_csv_and_tables(synth):
    p = synth.path
    rows = list(csv.reader(io.StringIO(run("stats", p, "--format", "csv", "--neurons", "0-2").stdout)))
    assert rows[0] == ["lang", "group", "neuron", "count", "mean", "std", "p_active", "p10", "p50", "p90"]
    assert len(rows) == 1 + 3 * 4 * 3
    res = run("correlate", p, "--format", "csv")
    rows = list(csv.reader(io.StringIO(res.stdout)))
    # fear has rows in en only here: left out with one warning (nothing to correlate), 3 labels + the mean
    assert rows[0] == ["group", "a", "b", "spearman"] and len(rows) == 1 + 4 * 9
    assert res.stderr.strip().splitlines() == ["warning: left out label fear: rows in one language only, nothing to compare"]
    for cmd in (["variance", p], ["correlate", p], ["polyglot", p], ["lape", p, "--top-rate", "0.1"], ["select", p],
                ["top-examples", p, "--neuron", "2", "--k", "3"], ["stats", p]):
        out = run(*cmd).stdout
        assert "┃" in out, cmd  # a rich table
    ex = json.loads(run("top-examples", p, "--neuron", "2", "--k", "3", "--pool", "mean", "--format", "json").stdout)
    assert len(ex["examples"]) == 3 and ex["examples"][0]["text"]


@pytest.mark.parametrize("args,message", [
    (["variance", "{p}", "--site", "attn"], "--site attn"),
    (["variance", "{p}", "--layer", "40"], "--layer 40: site 'resid' has layers 0-2"),
    (["variance", "{p}", "--by", "topic"], "no categorical column 'topic'"),
    (["variance", "{p}", "--where", "topic=x"], "--where topic"),
    (["variance", "{p}", "--lang", "de"], "--lang de"),
    (["variance", "{p}", "--pool", "max"], "--pool max"),
    (["variance", "{p}", "--tokens", "--pool", "mean"], "--tokens and --pool"),
    (["correlate", "{p}", "--method", "pearson"], "--method pearson"),
    (["lape", "{p}", "--filter-rate", "2"], "--filter-rate 2"),
    (["select", "{p}", "--method", "magic"], "--method magic"),
    (["top-examples", "{p}", "--neuron", "99"], "--neuron 99"),
    (["variance", "{missing}"], "not a neurostore store"),
])
def test_bad_queries_one_line(synth, tmp_path, args, message):
    args = [a.format(p=synth.path, missing=tmp_path / "none.zarr") for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_error_through_the_real_entry_point(synth):
    """A subprocess: exit code, one stderr line, no traceback, and no torch in the query path."""
    code = (
        "import sys\nfrom cli.query import app\n"
        "try:\n    app()\nfinally:\n"
        "    assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules), 'heavy import'\n"
    )
    res = subprocess.run([sys.executable, "-c", code, "variance", synth.path, "--layer", "7"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: --layer 7: site 'resid' has layers 0-2"]
    res = subprocess.run([sys.executable, "-c", code, "variance", synth.path, "--format", "json"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "heavy import" not in res.stderr, res.stderr
    json.loads(res.stdout)


def test_incomplete_store_warns_and_uses_committed_rows(tmp_path):
    s = make_store(str(tmp_path / "inc.zarr"), n_docs=60, commit_docs=25, complete=False)
    res = run("stats", s.path, "--format", "json", "--no-quantiles")
    assert "warning:" in res.stderr and "incomplete" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    counts = np.array(json.loads(res.stdout)["count"])
    assert counts.sum() == (s.label[:25] >= 0).sum()


def test_several_part_stores_as_one(tmp_path):
    a = make_store(str(tmp_path / "p0.zarr"), n_docs=30, seed=1, part=[0, 2])
    b = make_store(str(tmp_path / "p1.zarr"), n_docs=30, seed=2, part=[1, 2])
    both = as_json("stats", b.path, a.path, "--no-quantiles")
    assert np.array(both["count"]).sum() == (a.label >= 0).sum() + (b.label >= 0).sum()
    ex = json.loads(run("top-examples", a.path, b.path, "--neuron", "4", "--k", "6", "--format", "json").stdout)["examples"]
    acts = np.concatenate([a.acts["resid"][:, 2, 4], b.acts["resid"][:, 2, 4]]).astype(np.float64)
    assert [e["row"] for e in ex] == np.lexsort((np.arange(len(acts)), -acts))[:6].tolist()
    texts, doc_of = a.texts + b.texts, np.concatenate([a.doc_of_token, b.doc_of_token + 30])
    starts = np.concatenate([[0], np.cumsum(np.concatenate([a.n_tokens, b.n_tokens]))])
    for e in ex:
        assert e["doc"] == doc_of[e["row"]] and e["text"] == texts[e["doc"]] and e["position"] == e["row"] - starts[e["doc"]]


def test_plots(synth, tmp_path):
    p = synth.path
    for cmd in (["variance", p, "--layer", "1"], ["correlate", p], ["means", p, "--label", "joy"],
                ["polyglot", p, "--threshold", "0.2"], ["lape", p, "--top-rate", "0.2"]):
        out = tmp_path / f"{cmd[0]}.png"
        res = runner.invoke(plot_app, [*cmd, "--out", str(out)])
        assert res.exit_code == 0, (cmd, res.stderr, res.exception)
        assert out.stat().st_size > 5000 and out.read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(plot_app, ["correlate", p, "--out-dir", str(tmp_path / "figs"), "--pdf"])
    assert res.exit_code == 0, res.stderr
    pdfs = list((tmp_path / "figs").glob("*.pdf"))
    assert len(pdfs) == 1 and pdfs[0].read_bytes()[:4] == b"%PDF"
    res = runner.invoke(plot_app, ["means", p, "--label", "love", "--out", str(tmp_path / "x.png")])
    assert res.exit_code != 0 and "--label love" in res.stderr and len(res.stderr.strip().splitlines()) == 1
