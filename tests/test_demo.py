"""The README's first command runs end to end (on a tiny model here, to stay fast)."""

from __future__ import annotations

from typer.testing import CliRunner

from cli.main import app


def test_demo_writes_store_tables_and_figures(tmp_path, tiny_models):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out-dir", str(out), "--model", str(tiny_models["bert"])])
    assert result.exit_code == 0, result.output + result.stderr
    for fragment in ("label-variance", "Spearman", "polyglot", "LAPE", "figures in"):
        assert fragment in result.stdout
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert len(figures) == 5 and all(p.endswith(".png") and (out / "figures" / p).stat().st_size > 10_000 for p in figures)
    again = CliRunner().invoke(app, ["demo", "--out-dir", str(out), "--model", str(tiny_models["bert"])])
    assert again.exit_code == 0 and "already complete" in again.stdout
