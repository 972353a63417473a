"""The HTML report and the demo's summary table, from a store with two rounds in it."""

from __future__ import annotations

import re

from selfdistill.config import parse_policy
from selfdistill.records import TaskIn
from selfdistill.report import print_summary, summary_rows, write_report
from selfdistill.store import Store


def _state(tmp_path):
    policy = parse_policy({"name": "r", "state_dir": str(tmp_path), "tasks": {"sources": [{"type": "jsonl", "path": "x"}]}})
    store = Store.create(tmp_path / "selfdistill.db")
    store.ensure_base_checkpoint()
    store.add_tasks([TaskIn("s", f"What is {i} + 1?", str(i + 1)) for i in range(20)], 1.0 - 1e-9)
    held = store.tasks(split="heldout")
    base_items = [{"task_id": t.id, "correct": i % 3 == 0, "score": 0.0, "text": f"maybe {i}", "tokens": 2} for i, t in enumerate(held)]
    m = {"accuracy": 0.35, "ci_low": 0.18, "ci_high": 0.57, "n": len(held), "empty_fraction": 0, "repetition": 0, "mean_length": 2}
    store.add_evaluation("base", "heldout", m, base_items)
    for rid, decision in ((1, "promote"), (2, "reject")):
        r = store.create_round("base" if rid == 1 else "ckpt-000001")
        store.add_checkpoint(f"ckpt-00000{rid}", "base", r, str(tmp_path / f"c{rid}"), {})
        items = [{"task_id": t.id, "correct": True, "score": 1.0, "text": str(t.id), "tokens": 1} for t in held]
        store.add_evaluation(f"ckpt-00000{rid}", "heldout", dict(m, accuracy=0.9, ci_low=0.7, ci_high=0.97), items, r)
        store.record_phase(r, "train", 0.0, {"sft": 4}, "done")
        store.update_round(r, decision=decision, status="done", finished_at=1.0, candidate_id=f"ckpt-00000{rid}",
                           metrics={"incumbent_accuracy": 0.35, "candidate_accuracy": 0.9, "incumbent_ci": [0.18, 0.57],
                                    "candidate_ci": [0.7, 0.97], "p_value": 0.001,
                                    **({"rl": {"reward_mean": 0.45, "pass_rate": 0.4, "clip_fraction": 0.178,
                                                                    "policy_kl": 0.012, "kl": None}} if rid == 2 else {}),
                                    **({"distill": {"reverse_kl_before": 4.261, "teacher_tokens": 7322}} if rid == 1 else {})},
                           reasons=["because"])
        if decision == "promote":
            store.commit_promotion(f"ckpt-00000{rid}", "test", r)
    # the self-judge checked at round 1 and re-measured at round 2, where it fell below its thresholds
    store.add_judge_health("self", True, 0.81, 0.05, 6, {"reasons": [], "n": 32, "unparseable": 0.0,
                                                        "anchors": {"file_items": 20, "teacher_items": 12, "verifier_items": 0}}, 1)
    store.add_judge_health("self", False, 0.52, 0.31, 2, {"reasons": ["agreement 0.52 < 0.7"], "n": 40, "unparseable": 0.125,
                                                         "anchors": {"file_items": 20, "teacher_items": 20, "verifier_items": 0}}, 2)
    store.add_teacher_usage(1, "t", "distill", "token_logprobs", 40, 0, 7322, 1.0)
    store.add_teacher_usage(1, "t", "label", "generate", 4, 40, 12, 0.5)
    return policy, store


def test_report_has_plots_rounds_and_samples(tmp_path):
    policy, store = _state(tmp_path)
    store.close()
    out = write_report(policy)
    html = out.read_text()
    assert out == tmp_path / "reports" / "report.html"
    assert len(re.findall(r"data:image/png;base64,[A-Za-z0-9+/]{200,}", html)) >= 3
    assert "ckpt-000001" in html and "because" in html
    assert "What is" in html and "maybe 1" in html  # sample answers of base and current side by side
    # a policy-gradient round shows its mean reward, pass rate, clip fraction and KL
    assert "0.450 / 0.400 / 0.178 / 0.012 / -" in html  # no KL penalty: the reference KL is "-", not 0
    # a distillation round, its reverse KL to the teacher and the teacher tokens it cost
    assert "distill 4.261 / 7322" in html
    assert "teacher distill 7322, label 52 tokens" in html  # what the teacher cost the round, by use (teacher_usage)
    # every judge check, the periodic re-measurement included, with where its anchors came from and why it failed
    checks = re.findall(r"<tr><td>(\d+)</td><td>self</td><td class='(ok|bad)'>(yes|no)</td><td>([\d.]+)</td><td>([\d.]+)</td>"
                        r"<td>(\d+)</td><td>([\d.]+)</td><td>(\d+)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", html)
    assert checks == [("1", "ok", "yes", "0.810", "0.050", "6", "0.000", "32", "20 / 12 / 0", ""),
                      ("2", "bad", "no", "0.520", "0.310", "2", "0.125", "40", "20 / 20 / 0", "agreement 0.52 &lt; 0.7")], checks


def test_summary_table(tmp_path, capsys):
    policy, store = _state(tmp_path)
    rows = summary_rows(store)
    assert [r["checkpoint"] for r in rows] == ["base", "ckpt-000001"]
    # base right on items 0, 3, 6, ... of 20; the promotion right everywhere: 13 wins, no losses
    assert rows[1]["gain_vs_base"] == 13 / 20 and abs(rows[1]["p_vs_base"] - 0.5 ** 13) < 1e-12
    print_summary(policy, store)
    out = capsys.readouterr().out
    assert "base" in out and "0.350" in out and "0.900" in out and "decisions: #1 promote, #2 reject" in out
    assert "audit acc" not in out  # nothing measured on an audit split: no column
    held = store.tasks(split="heldout")[:10]  # stands in for audit items here: the rows only read the evaluations
    for ckpt, right in (("base", 2), ("ckpt-000001", 7)):
        store.add_evaluation(ckpt, "audit", {"accuracy": right / 10, "ci_low": 0.1, "ci_high": 0.5, "n": 10},
                             [{"task_id": t.id, "correct": i < right} for i, t in enumerate(held)])
    rows = summary_rows(store)
    assert [r["audit"]["accuracy"] for r in rows] == [0.2, 0.7]
    print_summary(policy, store)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:3] == ["checkpoint", "round", "audit"] and lines[4].split()[:3] == ["ckpt-000001", "1", "0.700"], lines


def test_summary_pairs_every_item_the_base_answered_when_the_gate_items_rotate(tmp_path):
    """With evaluation.gate_items = "rotate" the base's latest held-out evaluation is on another
    window than a promotion's: the gain and p against the base pair every item the base ever
    answered with the promotion's (here its latest window covers 5 of the 20)."""
    policy, store = _state(tmp_path)
    held = store.tasks(split="heldout")
    store.add_evaluation("base", "heldout", {"accuracy": 0.4, "ci_low": 0.1, "ci_high": 0.8, "n": 5, "empty_fraction": 0,
                                             "repetition": 0, "mean_length": 2},
                         [{"task_id": t.id, "correct": i % 3 == 0, "score": 0.0, "text": "x", "tokens": 1} for i, t in enumerate(held[:5])])
    # ckpt 1, round 2's incumbent, answered round 2's window too: its row keeps the figure that promoted it
    store.add_evaluation("ckpt-000001", "heldout", {"accuracy": 0.1, "ci_low": 0.0, "ci_high": 0.5, "n": 5, "empty_fraction": 0,
                                                    "repetition": 0, "mean_length": 2},
                         [{"task_id": t.id, "correct": False, "score": 0.0, "text": "y", "tokens": 1} for t in held[:5]], 2)
    rows = summary_rows(store)
    assert rows[0]["n"] == 5  # the base's row is its latest window
    assert (rows[1]["accuracy"], rows[1]["n"]) == (0.9, 20)
    assert rows[1]["gain_vs_base"] == 13 / 20 and abs(rows[1]["p_vs_base"] - 0.5 ** 13) < 1e-12
