"""A local teacher's knowledge reaches the student through the daemon and raises held-out accuracy:
by on-policy distillation from its token log-probabilities, and by its labels and revisions.

The real daemon as a process with a real local teacher: the tiny model exactly as built (random
weights) is the student, and the same model fully fine-tuned for a few seconds to answer every
"Tell me about ..." with a number is the teacher (one character tokenizer, so the teacher can
score the student's token ids). `algorithm = "distill"` and nothing else: each round the student
answers 120 train tasks 8 times at T = 1, the daemon has the teacher score every sampled token
(stored in teacher_logprobs with the teacher and its tokenizer's fingerprint), and the training
child takes the policy-gradient step whose per-token advantage is teacher minus student
log-probability (reverse KL on the student's own samples). No answer, reward or verifier verdict
reaches training: the digit verifier only gates (greedy held-out, paired exact McNemar, alpha 0.05).

Measured (2026-12-02, 2 shared cores): see the module's test output (DISTILL line) and
benchmarks/RESULTS.md, "On-policy distillation".
"""

from __future__ import annotations

import json
import random

import pytest
from learning_helpers import NOUNS, bootstrap, round_figures, rows, run_daemon
from sd_testutil import merged, tiny_policy_data, write_policy

from selfdistill.models import build_tiny_model


def tasks_file(path, n: int, seed: int):
    rng = random.Random(seed)
    items = [{"prompt": f"Tell me about the {rng.choice(NOUNS)} number {rng.randrange(1000)}.", "category": "digits"} for _ in range(n)]
    path.write_text("".join(json.dumps(t) + "\n" for t in items))
    return path, items


def distill_policy(tmp_path, student, teacher, tasks, **training):
    return write_policy(tmp_path / "distill.toml", merged(tiny_policy_data(student, "transformers"), {
        "teacher": {"kind": "transformers", "model": str(teacher)},
        "tasks": {"per_round": 120, "heldout_fraction": 0.3, "sources": [{"type": "jsonl", "path": str(tasks)}]},
        "generation": {"samples_per_task": 8, "temperature": 1.0, "max_tokens": 8},
        "training": {"algorithm": "distill", "batch_size": 32, "max_length": 96,
                     "distill": {"learning_rate": 2e-2, "passes": 4, "min_samples": 16}, **training},
        "evaluation": {"heldout_items": 150, "max_tokens": 8},
        "gates": {"test": "mcnemar", "alpha": 0.05, "min_gain": 0.0},
    }))


def number_teacher(tmp_path):
    """The tiny model fully fine-tuned to answer every "Tell me about ..." with a number (on tasks
    none of the daemon's are)."""
    _, items = tasks_file(tmp_path / "teacher_tasks.jsonl", 300, seed=1)
    teacher = build_tiny_model(tmp_path / "teacher")
    numbers = random.Random(2)
    bootstrap(teacher, [{"prompt": t["prompt"], "completion": str(numbers.randrange(100))} for t in items], 150,
              batch_size=32, lr=3e-3, threads=1)
    return teacher


def test_on_policy_distillation_from_a_local_teacher_beats_the_incumbent(tmp_path, tiny_model_dir):
    teacher = number_teacher(tmp_path)
    tasks, _ = tasks_file(tmp_path / "tasks.jsonl", 600, seed=0)
    policy = distill_policy(tmp_path, tiny_model_dir, teacher, tasks)
    db = run_daemon(tmp_path, policy, rounds=2, timeout=900)
    figures, runs = round_figures(db, "distill")
    stored = rows(db, "SELECT t.teacher, t.tokenizer, count(*) AS n, sum(length(t.logprobs)) AS bytes, g.round_id FROM teacher_logprobs t "
                      "JOIN generations g ON g.id = t.generation_id GROUP BY g.round_id, t.teacher, t.tokenizer")
    print("\nDISTILL " + json.dumps({"rounds": figures, "stored": stored}))
    assert runs and all(m["distill_steps"] > 0 and "sft_steps" not in m and "grpo_steps" not in m for m in runs), runs
    assert stored and all(s["teacher"] == str(teacher) and s["tokenizer"].startswith("sha256:") for s in stored), stored
    promoted = [f for f in figures if f["decision"] == "promote"]
    assert promoted, figures
    assert all(f["p"] < 0.05 and f["candidate"] > f["incumbent"] for f in promoted), figures
    assert promoted[-1]["candidate"] >= figures[0]["incumbent"] + 0.3, figures
    first, second = figures[0]["distill"], figures[1]["distill"]
    assert first["teacher_tokens"] > 0 and first["samples"] == 120 * 8, first
    # the promoted student's own samples are closer to the teacher: the reverse KL fell
    assert figures[0]["decision"] == "promote" and second["reverse_kl_before"] < first["reverse_kl_before"] - 0.3, figures


@pytest.mark.parametrize("objective", ["forward_kl", "jsd"])
def test_top_k_forward_kl_and_jsd_from_a_local_teacher_beat_the_incumbent(tmp_path, tiny_model_dir, objective):
    """The same daemon and teacher, objective forward_kl or jsd: each answer's positions carry the
    teacher's 8 most likely tokens (stored beside its figures, 68 bytes a token) and the child
    lowers KL(teacher || student), or their generalised JSD, over them and the rest; one round."""
    teacher = number_teacher(tmp_path)
    tasks, _ = tasks_file(tmp_path / "tasks.jsonl", 600, seed=0)
    policy = distill_policy(tmp_path, tiny_model_dir, teacher, tasks, distill={"learning_rate": 2e-2, "passes": 4, "min_samples": 16,
                                                                              "objective": objective, "top_k": 8})
    db = run_daemon(tmp_path, policy, rounds=1, timeout=900)
    figures, runs = round_figures(db, "distill")
    stored = rows(db, "SELECT count(*) AS n, max(t.top_k) AS k, sum(length(t.logprobs) + length(t.topk_ids) + length(t.topk_logprobs)) "
                      "AS bytes, sum(length(t.logprobs)) / 4 AS tokens FROM teacher_logprobs t")
    print(f"\n{objective.upper()} " + json.dumps({"rounds": figures, "stored": stored, "metrics": runs}))
    assert stored[0]["k"] == 8 and stored[0]["bytes"] == 68 * stored[0]["tokens"], stored
    assert runs and runs[0]["distill_divergence_last"] < runs[0]["distill_divergence_first"], runs
    (f,) = figures
    assert f["distill"]["divergence_before"] == runs[0]["distill_divergence_before"], f  # shown with the round
    assert f["decision"] == "promote" and f["p"] < 0.05 and f["candidate"] >= f["incumbent"] + 0.3, figures


def test_teacher_labels_and_revisions_from_a_local_teacher_train_the_student_through_the_daemon(tmp_path, tiny_model_dir):
    """The same local teacher as a labeller and a reviser, with the daemon's expansion asking it
    for new tasks. The verifier wants a bare number: the student's random answers are never
    verified, so every SFT row is a
    teacher label the verifier accepted and every pair a verified revision over the student's
    wrong answer; trained on (SFT then DPO) and gated on held-out items, the student rises beyond
    chance. Every teacher use is counted (teacher_usage); the teacher's unusable expansion replies
    add no task, and none reaches the held-out split."""
    teacher = number_teacher(tmp_path)
    tasks, _ = tasks_file(tmp_path / "tasks.jsonl", 600, seed=0)
    policy = write_policy(tmp_path / "labels.toml", merged(tiny_policy_data(tiny_model_dir, "transformers"), {
        "teacher": {"kind": "transformers", "model": str(teacher), "max_tokens": 8},
        "tasks": {"per_round": 60, "heldout_fraction": 0.3, "default_verifier": "regex:[0-9]+",  # a bare number: never the student's random text
                  "sources": [{"type": "jsonl", "path": str(tasks)}, {"type": "expansion", "by": "teacher", "per_round": 4}]},
        "scoring": {"teacher_label": True, "teacher_revise": True},
        "generation": {"samples_per_task": 4, "temperature": 1.0, "max_tokens": 8},
        "training": {"algorithm": "sft_then_dpo", "learning_rate": 3e-3, "epochs": 4, "dpo_epochs": 1, "batch_size": 16, "max_length": 96},
        "evaluation": {"heldout_items": 150, "max_tokens": 8},
        "gates": {"test": "mcnemar", "alpha": 0.05, "min_gain": 0.0},
    }))
    db = run_daemon(tmp_path, policy, rounds=1, timeout=900)
    figures, runs = round_figures(db, "distill")
    sources = rows(db, "SELECT 'sft' AS kind, source, count(*) AS n FROM sft_examples GROUP BY source UNION ALL "
                       "SELECT 'pair', source, count(*) FROM pairs GROUP BY source")
    used = rows(db, "SELECT purpose, sum(requests) AS requests, sum(prompt_tokens + completion_tokens) AS tokens FROM teacher_usage GROUP BY purpose")
    expanded = rows(db, "SELECT split, count(*) AS n FROM tasks WHERE source LIKE 'expansion%' GROUP BY split")
    expansion = [json.loads(e["data"]) for e in rows(db, "SELECT data FROM events WHERE kind = 'expansion'")]
    print("\nLABELS " + json.dumps({"rounds": figures, "rows": sources, "teacher_usage": used, "expanded": expanded, "expansion": expansion}))
    kinds = {(r["kind"], r["source"]): r["n"] for r in sources}
    assert kinds.get(("sft", "teacher_label"), 0) >= 20 and all(src == "teacher_label" for k, src in kinds if k == "sft"), kinds
    assert kinds.get(("pair", "teacher_revise"), 0) > 0, kinds
    assert runs and runs[0].get("sft_steps", 0) > 0, runs
    assert {u["purpose"] for u in used} >= {"label", "revise", "expand"} and all(u["tokens"] > 0 for u in used), used
    # a number is no task: each expansion reply was refused with its reason, and no task it made is held out
    assert expansion and sum(sum(e["rejected"].values()) for e in expansion) > 0 and sum(e["added"] for e in expansion) == sum(
        e["n"] for e in expanded), expansion
    assert not any(e["split"] == "heldout" for e in expanded), expanded
    (first,) = figures
    assert first["decision"] == "promote" and first["p"] < 0.05 and first["candidate"] >= first["incumbent"] + 0.3, figures
