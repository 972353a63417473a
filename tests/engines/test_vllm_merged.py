"""vLLM serving adapters as merged copies of the base (engine.adapter_serving = "merged"): what
is on disk, when the engine restarts, and what is cleaned up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from selfdistill.engines.base import AdapterRef, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
CHAT = [[{"role": "user", "content": f"What is {i} + {i + 1}?"}] for i in range(3)]


@pytest.mark.vllm
def test_merged_copies_live_while_loaded_and_switching_restarts(vllm_tiny_merged, adapters, engine_cache):
    eng = vllm_tiny_merged
    root = engine_cache / "merged"
    assert eng.merged
    eng.load_adapter(AdapterRef("m1", str(adapters["a"])))
    eng.load_adapter(AdapterRef("m2", str(adapters["b"])))
    copies = sorted(p.name for p in root.iterdir() if p.name.startswith(f"{os.getpid()}-"))
    assert len(copies) == 2 and all((root / c / "config.json").is_file() for c in copies)

    base = eng.generate(CHAT, GREEDY)
    llm_base = eng.llm
    a = eng.generate(CHAT, GREEDY, adapter="m1")
    assert eng.llm is not llm_base  # another set of weights: a new engine
    llm_a = eng.llm
    assert eng.generate(CHAT, GREEDY, adapter="m1") == a and eng.llm is llm_a  # same weights: no restart
    b = eng.generate(CHAT, GREEDY, adapter="m2")
    assert [c[0].text for c in a] != [c[0].text for c in b] != [c[0].text for c in base]
    assert eng.generate(CHAT, GREEDY) == base

    # released for training and resumed: nothing starts until a request names its weights
    eng.release()
    eng.resume()
    assert eng.llm is None
    assert eng.generate(CHAT, GREEDY, adapter="m1") == a

    eng.drop_adapter("m1")
    eng.drop_adapter("m2")
    assert not [p for p in root.iterdir() if p.name.startswith(f"{os.getpid()}-")]
    assert eng.generate(CHAT, GREEDY) == base


def test_copies_of_dead_processes_are_removed(tmp_path):
    from selfdistill.engines.vllm_engine import _remove_dead_merges

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f"{dead.stdout.strip()}-3-ckpt-000001-v1"
    mine = tmp_path / f"{os.getpid()}-4-ckpt-000002-v2"
    other = tmp_path / "notes"
    for d in (gone, mine, other):
        d.mkdir()
    _remove_dead_merges(tmp_path)
    assert not gone.exists() and mine.exists() and other.exists()
    _remove_dead_merges(tmp_path / "absent")  # nothing to clean: no error
