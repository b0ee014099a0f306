"""Stores written by earlier versions keep working; a store from a newer version is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import neurostore
from cli.main import app
from neurostore import store as st

runner = CliRunner()
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture()
def old_store(tmp_path) -> Path:
    """A store written by neurostore 0.1 (schema 1: no features, no chunk checksums)."""
    out = tmp_path / "old.zarr"
    shutil.copytree(FIXTURES / "store-v0.1.zarr", out)  # queries write their cache into it
    return out


def test_an_old_store_opens_queries_and_says_what_it_lacks(old_store):
    store = neurostore.open(str(old_store))
    assert "schema_version" in store.meta and "features" not in store.meta
    assert "checksums" in st.missing_features(store.meta)
    res = runner.invoke(app, ["info", str(old_store), "--verify"])
    assert res.exit_code == 0, res.output
    assert "(lacks checksums" in res.output and "verify: every committed row is readable" in res.output
    res = runner.invoke(app, ["info", str(old_store), "--format", "json"])
    info = json.loads(res.stdout)
    assert "checksums" in info["lacks"] and "token_kind" in info["lacks"] and info["features"] == ["plan_v2"]
    res = runner.invoke(app, ["query", "variance", str(old_store), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["top"]) == 20


def test_a_store_from_a_newer_version_is_refused_in_one_line(old_store):
    meta = json.loads((old_store / "zarr.json").read_text())
    attrs = meta["attributes"]["neurostore"]
    attrs.pop("schema_version")
    attrs["features"] = ["checksums", "teleportation"]
    (old_store / "zarr.json").write_text(json.dumps(meta))
    for args in (["info", str(old_store)], ["query", "variance", str(old_store)]):
        res = runner.invoke(app, args)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and "teleportation" in lines[0] and "upgrade neurostore" in lines[0], res.output


def test_a_store_of_this_layout_stays_readable(tmp_path):
    """A store written on 2026-11-27 with every feature of the day: later versions must read it."""
    out = tmp_path / "s.zarr"
    shutil.copytree(FIXTURES / "store-2026-11-27.zarr", out)
    store = neurostore.open(str(out))
    assert set(store.meta["features"]) >= {"plan_v2", "checksums", "token_kind", "token_offsets"}
    assert st.verify(store) == []
    for args in (["variance", "--format", "json"], ["lape", "--site", "resid", "--top-rate", "0.1", "--skip-special", "--format", "json"],
                 ["top-examples", "--neuron", "0", "--k", "3", "--format", "json"]):
        res = runner.invoke(app, ["query", args[0], str(out), *args[1:]])
        assert res.exit_code == 0, res.output
    ex = json.loads(res.stdout)["examples"]
    assert all(e["token"] for e in ex)
