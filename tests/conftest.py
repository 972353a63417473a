"""Shared fixtures: tiny local models and the bundled student (helpers live in sd_testutil.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from selfdistill.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    from selfdistill.models import prepare_bundled

    return prepare_bundled()


@pytest.fixture(scope="session")
def spell_bootstrap(tmp_path_factory):
    """(model dir, figures, tasks) of the tiny char model bootstrapped on spell_backward
    (tests/learning/learning_helpers.py), once per session: the learning test and the RL
    benchmark's smoke run share it. Nothing may write into the model directory."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "learning"))
    from learning_helpers import bootstrapped

    return bootstrapped(tmp_path_factory.mktemp("spell") / "model")

