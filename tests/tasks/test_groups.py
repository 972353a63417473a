"""Splits by group: the same question in another form never sits on both sides of the held-out wall."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from selfdistill.config import JsonlSource, load_policy
from selfdistill.records import split_for
from selfdistill.store import Store
from selfdistill.tasks.groups import signed_terms
from selfdistill.tasks.sources import load_source

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("a,b,same", [
    ("1 + 5", "5 + 1", True),
    ("8 + 0 + 7", "7 + 8 + 0", True),
    ("4 - 1", "1 - 4", False),  # -1 +4 against -4 +1: another answer
    ("4 - 1", "4 + 1", False),
    ("2 + 2 + 3", "2 + 3", False),  # a multiset: the count of each term matters
])
def test_signed_terms(a, b, same):
    assert (signed_terms(a) == signed_terms(b)) is same
    assert signed_terms("4 * 2") is None and signed_terms("x + 1") is None


def _straddling(tasks, split_of) -> tuple[int, int]:
    """(held-out items with a training twin in their group, held-out items)."""
    sides = defaultdict(set)
    for t in tasks:
        sides[t.group].add(split_of(t))
    held = [t for t in tasks if split_of(t) == "heldout"]
    return sum(1 for t in held if "train" in sides[t.group]), len(held)


def test_the_demo_task_has_no_held_out_item_with_a_training_twin(tmp_path):
    """policies/cpu-demo.toml's chain_sum, as the daemon ingests it: split by group, no held-out
    question has a twin (the same signed terms in another order, the same answer) on the train
    side. Split by the exact text, as before, a third of them did: that is what this guards."""
    policy = load_policy(ROOT / "policies" / "cpu-demo.toml")
    (src,) = [s for s in policy.tasks.sources if getattr(s, "dataset", None) == "chain_sum"]
    tasks, problems = load_source(src)
    assert not problems and all(t.group and t.group.startswith("chain_sum:") for t in tasks)
    unique = list({t.key: t for t in tasks}.values())
    tf = policy.tasks
    twins, held = _straddling(unique, lambda t: split_for(t.split_key, tf.heldout_fraction, tf.audit_fraction))
    assert held >= 100 and twins == 0, (twins, held)
    old_twins, old_held = _straddling(unique, lambda t: split_for(t.key, tf.heldout_fraction, tf.audit_fraction))
    assert old_twins / old_held > 0.2, (old_twins, old_held)
    # and through the store: the group is kept and the rule holds in SQL
    store = Store.create(tmp_path / "selfdistill.db")
    store.add_tasks(tasks, tf.heldout_fraction, tf.audit_fraction)
    bad = store.query("SELECT count(*) AS n FROM tasks h JOIN tasks t ON t.task_group = h.task_group "
                      "WHERE h.split = 'heldout' AND t.split != 'heldout'")[0]["n"]
    assert bad == 0 and store.tasks(limit=1)[0].group.startswith("chain_sum:")
    store.close()


def test_a_jsonl_group_field_keeps_its_tasks_on_one_side(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"prompt": f"Paraphrase {v} of question {g}", "answer": str(g), "group": f"q{g}"} for g in range(200) for v in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"prompt": "bad group", "group": [1]}) + "\n")
    tasks, problems = load_source(JsonlSource(type="jsonl", path=path))
    assert len(tasks) == 600 and problems == [f"{path}:601: `group` must be a string or a number, got list"]
    splits = defaultdict(set)
    for t in tasks:
        splits[t.group].add(split_for(t.split_key, 0.3))
    assert all(len(s) == 1 for s in splits.values())
    assert 30 < sum(1 for s in splits.values() if s == {"heldout"}) < 90  # about 30% of the groups are held out
