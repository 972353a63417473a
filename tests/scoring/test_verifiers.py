"""Verifiers: extraction and every named verifier, with real reasoning-gym datasets."""

import pytest

from selfdistill.config import ReasoningGymSource, ScoringConfig
from selfdistill.records import Task
from selfdistill.scoring.verifiers import (
    VerifierError,
    extract_answer,
    get_verifier,
    register_verifier,
    resolve_verifier,
    verify,
)
from selfdistill.tasks.sources import iter_source


def T(answer=None, verifier=None, metadata=None, prompt="q?"):
    return Task(source="jsonl:x", prompt=prompt, answer=answer, verifier=verifier, metadata=metadata or {}, id=7)


@pytest.mark.parametrize("text,ref,expected", [
    ("blah <answer> 42 </answer> more 17", "42", "42"),          # tag wins over the last number
    ("<answer>1</answer> then <answer>2</answer>", "2", "2"),     # the last tag
    ("3 + 4 = 7. So the answer is 7!", "7", "7"),                 # last number for numeric refs
    ("1 - 6 = -5", "-5", "-5"),
    ("the total is 1,234", "1234", "1234"),
    ("no digits here", "5", None),
    ("Paris is nice.\n\nParis\n", "Paris", "Paris"),              # last non-empty line otherwise
    ("", "x", None),
])
def test_extraction_table(text, ref, expected):
    assert extract_answer(text, ref) == expected


@pytest.mark.parametrize("name,answer,text,score", [
    ("exact", "Paris", "Paris", 1.0),
    ("exact", "Paris", "paris", 0.0),
    ("normalized", "Paris", "  PARIS. ", 1.0),
    ("normalized", "New York", "new   york!", 1.0),
    ("normalized", "Paris", "Lyon", 0.0),
    ("numeric", "3.0", "it is 3", 1.0),
    ("numeric", "0.1", "about 0.1000000001", 1.0),
    ("numeric:1e-3", "3.14159", "pi is 3.1416", 1.0),
    ("numeric", "3.14159", "pi is 3.1416", 0.0),
    ("numeric", "5", "<answer>5.0</answer> then 7", 1.0),
    ("regex:[A-D]", None, "I pick\nB", 1.0),
    ("regex:[A-D]", None, "I pick\nBC", 0.0),
])
def test_named_verifiers_table(name, answer, text, score):
    r = get_verifier(name)(text, T(answer))
    assert (r.score, r.correct) == (score, score == 1.0)


@pytest.mark.parametrize("name,match", [
    ("nonsense", "unknown verifier 'nonsense'; known:"),
    ("numeric:abc", "tolerance 'abc' is not a number"),
    ("regex:(", "bad pattern"),
    ("regex:", "write regex:<pattern>"),
])
def test_bad_names(name, match):
    with pytest.raises(VerifierError, match=match):
        get_verifier(name)


def test_missing_reference_is_a_clear_error():
    with pytest.raises(VerifierError, match="task 7: verifier 'exact' needs a reference answer"):
        get_verifier("exact")("x", T(None))


def test_resolve_auto():
    rg = T("3", metadata={"reasoning_gym": {}})
    assert resolve_verifier(rg, "auto").name == "reasoning_gym"
    assert resolve_verifier(T("x"), "auto").name == "normalized"
    assert resolve_verifier(T(None), "auto") is None
    assert resolve_verifier(T("x", verifier="exact"), "auto").name == "exact"  # the task's own wins
    assert resolve_verifier(T("x"), "numeric:0.5").name == "numeric:0.5"


def test_register_custom():
    from selfdistill.scoring.verifiers import VerifierResult

    register_verifier("always_half", lambda text, task: VerifierResult(0.5, False, {}))
    assert verify("x", T(verifier="always_half")).score == 0.5
    with pytest.raises(VerifierError, match="taken"):
        register_verifier("exact", lambda text, task: None)


def _rg_tasks(dataset, config, size=20, seed=3):
    src = ReasoningGymSource(type="reasoning_gym", dataset=dataset, config=config, seed=seed, size=size)
    return [Task(**vars(t), id=i) for i, t in enumerate(iter_source(src))]


def test_reasoning_gym_rebuilds_entry_and_only_full_score_is_correct():
    tasks = _rg_tasks("chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1})
    for t in tasks:
        right = verify(f"Let me think. {t.prompt} The answer is {t.answer}", t)
        assert (right.score, right.correct) == (1.0, True)
        tagged = verify(f"<answer>{t.answer}</answer> and 99", t)
        assert tagged.correct
    t = next(t for t in tasks if len(t.answer.lstrip("-")) == 1 and t.answer != "0")
    partial = verify(f"so {t.answer}0", t)  # reasoning-gym gives partial credit for a superstring
    assert 0.0 < partial.score < 1.0 and partial.correct is False
    assert verify("I do not know", t).score == 0.0


def test_reasoning_gym_other_dataset_and_drift_detection():
    t = _rg_tasks("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}, size=5)[0]
    assert verify(t.answer, t).correct
    moved = Task(**{**vars(t), "prompt": "something else"})
    with pytest.raises(VerifierError, match="no longer matches the stored question"):
        verify(t.answer, moved)
    with pytest.raises(VerifierError, match="needs metadata.reasoning_gym"):
        get_verifier("reasoning_gym")("1", T("1"))


CODE_TASK = dict(answer=None, verifier="code", metadata={"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]})


@pytest.mark.parametrize("answer,score", [
    ("```python\ndef add(a, b):\n    return a + b\n```", 1.0),
    ("def add(a, b):\n    return a - b if a < 0 else a + b", 0.5),       # partial: one of two tests
    ("def add(a, b): return 7", 0.0),
    ("import sys\nsys.exit(0)", 0.0),                                   # exiting early is no pass
    ("import os\nos._exit(0)", 0.0),
    ("import sys\nsys.stdin.read()\nprint('x 2 2')\ndef add(a,b): return 0", 0.0),  # fake summary
    ("while True: pass", 0.0),
    ("this is not python", 0.0),
])
def test_code_verifier_runs_in_sandbox(answer, score):
    scoring = ScoringConfig(code_timeout_s=2.0, code_memory_mb=128)
    r = resolve_verifier(T(**CODE_TASK), "auto", scoring)(answer, T(**CODE_TASK))
    assert r.score == score, r.details
    assert r.correct is (score == 1.0)


def test_code_verifier_single_string_tests_and_missing_tests():
    t = T(verifier="code", metadata={"tests": "assert f() == 1\nassert f() + 1 == 2"})
    assert verify("def f(): return 1", t).correct
    with pytest.raises(VerifierError, match="needs metadata.tests"):
        verify("x", T(verifier="code"))


def test_code_answers_are_not_run_where_the_sandbox_cannot_isolate_them(monkeypatch, tmp_path):
    """A daemon that is not root and cannot make user namespaces (a systemd unit without the
    sandbox drop-in) would run model-written code as itself, with its database and the network in
    reach: refused at start, and by the verifier, unless the policy accepts rlimits alone."""
    import os

    from sd_testutil import tiny_policy_data

    from selfdistill.config import parse_policy as policy_from_dict
    from selfdistill.errors import PolicyError
    from selfdistill.operations import check_code_sandbox
    from selfdistill.scoring import sandbox
    from selfdistill.store import Store

    monkeypatch.setattr(os, "geteuid", lambda: 999)
    monkeypatch.setattr(sandbox, "_userns_problem", lambda: "unshare(CLONE_NEWUSER): Operation not permitted")
    with pytest.raises(VerifierError, match=r"^code answers are not run: the daemon runs as uid 999, not root, and cannot "
                                              r"create user namespaces \(unshare\(CLONE_NEWUSER\): Operation not permitted\).* "
                                              r"set scoring.code_sandbox = \"rlimits\""):
        resolve_verifier(T(**CODE_TASK), "auto", ScoringConfig())("def add(a, b): return a + b", T(**CODE_TASK))

    data = tiny_policy_data(tmp_path / "model")
    data["state_dir"] = str(tmp_path / "state")
    store = Store.create(tmp_path / "db.sqlite")
    try:
        policy = policy_from_dict(data)
        check_code_sandbox(policy, store)  # no code task: nothing to refuse
        store.add_tasks([T(**CODE_TASK), T(prompt="Say 4.")], 0.0)
        with pytest.raises(PolicyError, match=r"^1 task\(s\) use the code verifier, and the daemon runs as uid 999, not root, and cannot"):
            check_code_sandbox(policy, store)
        data["tasks"]["default_verifier"] = "code"  # the task without a verifier of its own is a code task too
        with pytest.raises(PolicyError, match=r"^2 task\(s\) use the code verifier"):
            check_code_sandbox(policy_from_dict(data), store)
        data["scoring"] = {"code_sandbox": "rlimits"}
        check_code_sandbox(policy_from_dict(data), store)  # accepted by the policy
        assert resolve_verifier(T(**CODE_TASK), "auto", policy_from_dict(data).scoring)("def add(a, b): return a + b",
                                                                                        T(**CODE_TASK)).details["isolation"] == "rlimits"
    finally:
        store.close()
