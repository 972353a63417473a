"""Reinforcement learning from the stored samples raises held-out accuracy beyond chance.

The tiny char-level Llama bootstrapped on spell_backward (learning_helpers), then the real daemon
as a process with `algorithm = "grpo"`: each round the incumbent answers 500 fresh tasks 8 times
at T = 1 (the engine returns each token's log-probability, stored beside the answer), the verifier
rewards them, and the training child runs the group-relative policy gradient on those groups alone
(no SFT, no pairs). The daemon's own gate then tests the candidate against the incumbent on 300
held-out items (paired, exact McNemar) and promotes only below alpha = 0.05.

Run: `.venv/bin/python -m pytest -q -s tests/learning/test_tiny_grpo.py`; it prints one
`GRPO {...}` line with every round's figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from learning_helpers import bootstrapped, rows, write_policy

pytestmark = pytest.mark.slow

ROUNDS = 2
TRAINING = """
algorithm = "grpo"
learning_rate = 3e-3
batch_size = 32
max_length = 128
threads = 1
time_limit_s = 300
[training.rl]
variant = "grpo"
passes = 2
learning_rate = 2e-3
min_groups = 8
"""


def test_grpo_from_stored_samples_beats_the_incumbent(tmp_path):
    t0 = time.time()
    model, boot_info, _ = bootstrapped(tmp_path / "model")
    policy = write_policy(tmp_path, model, TRAINING, name="tiny-grpo", alpha=0.05)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(tmp_path / "daemon.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "selfdistill", "run", str(policy), "--burst", "--max-rounds", str(ROUNDS)],
                              cwd=tmp_path, env=env, stderr=log, stdout=subprocess.DEVNULL, timeout=900)
    daemon_log = (tmp_path / "daemon.log").read_text()
    assert proc.returncode in (0, 10), daemon_log[-3000:]
    db = tmp_path / "state" / "selfdistill.db"
    rounds = rows(db, "SELECT id, decision, metrics, reasons FROM rounds ORDER BY id")
    runs = rows(db, "SELECT round_id, status, metrics FROM training_runs ORDER BY id")
    stored = rows(db, "SELECT count(*) AS n, sum(length(token_ids)) / 4 AS tokens FROM sample_logprobs")[0]
    figures = []
    for r, run in zip(rounds, runs):
        m, tm = json.loads(r["metrics"] or "{}"), json.loads(run["metrics"] or "{}")
        figures.append({"round": r["id"], "decision": r["decision"], "incumbent": m.get("incumbent_accuracy"),
                        "candidate": m.get("candidate_accuracy"), "p": m.get("p_value"),
                        **{k: tm.get(k) for k in ("grpo_groups", "grpo_examples", "grpo_missing_logprobs", "grpo_clip_fraction",
                                                  "grpo_kl", "grpo_entropy_last", "grpo_group_reward_mean", "grpo_steps", "train_s")}})
    print("\nGRPO " + json.dumps({"bootstrap": boot_info, "rounds": figures, "stored_logprobs": stored,
                                  "seconds": round(time.time() - t0, 1)}))
    assert runs and all(json.loads(r["metrics"])["grpo_missing_logprobs"] == 0 for r in runs if r["status"] == "succeeded"), runs
    promoted = [f for f in figures if f["decision"] == "promote"]
    assert promoted, figures
    best = promoted[0]
    assert best["p"] < 0.05 and best["candidate"] > best["incumbent"], figures
