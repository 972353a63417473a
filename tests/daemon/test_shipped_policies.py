"""Every shipped policy, run for real: its own engine kind, release mode, algorithm, scoring,
pairing, schedule and stopping, with only the model swapped for the tiny one and the sizes
shrunk (SHRINK below says exactly what changes, and why). Each runs the README's two daemon
commands as written (`selfdistill init POLICY`, `selfdistill run POLICY --burst`) for three
rounds: one whose training skips, one whose training fails (every attempt), one that trains for
real and is evaluated and decided by the policy's own gates. A new file in policies/ is picked
up by the glob: it gets this test without anyone writing one.

Skip and fail come from the training child's test hook (SELFDISTILL_TEST_TRAINING); the engine
release around them, the retries and the next rounds are the real code paths.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import tomllib
from pathlib import Path

import pytest
from sd_testutil import ROOT, merged, run_cli, write_policy

from selfdistill.checkpoints import read_current

pytestmark = pytest.mark.slow

POLICIES = sorted((ROOT / "policies").glob("*.toml"))
TEACHER_POLICIES = {"teacher-openai.toml", "open-teacher-judge.toml"}
# a judge the tiny model is asked to be: it cannot pass its anchor check, so these train on nothing
SELF_JUDGED = {"open-self-judge.toml"}
# programming tasks, scored by running the program against the task's tests in the code sandbox:
# a model of random weights writes no program that compiles, so these score but train on nothing
CODE_TASKS = {"code-tests.toml"}
# The policies shipped today, by name: the glob must find each (a moved directory or a renamed file
# would otherwise run none of them and pass); a new file is still picked up without being named.
SHIPPED = {"code-tests.toml", "cpu-demo.toml", "cpu-distill.toml", "gpu.toml", "gpu-teacher.toml", "jsonl-verifier.toml", "teacher-openai.toml",
           "open-teacher-judge.toml", "open-self-judge.toml"}
README_COMMANDS_ON = "jsonl-verifier.toml"  # the README's command table runs on this one's state

# What is changed in a shipped policy to run it here, and nothing else. Sizes shrink; the model
# becomes the tiny local one; CPU-only knobs replace GPU ones where a GPU setting cannot run or
# would cost minutes on CPU; guards that judge a real model's learning are relaxed for a model of
# random weights (the guards have their own tests in tests/training); the verifier becomes one
# that such a model can pass.
SHRINK = {
    "student": {"base_model": None},  # the tiny model's directory, set per test
    "engine": {"max_model_len": 256, "cpu_kv_cache_gib": 0.25,
               "enforce_eager": True},  # torch.compile is a GPU speed-up; on CPU it costs a minute per engine start
    # a model of random weights never answers right: its answers are verified by "has a digit"
    # instead, so that there are verified answers and pairs to train on (as the daemon tests do)
    "tasks": {"per_round": 6, "default_verifier": "regex:.*[0-9].*"},
    "generation": {"samples_per_task": 4, "max_tokens": 12},
    "training": {"epochs": 1, "dpo_epochs": 1, "batch_size": 4, "grad_accum": 1, "max_length": 256, "threads": 1,
                 "min_sft_examples": 1, "min_pairs": 1, "min_loss_change": 0.0, "min_dpo_margin": -1000.0,
                 "time_limit_s": 300},
    "evaluation": {"heldout_items": 8, "max_tokens": 12, "anchor_prompts": ["hello", "a b c"], "anchor_max_tokens": 8},
    "schedule": {"idle_sleep_s": 0.1},
    "teacher": {"max_tokens": 16},
}
# a served teacher (the daemon's vLLM server child) on CPU: the student engine's sizes; on CPU its
# GPU share is not passed to vLLM (the server gets a KV cache in bytes instead)
SERVE_SHRINK = {"dtype": "float32", "max_model_len": 256, "cpu_kv_cache_gib": 0.25, "enforce_eager": True, "start_timeout_s": 300}


# Open-ended tasks (default_verifier = "auto", no answers) stay verifier-less: the judge is what
# such a policy is about. A teacher judge's anchor file becomes one the scripted teacher agrees
# with (it calls an answer with a digit good), as the verifier becomes one the tiny model can pass.
FAKE_TEACHER_ANCHORS = [{"prompt": f"Item {i}?", "answer": a, "verdict": v} for i in range(4) for a, v in ((f"{i} parts", True), ("nice", False))]


def shipped(path: Path, model_dir: Path, tmp: Path, teacher_url: str | None) -> dict:
    data = tomllib.loads(path.read_text())
    open_ended = data["tasks"].get("default_verifier") == "auto"
    data = merged(data, {k: v for k, v in SHRINK.items() if k in data or k not in ("teacher",)})
    if open_ended:
        data["tasks"]["default_verifier"] = "auto"
        data["engine"]["max_model_len"] = 512  # the tiny model's whole context: a judge's prompt is long
    for who, judge in data.get("scoring", {}).items():
        if isinstance(judge, dict) and judge.get("anchors"):
            judge["anchors"] = str((path.parent / judge["anchors"]).resolve())
            if who == "teacher_judge" and teacher_url is not None:
                fake = tmp / "fake-teacher-anchors.jsonl"
                fake.write_text("".join(json.dumps(r) + "\n" for r in FAKE_TEACHER_ANCHORS))
                judge["anchors"] = str(fake)
    data["student"]["base_model"] = str(model_dir)
    data["state_dir"] = str(tmp / "state")
    for src in data["tasks"]["sources"]:
        if "path" in src:
            src["path"] = str((path.parent / src["path"]).resolve())
        if src["type"] == "reasoning_gym":
            src["size"] = 120
        if src["type"] == "expansion":
            src["per_round"] = 2
    sched = data.setdefault("schedule", {})
    if sched.get("train_min_new_pairs"):
        sched["train_min_new_pairs"] = 1  # a size: a GPU policy waits for thousands of pairs
    stop = data.setdefault("stopping", {})
    if stop.get("max_rounds") is not None:
        stop["max_rounds"] = max(stop["max_rounds"], 3)  # room for the skip, the fail and a real round
    if "monitoring" in data and data["monitoring"].get("prometheus_port") is not None:
        data["monitoring"]["prometheus_port"] = 0  # any free port: the endpoint still runs
    if teacher_url is not None:
        data["teacher"]["endpoint"].update(base_url=teacher_url, timeout_s=5.0, max_retries=1, backoff_s=0.05)
    if data.get("teacher", {}).get("kind") in ("served", "transformers", "vllm"):
        data["teacher"]["model"] = str(model_dir)  # a local teacher: the tiny model too (it shares its own tokenizer)
        if data["teacher"]["kind"] == "served":
            data["teacher"]["serve"] = merged(data["teacher"].get("serve", {}), SERVE_SHRINK)
    if "distill" in data.get("training", {}):
        data["training"]["distill"]["min_samples"] = 4  # a size: 6 tasks a round give fewer answers than a GPU policy's minimum
    return data


def test_every_shipped_policy_is_found_and_run():
    assert SHIPPED <= {p.name for p in POLICIES}, sorted(SHIPPED - {p.name for p in POLICIES})


def _tz_inside(windows: list[dict]) -> str:
    """A POSIX TZ under which local time now falls in the middle of the first training window,
    so the daemon's own window check (not a patched one) lets the rounds train."""
    if not windows:
        return os.environ.get("TZ", "UTC")
    a, b = (int(windows[0][k][:2]) for k in ("start", "end"))
    mid = (a + ((b - a) % 24) // 2) % 24
    offset = ((mid - time.gmtime().tm_hour + 12) % 24) - 12  # local = UTC + offset
    return f"Etc/GMT{-offset:+d}" if offset else "Etc/GMT"  # signs are inverted: Etc/GMT-5 is UTC+5


@pytest.mark.parametrize("policy_file", POLICIES, ids=[p.stem for p in POLICIES])
def test_shipped_policy_runs_its_own_settings(policy_file, tmp_path, tiny_model_dir):
    teacher = None
    if policy_file.name in TEACHER_POLICIES:
        import sys

        sys.path.insert(0, str(ROOT / "tests" / "reliability"))
        from teacher_server import FakeTeacher

        teacher = FakeTeacher("ok").__enter__()
    try:
        data = shipped(policy_file, tiny_model_dir, tmp_path, teacher.base_url if teacher else None)
        policy = write_policy(tmp_path / policy_file.name, data)
        env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "OMP_NUM_THREADS": "1", "SELFDISTILL_TEST_TRAINING": "1:skip,2:fail",
               "TZ": _tz_inside(data.get("schedule", {}).get("train_windows", [])), "TEACHER_API_KEY": "sk-test"}
        init = run_cli("init", str(policy), cwd=tmp_path, env=env)
        assert init.returncode == 0, init.stderr[-2000:]
        run = run_cli("run", str(policy), "--burst", "--max-rounds", "3", cwd=tmp_path, env=env, timeout=900)
        assert run.returncode in (0, 10), run.stderr[-4000:]
    finally:
        if teacher is not None:
            teacher.__exit__(None, None, None)

    con = sqlite3.connect(tmp_path / "state" / "selfdistill.db")
    con.row_factory = sqlite3.Row
    rounds = [dict(r) for r in con.execute("SELECT * FROM rounds ORDER BY id")]
    if policy_file.name in SELF_JUDGED:
        return _refused_self_judge(con, rounds)
    if policy_file.name in CODE_TASKS:
        return _code_scored(con, rounds, json.loads(run_cli("status", str(policy), "--json", cwd=tmp_path, env=env).stdout))
    assert [r["decision"] for r in rounds[:2]] == ["skip", "fail"], rounds
    assert "test hook: round skipped" in rounds[0]["reasons"] and "test hook: round failed" in rounds[1]["reasons"]
    # the round after the skip generated on the engine the skip had released, and so did the next
    assert all(con.execute("SELECT count(*) FROM generations WHERE round_id = ?", (r["id"],)).fetchone()[0] > 0 for r in rounds[:3])
    assert len(rounds) >= 3 and rounds[2]["decision"] in ("promote", "reject"), rounds
    assert con.execute("SELECT count(*) FROM evaluations WHERE round_id = 3 AND suite = 'heldout'").fetchone()[0] >= 1
    attempts = con.execute("SELECT count(*) FROM training_runs WHERE round_id = 2").fetchone()[0]
    assert attempts == 1 + data["training"].get("max_retries", 1)
    assert not [r for r in rounds if r["status"] == "running"]
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    (cur,) = con.execute("SELECT id FROM checkpoints WHERE is_current = 1").fetchone()
    assert read_current(tmp_path / "state") in (cur, None if cur == "base" else cur)
    if data.get("teacher", {}).get("kind") == "served":
        # the teacher server ran, was asked, and was stopped for training and at exit: no process is left
        used = dict(con.execute("SELECT purpose, sum(requests) FROM teacher_usage GROUP BY purpose").fetchall())
        assert used.get("distill", 0) > 0, used
        assert con.execute("SELECT count(*) FROM teacher_logprobs").fetchone()[0] > 0
        log = (tmp_path / "state" / "cache" / "teacher-server" / "server.log").read_text()
        assert log.count("starting the teacher server") >= 2, log[-2000:]  # stopped before a training round, started again
        assert not (tmp_path / "state" / "cache" / "teacher-server" / "server.pid").exists()
    if data["training"].get("algorithm", "").endswith("distill"):
        # on-policy distillation (cpu-distill's in-process teacher, gpu-teacher's served one): the
        # teacher scored the student's own tokens, and the stored figures name that teacher
        rows = con.execute("SELECT count(*), count(DISTINCT teacher) FROM teacher_logprobs").fetchone()
        assert rows[0] > 0 and rows[1] == 1, rows
    if teacher is not None:
        assert teacher.served, "the teacher was never asked"
        n_teacher = sum(con.execute(f"SELECT count(*) FROM {t} WHERE source LIKE 'teacher%'").fetchone()[0]
                        for t in ("sft_examples", "pairs"))
        assert n_teacher > 0, "no teacher label or revision became training data"
    # provenance: every generation names the checkpoint that produced it and its sampling; the
    # trained round measured candidate and incumbent on the same items
    assert con.execute("SELECT count(*) FROM generations WHERE checkpoint_id IS NULL OR params = '{}'").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM scores s JOIN generations g ON g.id = s.generation_id").fetchone()[0] > 0
    assert con.execute("SELECT count(DISTINCT checkpoint_id) FROM evaluations WHERE suite = 'heldout'").fetchone()[0] >= 2
    con.close()
    status = json.loads(run_cli("status", str(policy), "--json", cwd=tmp_path, env=env).stdout)
    assert [r["id"] for r in status["rounds"]][:3] == [1, 2, 3]
    if data["tasks"].get("default_verifier") == "auto":  # open-ended: no accuracy, the teacher's win rate decided
        assert status["base_metrics"]["n"] == 0 and status["base_metrics"]["unverified"] == 8 and status["stopped_reason"]
        assert status["rounds"][2]["metrics"]["candidate_accuracy"] is None and status["rounds"][2]["metrics"]["pairwise"]["trusted"]
    else:
        assert status["base_metrics"]["n"] == 8 and status["stopped_reason"]
    # on CPU vLLM served adapters as merged copies of the base; none outlives the daemon
    merged_dir = tmp_path / "state" / "cache" / "merged"
    assert not (merged_dir.is_dir() and list(merged_dir.iterdir())), list(merged_dir.iterdir())
    if policy_file.name == README_COMMANDS_ON:
        run_readme_commands(policy, tmp_path, env)


def _refused_self_judge(con, rounds: list[dict]) -> None:
    """The tiny student as its own judge on open-ended tasks: no verifier and a judge that cannot
    pass its anchor check (or whose prompt does not even fit its context), so no answer is scored,
    no pair or SFT row is made, nothing is trained, and every round only collects, saying why."""
    *collected, last = rounds
    assert collected and all(r["decision"] == "collect" and "0 new pairs+examples" in r["reasons"] for r in collected), rounds
    assert last["decision"] == "collect" or "no training task left to sample" in last["reasons"], last
    assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 0
    assert sum(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("pairs", "sft_examples", "training_runs")) == 0
    health = [dict(r) for r in con.execute("SELECT healthy FROM judge_health WHERE judge = 'self'")]
    unavailable = con.execute("SELECT count(*) FROM events WHERE kind = 'judge_unavailable'").fetchone()[0]
    assert (health and not any(h["healthy"] for h in health)) or unavailable > 0, (health, unavailable)
    counts = [json.loads(r[0]) for r in con.execute("SELECT counts FROM phases WHERE phase = 'score'")]
    assert counts and all(c["unscored_tasks"] > 0 for c in counts), counts
    con.close()


def _code_scored(con, rounds: list[dict], status: dict) -> None:
    """The tiny student on programming tasks: every answer ran in the sandbox, isolated (never with
    rlimits alone), against its task's own tests; none passes, so no SFT row or pair is made and
    the round after the test hook's skip and fail skips training for want of data, saying so."""
    assert [r["decision"] for r in rounds[:3]] == ["skip", "fail", "skip"], rounds
    assert "0 SFT examples" in rounds[2]["reasons"] and "0 pairs" in rounds[2]["reasons"], rounds[2]
    assert not [r for r in rounds if r["status"] == "running"], rounds
    scores = [(r[0], json.loads(r[1])) for r in con.execute("SELECT scorer, details FROM scores")]
    n_gen = con.execute("SELECT count(*) FROM generations").fetchone()[0]
    assert scores and len(scores) == n_gen, (len(scores), n_gen)
    assert {s for s, _ in scores} == {"verifier:code"}, {s for s, _ in scores}
    assert {d["isolation"] for _, d in scores} <= {"namespaces", "userns"}, {d["isolation"] for _, d in scores}
    assert all(d["total"] >= 2 and d["passed"] == 0 for _, d in scores)
    assert sum(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("pairs", "sft_examples")) == 0
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    # no candidate, so nothing was evaluated; the daemon stopped by its policy, not on an error
    assert status["base_metrics"] is None and status["stopped_reason"], status


def readme_commands() -> list[str]:
    """The lines of the README's command table, as written there."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Commands", 1)[1].split("```", 2)[1]
    return [line.split("  ")[0].strip() for line in block.splitlines() if line.startswith("selfdistill ")]


def expand(cmd: str) -> list[list[str]]:
    """A README line -> the argument lists to run: its plain form, and once with each [option]."""
    import re

    opts = re.findall(r"\[([^\]]+)\]", cmd)
    base = re.sub(r"\s*\[[^\]]+\]", "", cmd).split()[1:]
    return [base] + [base + o.split() for o in opts]


def run_readme_commands(policy: Path, tmp: Path, env: dict) -> None:
    values = {"POLICY": str(policy), "POLICY...": str(policy), "ID": "ckpt-000001", "R": "the README says so",
              "NAME": "rounds", "N": "1"}
    ran = []
    # the table is a reference, not a script: roll back last, so export has an adapter to export
    for line in sorted(readme_commands(), key=lambda c: c.split()[1] == "rollback"):
        if line.split()[1] in ("init", "run"):
            continue  # run above, as written, on this state
        for i, args in enumerate(expand(line)):
            argv = [str(tmp / f"out-{len(ran)}") if a == "OUT" else values.get(a, a) for a in args]
            if argv[:1] == ["rollback"] and "--to" in argv:
                argv[argv.index("--to") + 1] = "base"
            res = run_cli(*argv, cwd=tmp, env=env)
            assert res.returncode == 0, f"README command {line!r} as {argv}: {res.stderr[-1500:]}"
            ran.append(argv[0])
    assert {"check", "status", "rounds", "promote", "rollback", "export", "report", "queries", "data", "models"} <= set(ran)
