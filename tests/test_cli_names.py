"""Options renamed so that one name means one thing (`plot means --group`, `query select --layers`):
the new name works, the old one still does, both at once with different values is one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.plot import app as plot_app
from cli.query import app
from synth import make_store

runner = CliRunner()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("names") / "s.zarr"), n_docs=40, seed=3)


def one_line_error(res, *fragments):
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, (res.stdout, res.stderr)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_plot_means_group_and_its_old_name(synth, tmp_path):
    new, old = tmp_path / "new.png", tmp_path / "old.png"
    res = runner.invoke(plot_app, ["means", synth.path, "--group", "joy", "--no-cache", "--out", str(new)])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(plot_app, ["means", synth.path, "--label", "joy", "--no-cache", "--out", str(old)])
    assert res.exit_code == 0, res.stderr
    assert new.stat().st_size > 5000 and old.stat().st_size > 5000
    one_line_error(runner.invoke(plot_app, ["means", synth.path, "--group", "nope", "--out", str(new)]), "--group nope", "joy")
    one_line_error(runner.invoke(plot_app, ["means", synth.path, "--group", "joy", "--label", "love", "--out", str(new)]), "--label", "--group")
    one_line_error(runner.invoke(plot_app, ["means", synth.path, "--out", str(new)]), "--group")
    shown = runner.invoke(plot_app, ["means", "--help"], env={"COLUMNS": "300"}).stdout
    assert "--group" in shown and "--label" not in shown


def test_select_layers_and_its_old_name(synth):
    def layers(*args):
        res = runner.invoke(app, ["select", synth.path, "--method", "contrast", "--top", "2", *args, "--format", "json"])
        assert res.exit_code == 0, res.stderr
        return json.loads(res.stdout)["layers"]

    assert layers("--layers", "0,2") == layers("--layer", "0,2") == [0, 2]
    one_line_error(runner.invoke(app, ["select", synth.path, "--layers", "x"]), "--layers 'x'")
    one_line_error(runner.invoke(app, ["select", synth.path, "--layers", "0", "--layer", "2"]), "--layer", "--layers")
    shown = runner.invoke(app, ["select", "--help"], env={"COLUMNS": "300"}).stdout
    assert "--layers" in shown and "--layer " not in shown
