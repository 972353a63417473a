"""What the tiny-model learning tests share: the task, the bootstrap and the daemon's policy.

A tiny char-level Llama is bootstrapped (full weights) on a few hundred reference answers of
reasoning-gym `spell_backward` disjoint from every task the daemon will see; the daemon then runs
a policy of the given `[training]` on it. See test_tiny_learns.py for why the bootstrap overfits.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bootstrap import (  # noqa: E402, F401
    SPELL_BOOT_SEED,
    SPELL_BOOT_SIZE,
    SPELL_BOOT_STEPS,
    SPELL_TASK_SEED,
    SPELL_WORDS,
    Evaluator,
    bootstrap,
    build_model,
    continue_sft,
    disjoint,
    rg_tasks,
    rows,
    sft_rows,
    spell_policy,
    summary,
)

WORDS = SPELL_WORDS
NOUNS = ["sea", "tree", "cat", "house", "river", "road", "star", "book", "song", "stone"]  # the digit tasks' "Tell me about the X ..."
TASK_SEED, TASK_SIZE = SPELL_TASK_SEED, 2000
BOOT_SEED, BOOT_SIZE, BOOT_STEPS = SPELL_BOOT_SEED, SPELL_BOOT_SIZE, SPELL_BOOT_STEPS
ROUNDS = 3

TRAINING = """
algorithm = "sft"
learning_rate = 3e-3
epochs = 8
batch_size = 8
max_length = 128
data_scope = "all"
min_sft_examples = 8
threads = 1
time_limit_s = 300
"""
LORA = {"r": 32, "alpha": 64, "dropout": 0.0, "target_modules": "all-linear"}


def write_policy(tmp: Path, model_dir: Path, training: str = TRAINING, name: str = "tiny-learns", alpha: float = 0.1) -> Path:
    p = tmp / f"{name}.toml"
    p.write_text(spell_policy(model_dir, training, name=name, alpha=alpha, task_size=TASK_SIZE, lora=LORA))
    return p


def bootstrapped(out: Path) -> tuple[Path, dict, list]:
    """(model directory, bootstrap figures, the bootstrap's tasks) of a freshly bootstrapped tiny model."""
    daemon_tasks = rg_tasks("spell_backward", TASK_SEED, TASK_SIZE, WORDS)
    boot = disjoint(rg_tasks("spell_backward", BOOT_SEED, BOOT_SIZE, WORDS), daemon_tasks)
    model = build_model(out)
    info = bootstrap(model, sft_rows(boot), BOOT_STEPS, batch_size=32, lr=3e-3, threads=1, log_every=100)
    return model, info, boot


def run_daemon(tmp: Path, policy: Path, rounds: int, timeout: float = 600) -> Path:
    """`selfdistill run POLICY --burst --max-rounds N` as a process in `tmp` (its log in daemon.log);
    the store's path once it exited cleanly."""
    import os
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(tmp / "daemon.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "selfdistill", "run", str(policy), "--burst", "--max-rounds", str(rounds)],
                              cwd=tmp, env=env, stderr=log, stdout=subprocess.DEVNULL, timeout=timeout)
    assert proc.returncode in (0, 10), (tmp / "daemon.log").read_text()[-3000:]
    return tmp / "state" / "selfdistill.db"


def round_figures(db: Path, key: str) -> tuple[list[dict], list[dict]]:
    """(per round: decision, incumbent and candidate accuracy, p and the round's `key` metrics;
    the metrics of every training run that succeeded)."""
    import json

    rounds = [{**r, "metrics": json.loads(r["metrics"] or "{}")} for r in rows(db, "SELECT id, decision, metrics FROM rounds ORDER BY id")]
    runs = [json.loads(r["metrics"] or "{}") for r in rows(db, "SELECT metrics FROM training_runs WHERE status = 'succeeded'")]
    figures = [{"round": r["id"], "decision": r["decision"], "incumbent": r["metrics"].get("incumbent_accuracy"),
                "candidate": r["metrics"].get("candidate_accuracy"), "p": r["metrics"].get("p_value"), key: r["metrics"].get(key)}
               for r in rounds]
    return figures, runs
