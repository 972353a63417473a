"""Shared fixtures: tiny local models, the bundled student, policies written for a test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m selfdistill ARGS` as a real process."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "selfdistill", *args], cwd=cwd or ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def write_policy(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
