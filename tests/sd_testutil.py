"""Helpers shared by tests (a module with a unique name: several conftest.py files exist, so
`from conftest import ...` would depend on import order)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def scrape_metrics(url: str) -> dict[tuple[str, tuple], float]:
    """GET a Prometheus endpoint: {(sample name, sorted label items): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m selfdistill ARGS` as a real process."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "selfdistill", *args], cwd=cwd or ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


TASKS = ROOT / "policies" / "examples" / "tasks.jsonl"


def tiny_policy_data(model_dir: Path, engine: str = "vllm") -> dict:
    """A policy (as TOML data) on the tiny model whose random answers often contain a digit (the
    verifier): every shipped setting can be merged into it with `merged`."""
    return {
        "name": "tiny", "state_dir": "state",
        "student": {"base_model": str(model_dir), "lora": {"r": 8, "alpha": 16}},
        "engine": {"kind": engine, "dtype": "float32", "max_model_len": 256, "cpu_kv_cache_gib": 0.25,
                   "release_for_training": "keep", "batch_size": 64},
        "tasks": {"heldout_fraction": 0.3, "per_round": 6, "default_verifier": "regex:.*[0-9].*",
                  "sources": [{"type": "jsonl", "path": str(TASKS)}]},
        "generation": {"samples_per_task": 4, "max_tokens": 12},
        "pairs": {"strategy": "verified_chosen"},
        "training": {"algorithm": "sft_then_dpo", "epochs": 1, "dpo_epochs": 1, "batch_size": 4, "max_length": 96,
                     "min_sft_examples": 1, "min_pairs": 1, "threads": 1, "min_loss_change": 0.0,
                     "min_dpo_margin": -1000.0, "time_limit_s": 300},
        "evaluation": {"heldout_items": 8, "max_tokens": 12, "anchor_prompts": ["hello", "a b c"], "anchor_max_tokens": 8},
        "gates": {"test": "none", "min_gain": -1.0, "max_anchor_nll_increase": 1000.0, "max_empty_fraction": 1.0,
                  "max_repetition": 1.0, "max_length_ratio": 1000.0},
        "schedule": {"idle_sleep_s": 0.1},
        "stopping": {},
    }


def merged(base: dict, *overrides: dict) -> dict:
    """`base` with each override merged in, table by table (a value that is not a table replaces)."""
    out = dict(base)
    for o in overrides:
        for k, v in o.items():
            out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_policy(path: Path, data: dict) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(data))
    return path
