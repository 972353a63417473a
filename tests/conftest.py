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

# Tests that share a costly session fixture run on one worker: the engine tests (each engine is
# started once per worker), the reliability tests (one teacher run), the two files that use the
# spell_backward bootstrap; every other file keeps its tests together, in order. (A scheduler of our
# own: xdist 3.8's `xdist_group` marks are lost under pytest 9.2, which no longer keeps `_nodeid`.)
_SHARED = {"tests/engines/": "engines", "tests/reliability/": "reliability",
           "tests/learning/test_tiny_learns.py": "spell_bootstrap", "tests/test_benchmarks_smoke.py": "spell_bootstrap"}


def worker_group(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return next((group for prefix, group in _SHARED.items() if path.startswith(prefix)), path)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return ByGroup(config, log)


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
