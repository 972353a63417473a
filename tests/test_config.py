"""Policy files: every shipped policy loads, and bad ones fail with one line per problem."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from pydantic import BaseModel
from sd_testutil import ROOT, run_cli

from selfdistill.config import Policy, SourceConfig, field_help, load_policy, parse_policy, reload_plan
from selfdistill.errors import PolicyError
from selfdistill.gates import gate_can_pass

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
    d = load_policy(ROOT / "policies" / "cpu-distill.toml")  # the teacher the recipe makes, wherever the daemon starts
    assert d.teacher.model == str((ROOT / "state" / "teacher" / "specialist-merged").resolve())
    assert load_policy(ROOT / "policies" / "gpu-teacher.toml").teacher.model == "/srv/models/teacher"


def _merge(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


BAD = [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"training": {"epochs": -1}}, "training.epochs: Input should be greater than 0 (got -1)"),
    ({"training": {"algorithm": "ppo"}},
     "training.algorithm: Input should be 'sft', 'dpo', 'sft_then_dpo', 'grpo', 'sft_then_grpo', 'distill' or 'sft_then_distill' (got 'ppo')"),
    ({"training": {"algorithm": "grpo", "num_processes": 2, "launcher": "torchrun"}}, "the policy-gradient stage runs in one process; set num_processes = 1"),
    ({"generation": {"samples_per_task": "eight"}}, "generation.samples_per_task: Input should be a valid integer"),
    ({"tasks": {"sources": [{"type": "reasoning_gym"}]}}, "tasks.sources[0].dataset: required key is missing"),
    ({"tasks": {"sources": [{"type": "csv", "path": "x"}]}}, "tasks.sources[0]: Input tag 'csv' found using 'type' does not match"),
    ({"tasks": {"heldout_fraction": 0.0}}, "tasks.heldout_fraction is 0 but gates.test needs held-out items"),
    ({"scoring": {"teacher_judge": {"enabled": True}}}, "no [teacher] table is given"),
    ({"training": {"distill": {"objective": "forward_kl", "jsd_beta": 0.3}}},
     "training.distill.jsd_beta is used only by objective = 'jsd' (the objective is 'forward_kl')"),
    ({"training": {"distill": {"top_k": 4}}}, "training.distill.top_k is used only by the top-k objectives"),
    ({"training": {"distill": {"top_k": 32, "objective": "jsd"}}}, "training.distill.top_k: Input should be less than or equal to 20"),
    ({"training": {"algorithm": "sft_then_distill"}}, "training.algorithm = 'sft_then_distill') but no [teacher] table is given"),
    ({"engine": {"kind": "vllm"}, "teacher": {"kind": "vllm", "model": "/models/t"}},
     "two in-process vLLM engines cannot share one process; set teacher.kind = 'served' (the daemon runs the teacher's vLLM server"),
    ({"engine": {"kind": "vllm", "gpu_memory_utilization": 0.7}, "teacher": {"kind": "served", "model": "/m", "serve": {"gpu_memory_utilization": 0.3}}},
     "teacher.serve.gpu_memory_utilization 0.3 + engine.gpu_memory_utilization 0.7 > 0.95: the teacher and the student cannot both fit one GPU"),
    ({"teacher": {"kind": "served"}}, "kind='served' needs `model` (a local model directory)"),
    ({"training": {"distill": {"baseline": "median"}}}, "training.distill.baseline: Input should be 'none', 'mean' or 'whiten'"),
    ({"training": {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}}, "got 1 loss_weights for 2 loss_type entries"),
    ({"training": {"loss_type": ["sigmoid", "simpo"]}}, "loss_type 'simpo' is reference-free and must be the only entry"),
    ({"tasks": {"heldout_fraction": 0.5, "audit_fraction": 0.5}}, "leaves no training tasks"),
    ({"evaluation": {"heldout_items": 3}}, "evaluation.heldout_items = 3 can never reach p < 0.05: at least 5 items are needed"),
    ({"gates": {"alpha": 0}}, "gates.alpha: Input should be greater than 0"),
    # accepted keys whose feature is not built: refused with why, not ignored
    ({"evaluation": {"pairwise_judge": "teacher"}}, "evaluation.pairwise_judge = 'teacher' but no [teacher] table is given"),
    ({"stopping": {"max_teacher_tokens": 10**6}}, "stopping.max_teacher_tokens is set but no [teacher] table is given"),
    ({"gates": {"min_win_rate": 0.5}}, "gates.min_win_rate = 0.5 gates nothing while evaluation.pairwise_judge = 'none'"),
    ({"schedule": {"eval_interval_s": 86400}},
     "p.toml: schedule.eval_interval_s was removed: it re-read a cached evaluation and measured nothing; delete the key"),
    ({"schedule": {"outside_windows": "idle"}}, "schedule.outside_windows = 'idle' needs schedule.train_windows"),
    ({"schedule": {"outside_windows": "sleep"}}, "schedule.outside_windows: Input should be 'collect' or 'idle'"),
    ({"scoring": {"self_judge": {"enabled": True, "teacher_anchors": 16}}},
     "scoring.self_judge.teacher_anchors = 16 needs a teacher to label them, but no [teacher] table is given"),
    ({"scoring": {"teacher_judge": {"teacher_anchors": 16}}}, "scoring.teacher_judge.teacher_anchors: the teacher cannot be measured on its own"),
    ({"tasks": {"curriculum": {"advance_at": 0.3, "review_weight": 0}}},
     "tasks.curriculum.advance_at, review_weight shape difficulty levels, which are off without tasks.curriculum.level_field"),
    ({"tasks": {"curriculum": {"level_field": "num_terms", "advance_at": 0}}}, "tasks.curriculum.advance_at: Input should be greater than 0"),
    ({"training": {"review_fraction": 0.25}},
     "training.review_fraction = 0.25 cuts the rows of passed difficulty levels, which are off without tasks.curriculum.level_field"),
    ({"tasks": {"curriculum": {"level_field": "num_terms"}}, "training": {"review_fraction": 1}},
     "training.review_fraction: Input should be less than 1"),
]


@pytest.mark.parametrize("extra,expected", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_policies_name_key_and_fix(extra, expected):
    with pytest.raises(PolicyError) as e:
        parse_policy(_merge(MIN, extra), "p.toml")
    assert expected in str(e.value)
    assert all(p.startswith("p.toml: ") for p in e.value.problems)


@pytest.mark.parametrize("extra", [
    {},
    {"evaluation": {"pairwise_judge": "none"}},
    {"schedule": {"outside_windows": "idle", "train_windows": [{"start": "19:00", "end": "07:00"}]}},
    {"schedule": {"outside_windows": "collect"}},
], ids=str)
def test_good_policies_load(extra):
    parse_policy(_merge(MIN, extra), "p.toml")


def test_a_removed_key_is_not_called_unknown():
    with pytest.raises(PolicyError) as e:
        parse_policy(_merge(MIN, {"schedule": {"eval_interval_s": 60}}), "p.toml")
    assert e.value.problems == ["p.toml: schedule.eval_interval_s was removed: it re-read a cached evaluation "
                                "and measured nothing; delete the key"]


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
    assert any(line.startswith("tasks.sources[type=reasoning_gym].dataset ") for line in lines)
    assert any(line.startswith("schedule.train_windows[].start ") for line in lines)
    assert all(len(line.split(None, 2)) == 3 for line in lines), [l for l in lines if len(l.split(None, 2)) != 3][:3]


# --------------------------------------------------------------------------------------------
# the schema listing


def _source_fields():
    for model in get_args(get_args(SourceConfig)[0]):
        tag = get_args(model.model_fields["type"].annotation)[0]
        for name in model.model_fields:
            yield f"tasks.sources[type={tag}].{name}"


SCHEMA_ROWS = [*_source_fields(), "schedule.train_windows[].start", "schedule.train_windows[].end",
               "schedule.outside_windows", "teacher.endpoint.api_key_env", "engine.server.base_url", "gates.alpha"]


@pytest.mark.parametrize("key", SCHEMA_ROWS)
def test_field_help_lists_keys_inside_arrays_and_unions(key):
    rows = {k: (t, h) for k, t, h in field_help()}
    assert key in rows
    typ, help_ = rows[key]
    assert help_ and " " not in typ


@pytest.mark.parametrize("key,typ", [
    ("tasks.sources", "list[table]"),
    ("tasks.sources[type=jsonl].type", '"jsonl"'),
    ("schedule.outside_windows", '"collect"|"idle"'),
    ("engine.threads", "int|none"),
    ("state_dir", "path"),
])
def test_field_help_types(key, typ):
    assert dict((k, t) for k, t, _ in field_help())[key] == typ


def test_field_help_drops_removed_keys():
    assert "schedule.eval_interval_s" not in {k for k, _, _ in field_help()}


# --------------------------------------------------------------------------------------------
# SIGHUP reload: which keys a running daemon takes, derived from the model's restart marks

BASE = {
    "name": "r", "state_dir": "/srv/sd/state",
    "teacher": {"kind": "openai", "endpoint": {"base_url": "http://127.0.0.1:8001/v1", "model": "t"}},
    "tasks": {"sources": [{"type": "jsonl", "path": "/srv/sd/tasks.jsonl"}]},
}


def _policy(extra: dict | None = None):
    return parse_policy(_merge(BASE, extra or {}), "p.toml")


def _get(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _nested(key: str, value) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _candidates(annotation, value):
    """Valid-looking other values for a leaf of this type (the policy's checks pick among them)."""
    args = get_args(annotation)
    for a in args:
        if get_origin(a) is Literal:
            args = args + get_args(a)
    if get_origin(annotation) is Literal:
        args = get_args(annotation)
    yield from (a for a in args if isinstance(a, str) and a != value)
    if isinstance(value, bool):
        yield not value
    elif isinstance(value, int):
        yield from (value + 1, value - 1)
    elif isinstance(value, float):
        yield from (value / 2 if value else 0.5, value + 0.1)
    elif isinstance(value, str):
        yield value + "x"
    elif isinstance(value, Path):
        yield value.parent / (value.name + "x")
    elif value is None:
        yield from ({int: 1, float: 1.0, str: "x"}[a] for a in args if a in (int, float, str))


def _one_change(section: str):
    """(key, new policy) for the first leaf under `section` that can take another valid value."""
    base = _policy()
    obj = getattr(base, section)
    leaves = [(section, Policy.model_fields[section], obj)]
    while leaves:
        key, field, value = leaves.pop(0)
        if isinstance(value, BaseModel):
            leaves = [(f"{key}.{n}", f, getattr(value, n)) for n, f in type(value).model_fields.items()] + leaves
            continue
        for cand in _candidates(field.annotation, value):
            try:
                return key, cand, _policy(_nested(key, cand))
            except PolicyError:
                continue
    raise AssertionError(f"no leaf of [{section}] could be changed: teach _candidates its type")


@pytest.mark.parametrize("section", list(Policy.model_fields))
def test_every_change_is_applied_or_refused_never_dropped(section):
    old = _policy()
    before = old.model_dump()
    key, value, new = _one_change(section)
    plan = reload_plan(old, new)
    refused = [k for k, _ in plan.refused]
    assert plan.applied + refused == [key]
    assert _get(new, key) == value
    assert _get(plan.policy, key) == (value if plan.applied else _get(old, key))
    assert all(why for _, why in plan.refused)
    assert old.model_dump() == before and plan.policy is not old


RELOAD = [
    ({"tasks": {"per_round": 7}}, "tasks.per_round", None),
    ({"tasks": {"curriculum": {"width": 0.5}}}, "tasks.curriculum.width", None),
    ({"tasks": {"curriculum": {"level_field": "num_terms"}}}, "tasks.curriculum.level_field", "checked against the stored tasks at start"),
    ({"tasks": {"prompt_suffix": " Answer:"}}, "tasks.prompt_suffix", "stored evaluations were made under the old prompt and verifier"),
    ({"tasks": {"default_verifier": "exact"}}, "tasks.default_verifier", "gating would compare unlike figures"),
    ({"tasks": {"heldout_fraction": 0.3}}, "tasks.heldout_fraction", "would move the held-out wall"),
    ({"tasks": {"audit_fraction": 0.1}}, "tasks.audit_fraction", "would move the held-out wall"),
    ({"tasks": {"sources": [{"type": "reasoning_gym", "dataset": "chain_sum"}]}}, "tasks.sources", "ingested at start: restart to ingest"),
    ({"logging": {"format": "human"}}, "logging.format", None),
    ({"name": "other"}, "name", "the metrics endpoint labels its figures with it"),
    ({"schedule": {"idle_sleep_s": 2.0}}, "schedule.idle_sleep_s", None),
    ({"engine": {"kind": "transformers"}}, "engine.kind", "the engine is built once at start"),
    ({"student": {"lora": {"r": 8}}}, "student.lora.r", "LoRA shape"),
    ({"teacher": {"temperature": 0.5}}, "teacher.temperature", "the teacher engine is built once"),
    ({"state_dir": "/srv/sd/other"}, "state_dir", "the lock, the database and the adapters live there"),
    ({"monitoring": {"prometheus_port": 9464}}, "monitoring.prometheus_port", "the metrics server binds at start"),
    ({"schedule": {"train_windows": [{"start": "19:00", "end": "07:00"}]}}, "schedule.train_windows", None),
    ({"gates": {"min_gain": 0.02}}, "gates.min_gain", None),
]


@pytest.mark.parametrize("extra,key,reason", RELOAD, ids=[r[1] for r in RELOAD])
def test_reload_plan(extra, key, reason):
    old, new = _policy(), _policy(extra)
    plan = reload_plan(old, new)
    if reason is None:
        assert (plan.applied, plan.refused) == ([key], [])
        assert _get(plan.policy, key) == _get(new, key) != _get(old, key)
    else:
        assert plan.applied == [] and [k for k, _ in plan.refused] == [key]
        assert reason in plan.refused[0][1]
        assert _get(plan.policy, key) == _get(old, key) != _get(new, key)


def test_reload_applies_some_keys_and_keeps_the_rest_running():
    old = _policy()
    new = _policy({"tasks": {"per_round": 7, "prompt_suffix": " Answer:"}, "teacher": None, "generation": {"stop": ["\n"]}})
    plan = reload_plan(old, new)
    assert sorted(plan.applied) == ["generation.stop", "tasks.per_round"]
    assert sorted(k for k, _ in plan.refused) == ["tasks.prompt_suffix", "teacher"]
    p = plan.policy
    assert (p.tasks.per_round, p.generation.stop, p.tasks.prompt_suffix, p.teacher) == (7, ["\n"], "", old.teacher)
    assert p is not old and p is not new and old.tasks.per_round == 64
    assert reload_plan(old, old).applied == [] and reload_plan(old, old).refused == []


def test_reload_that_would_mix_into_an_incoherent_policy_is_refused():
    old = _policy({"tasks": {"heldout_fraction": 0.0}, "gates": {"test": "none"}})
    new = _policy({"tasks": {"heldout_fraction": 0.2}, "gates": {"test": "mcnemar"}})
    with pytest.raises(PolicyError, match="tasks.heldout_fraction is 0 but gates.test needs held-out items"):
        reload_plan(old, new)


@pytest.mark.parametrize("training, fix", [
    ({"start_from": "base", "reference": "base", "data_scope": "since_last"}, "set data_scope = 'all'"),
    ({"start_from": "base", "data_scope": "all"}, "set reference = 'base'"),
    ({"start_from": "base", "reference": "base", "algorithm": "sft_then_grpo"}, "set start_from = 'incumbent'"),
])
def test_a_fresh_lora_each_round_is_refused_where_it_would_lose_data_or_mislead(training, fix):
    with pytest.raises(PolicyError, match=fix):
        parse_policy(_merge(MIN, {"training": training}), "p.toml")
    parse_policy(_merge(MIN, {"training": {"start_from": "base", "reference": "base"}}), "p.toml")
