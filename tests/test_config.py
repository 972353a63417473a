"""Policy files: every shipped policy loads, and bad ones fail with one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfdistill.config import load_policy, parse_policy
from selfdistill.errors import PolicyError
from selfdistill.gates import gate_can_pass

from sd_testutil import ROOT, run_cli

SHIPPED = sorted((ROOT / "policies").glob("*.toml"))
MIN = {"tasks": {"sources": [{"type": "reasoning_gym", "dataset": "chain_sum"}]}}


def test_policies_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"cpu-demo.toml", "gpu.toml", "teacher-openai.toml", "jsonl-verifier.toml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_policy_loads_and_can_pass(path: Path):
    policy = load_policy(path)
    assert policy.tasks.sources
    assert gate_can_pass(policy) == []
    # the header shows the command that runs it
    assert "selfdistill" in path.read_text().split("\n\n")[0] or "make demo" in path.read_text()


def test_relative_paths_resolve_against_the_policy_file():
    p = load_policy(ROOT / "policies" / "jsonl-verifier.toml")
    assert p.tasks.sources[0].path == (ROOT / "policies" / "examples" / "tasks.jsonl").resolve()
    assert p.state_dir == (ROOT / "state" / "jsonl-verifier").resolve()


def _merge(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


BAD = [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"training": {"epochs": -1}}, "training.epochs: Input should be greater than 0 (got -1)"),
    ({"training": {"algorithm": "ppo"}}, "training.algorithm: Input should be 'sft', 'dpo' or 'sft_then_dpo'"),
    ({"generation": {"samples_per_task": "eight"}}, "generation.samples_per_task: Input should be a valid integer"),
    ({"tasks": {"sources": [{"type": "reasoning_gym"}]}}, "tasks.sources[0].dataset: required key is missing"),
    ({"tasks": {"sources": [{"type": "csv", "path": "x"}]}}, "tasks.sources[0]: Input tag 'csv' found using 'type' does not match"),
    ({"tasks": {"heldout_fraction": 0.0}}, "tasks.heldout_fraction is 0 but gates.test needs held-out items"),
    ({"scoring": {"teacher_judge": {"enabled": True}}}, "no [teacher] table is given"),
    ({"training": {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}}, "got 1 loss_weights for 2 loss_type entries"),
    ({"training": {"loss_type": ["sigmoid", "simpo"]}}, "loss_type 'simpo' is reference-free and must be the only entry"),
    ({"tasks": {"heldout_fraction": 0.5, "audit_fraction": 0.5}}, "leaves no training tasks"),
    ({"evaluation": {"heldout_items": 3}}, "evaluation.heldout_items = 3 can never reach p < 0.05: at least 5 items are needed"),
    ({"gates": {"alpha": 0}}, "gates.alpha: Input should be greater than 0"),
]


@pytest.mark.parametrize("extra,expected", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_policies_name_key_and_fix(extra, expected):
    with pytest.raises(PolicyError) as e:
        parse_policy(_merge(MIN, extra), "p.toml")
    assert expected in str(e.value)
    assert all(p.startswith("p.toml: ") for p in e.value.problems)


def test_every_problem_is_reported_at_once():
    with pytest.raises(PolicyError) as e:
        parse_policy(_merge(MIN, {"bogus": 1, "training": {"epochs": 0, "beta": -1}}), "p.toml")
    assert len(e.value.problems) == 3
    assert str(e.value).startswith("3 problems in p.toml:")


def test_gate_that_can_never_pass_is_refused_by_check(tmp_path):
    p = tmp_path / "never.toml"
    p.write_text('[tasks]\nsources = [{type = "reasoning_gym", dataset = "chain_sum"}]\n'
                 '[evaluation]\nheldout_items = 6\n[gates]\nalpha = 0.01\n')
    r = run_cli("check", str(p))
    assert r.returncode == 2
    assert "can never" in r.stderr


@pytest.mark.parametrize("content,expected", [
    ("name = \n", "not valid TOML"),
    ("\xff\xfe", "not valid TOML"),
    ("[tasks]\nsources = []\n", "tasks.sources: List should have at least 1 item"),
])
def test_check_cli_one_line_per_problem(tmp_path, content, expected):
    p = tmp_path / "bad.toml"
    p.write_text(content)
    r = run_cli("check", str(p))
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr
    assert "Traceback" not in r.stderr
    assert str(p) in r.stderr


def test_check_missing_file_and_ok(tmp_path):
    r = run_cli("check", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "no such policy file" in r.stderr
    r = run_cli("check", str(ROOT / "policies" / "cpu-demo.toml"))
    assert r.returncode == 0 and r.stdout.strip().endswith(": ok")


def test_schema_lists_every_key_with_help():
    r = run_cli("check", "--schema")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert any(line.startswith("gates.alpha") for line in lines)
    assert all(len(line.split(None, 2)) == 3 for line in lines), [l for l in lines if len(l.split(None, 2)) != 3][:3]
