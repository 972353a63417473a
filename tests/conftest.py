"""Shared fixtures: tiny local models and the bundled student (helpers live in sd_testutil.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# Under pytest-xdist (`make test` runs two workers: most of the suite waits on real processes), each
# worker's vLLM engines are bound to a core of their own; vLLM's "auto" would bind both to the same one.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and len(os.sched_getaffinity(0)) > 1:
    _cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(_cores[int(_WORKER[2:]) % len(_cores)]))

# Tests that share a costly session or module fixture run on one worker (`--dist loadgroup`): the
# engine tests (each engine is started once per worker), the reliability tests (one teacher run),
# the users of the spell_backward bootstrap; every other file keeps its tests together, in order.
_SHARED_DIRS = ("engines", "reliability")


def pytest_collection_modifyitems(config, items):
    tests = Path(__file__).parent
    for item in items:
        rel = Path(str(item.fspath)).relative_to(tests)
        if "spell_bootstrap" in getattr(item, "fixturenames", ()):
            group = "spell_bootstrap"
        elif rel.parts[0] in _SHARED_DIRS:
            group = rel.parts[0]
        else:
            group = rel.as_posix()
        item.add_marker(pytest.mark.xdist_group(group))


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

