"""The loop really learns: a tiny char-level Llama, bootstrapped on a few hundred reference answers
of reasoning-gym `spell_backward`, gets better on held-out tasks through rounds of the real daemon
(`python -m selfdistill run POLICY --burst --max-rounds N`: sample fresh tasks, 8 answers at T=1,
verify, SFT on every verified answer gathered so far, LoRA child, McNemar gate, promote), and
better than a matched-steps control: the same LoRA trainer, from the same bootstrap checkpoint,
for the same optimizer steps as the final checkpoint's lineage, on the bootstrap data.

Why the control: FIELD-NOTES "What made a toy loop learn" found that from an undertrained start
extra steps on the seed data gain as much as the loop. The bootstrap here therefore overfits a
small set (its loss is near zero), so more steps on it buy little and fresh verified data is what
can still help. Every accuracy is measured by one engine (transformers, greedy) on the same
held-out items of the daemon's store, bootstrap words excluded.

Run: `.venv/bin/python -m pytest -q -s tests/learning` (6.1 to 9.5 minutes on 2 busy CPU cores
on 2026-11-23; it prints one `LEARNING {...}` line with every figure). Set SELFDISTILL_LEARNING_OUT to
a path to also get them as JSON.

Measured (2026-11-23, 2 shared cores): bootstrap 11.6% [8.4, 15.8] on 293 held-out items; after 3
rounds (1 rejected, 2 promoted) 20.1% [15.9, 25.1], McNemar p = 6e-5 against the bootstrap; the
control (485 steps) 13.7% [10.2, 18.1], p = 0.0017 for the loop against it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from learning_helpers import LORA, ROUNDS, Evaluator, continue_sft, rows, sft_rows, summary, write_policy

from selfdistill.stats import discordant, mcnemar_one_sided

pytestmark = pytest.mark.slow


def test_loop_beats_base_and_matched_steps_control(tmp_path, spell_bootstrap):
    t_start = time.time()
    timings: dict[str, float] = {}
    from selfdistill.config import load_policy
    from selfdistill.operations import open_state

    # 1. bootstrap: full weights, a small set disjoint from every task the daemon will see
    model, boot_info, boot = spell_bootstrap
    timings["bootstrap_s"] = time.time() - t_start

    # 2. the real daemon, as a process, for ROUNDS rounds
    policy_path = write_policy(tmp_path, model)
    t = time.time()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(tmp_path / "daemon.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "selfdistill", "run", str(policy_path), "--burst", "--max-rounds", str(ROUNDS)],
                              cwd=tmp_path, env=env, stderr=log, stdout=subprocess.DEVNULL, timeout=600)
    timings["loop_s"] = time.time() - t
    daemon_log = (tmp_path / "daemon.log").read_text()
    assert proc.returncode in (0, 10), daemon_log[-3000:]

    db = tmp_path / "state" / "selfdistill.db"
    rounds = rows(db, "SELECT id, decision, metrics, reasons FROM rounds ORDER BY id")
    ckpts = {r["id"]: r for r in rows(db, "SELECT id, parent_id, path, status, is_current, training FROM checkpoints")}
    current = next(c for c in ckpts.values() if c["is_current"])
    lineage_steps = []
    c = current
    while c["id"] != "base":
        lineage_steps.insert(0, json.loads(c["training"])["metrics"]["sft_steps"])
        c = ckpts[c["parent_id"]]
    runs = rows(db, "SELECT round_id, status, metrics FROM training_runs ORDER BY id")
    all_steps = sum(json.loads(r["metrics"] or "{}").get("sft_steps", 0) for r in runs)

    # 3. the matched-steps control: the daemon's trainer, the bootstrap data, the lineage's steps
    policy = load_policy(policy_path)
    t = time.time()
    control = continue_sft(model, sft_rows(boot), [sum(lineage_steps)], tmp_path / "control",
                           training=policy.training.model_dump(mode="json"), lora=LORA) if lineage_steps else None
    timings["control_s"] = time.time() - t

    # 4. one engine, the daemon's held-out items
    store = open_state(policy)
    try:
        heldout = store.tasks(split="heldout")
    finally:
        store.close()
    t = time.time()
    ev = Evaluator(model, engine={"threads": 1}, lora_rank=LORA["r"], max_tokens=8)
    try:
        base_c = ev.correct(heldout)
        final_c = ev.correct(heldout, Path(current["path"])) if current["id"] != "base" else base_c
        control_c = ev.correct(heldout, control["adapter"]) if control else base_c
    finally:
        ev.close()
    timings["eval_s"] = time.time() - t
    timings["total_s"] = time.time() - t_start

    p_base = mcnemar_one_sided(*discordant(final_c, base_c))
    p_control = mcnemar_one_sided(*discordant(final_c, control_c))
    result = {
        "bootstrap": {**boot_info, **summary(base_c)},
        "final": {"checkpoint": current["id"], **summary(final_c), "p_vs_base": p_base, "p_vs_control": p_control},
        "control": {"steps": control["steps"] if control else [0], **summary(control_c)},
        "rounds": [{"id": r["id"], "decision": r["decision"], **{k: v for k, v in json.loads(r["metrics"] or "{}").items()
                                                                 if k in ("incumbent_accuracy", "candidate_accuracy", "p_value")}}
                   for r in rounds],
        "lineage_steps": lineage_steps, "all_steps": all_steps, "heldout_items": len(heldout),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    print("\nLEARNING " + json.dumps(result))
    out = os.environ.get("SELFDISTILL_LEARNING_OUT")
    if out:
        Path(out).write_text(json.dumps(result, indent=2))

    assert lineage_steps, f"no round was promoted: {result['rounds']}"
    assert len(heldout) >= 200, "too few held-out items for the intervals below to mean anything"
    # beyond chance on the same items: the paired (exact McNemar) test, which is what the
    # Wilson intervals of two unpaired accuracies would understate; both intervals are printed
    assert p_base < 0.05, result
    assert result["final"]["accuracy"] > result["bootstrap"]["accuracy"], result
    # and not merely extra steps: better than the same steps on the bootstrap data
    assert p_control < 0.05, result
