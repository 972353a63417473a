"""Reinforcement learning from the stored samples raises held-out accuracy beyond chance.

The real daemon as a process, `algorithm = "grpo"` and nothing else (no SFT, no pairs), on the
tiny model exactly as built (random weights, no bootstrap): the task is any answer with a digit in
it (the regex verifier), which a random model hits in about 45% of its samples at T = 1 and never
greedily. Each round the incumbent answers 150 fresh tasks 8 times (the engine returns each token's
log-probability, stored beside the answer), the verifier rewards them, and the training child runs
the group-relative policy gradient on the round's groups. The daemon's own gate then tests the
candidate against the incumbent on the held-out items (greedy, paired exact McNemar) and promotes
only below alpha = 0.05. What can only be learnt from the rewards: no answer anywhere is given.

Measured (2026-12-02, 2 shared cores, 65 s, twice): held-out 0.000 -> 1.000 in round 1
(p = 5e-51); the samples' pass rate 0.45 -> 0.79 in round 2, drawn from the promoted candidate.
At learning_rate 5e-3 the greedy answer sat on the edge of flipping to a digit: one CI run
stayed at 0.000 then 0.024 and failed, one local run went 0.000 -> 1.000 only in round 2; 2e-2
clears the edge with room. The spell_backward comparison with SFT is
benchmarks/rl.py (RESULTS.md).
"""

from __future__ import annotations

import json
import random

from learning_helpers import NOUNS, round_figures, rows, run_daemon
from sd_testutil import merged, tiny_policy_data, write_policy


def test_grpo_from_stored_samples_beats_the_incumbent(tmp_path, tiny_model_dir):
    rng = random.Random(0)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"Tell me about the {rng.choice(NOUNS)} number {i}.", "category": "digits"}) + "\n"
                             for i in range(600)))
    policy = write_policy(tmp_path / "grpo.toml", merged(tiny_policy_data(tiny_model_dir, "transformers"), {
        "tasks": {"per_round": 150, "heldout_fraction": 0.3, "sources": [{"type": "jsonl", "path": str(tasks)}]},
        "generation": {"samples_per_task": 8, "temperature": 1.0, "max_tokens": 8},
        "training": {"algorithm": "grpo", "batch_size": 32, "max_length": 96, "rl": {"min_groups": 4, "learning_rate": 2e-2, "passes": 4}},
        "evaluation": {"heldout_items": 180, "max_tokens": 8},
        "gates": {"test": "mcnemar", "alpha": 0.05, "min_gain": 0.0},
    }))
    db = run_daemon(tmp_path, policy, rounds=2)
    figures, runs = round_figures(db, "rl")
    passed = [r["p"] for r in rows(db, "SELECT g.round_id, avg(s.correct) AS p FROM scores s JOIN generations g ON g.id = s.generation_id "
                                       "WHERE g.purpose = 'train' GROUP BY g.round_id ORDER BY g.round_id")]
    print("\nGRPO " + json.dumps({"rounds": figures, "sample_pass_rate": passed}))
    assert runs and all(m["grpo_steps"] > 0 and m["grpo_missing_logprobs"] == 0 and "sft_steps" not in m for m in runs), runs
    promoted = [f for f in figures if f["decision"] == "promote"]
    assert promoted, figures
    assert all(f["p"] < 0.05 and f["candidate"] > f["incumbent"] for f in promoted), figures
    assert promoted[-1]["candidate"] >= figures[0]["incumbent"] + 0.3, figures
    assert len(passed) == 2 and passed[1] > passed[0] + 0.1, passed  # the promoted policy's own samples hit more often
