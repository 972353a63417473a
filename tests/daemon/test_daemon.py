"""The daemon as a real process on the tiny model: rounds in burst mode, warm and cold stops,
kill -9 and restart, stopping policies, SIGHUP, the single-instance lock, the metrics endpoint."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest
from sd_testutil import scrape_metrics

from selfdistill.checkpoints import read_current

from daemon_helpers import tiny_policy

pytestmark = pytest.mark.slow


def _db(policy):
    return sqlite3.connect(policy.parent / "state" / "selfdistill.db")


def _rounds(policy):
    con = _db(policy)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM rounds ORDER BY id")]
    con.close()
    return rows


def _count(policy, sql):
    con = _db(policy)
    n = con.execute(sql).fetchone()[0]
    con.close()
    return n


def _consistent(policy):
    con = _db(policy)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    cur = con.execute("SELECT id FROM checkpoints WHERE is_current = 1").fetchall()
    con.close()
    assert len(cur) == 1
    pointer = read_current(policy.parent / "state")
    assert pointer == cur[0][0] or (pointer is None and cur[0][0] == "base")
    leftovers = [p.name for p in (policy.parent / "state" / "checkpoints").iterdir() if ".tmp" in p.name]
    assert leftovers == []
    return cur[0][0]


def test_sigterm_mid_generation_is_a_warm_stop_then_the_round_continues(tmp_path, tiny_model_dir, daemon_factory):
    policy = tiny_policy(tmp_path, tiny_model_dir, engine="transformers", stopping="")
    d = daemon_factory(policy, "--max-rounds", "1", env={"SELFDISTILL_TEST_DELAY": "generate:30"})
    d.wait_for(lambda r: r.get("event") == "test delay" and r.get("phase") == "generate")
    d.signal(signal.SIGTERM)
    assert d.wait(120) == 0
    r = _rounds(policy)[0]
    assert r["status"] == "running" and r["phase"] == "score"  # the step in flight finished and committed
    n_gen = _count(policy, "SELECT count(*) FROM generations")
    assert n_gen == 6 * 4
    d2 = daemon_factory(policy, "--max-rounds", "1")
    assert d2.wait(600) == 0, d2.stderr_path.read_text()[-3000:]
    r = _rounds(policy)
    assert len(r) == 1 and r[0]["decision"] is not None
    assert _count(policy, "SELECT count(*) FROM generations WHERE purpose = 'train'") == n_gen  # nothing done twice
    _consistent(policy)


def test_sigterm_mid_training_warm_then_twice_is_cold(tmp_path, tiny_model_dir, daemon_factory):
    policy = tiny_policy(tmp_path, tiny_model_dir, engine="transformers", stopping="")
    d = daemon_factory(policy, "--max-rounds", "1", env={"SELFDISTILL_TEST_DELAY": "train:2"})
    d.wait_for(lambda r: r.get("phase") == "train" and "attempt" in r)
    d.signal(signal.SIGTERM)  # warm: the training round finishes
    assert d.wait(300) == 0
    r = _rounds(policy)[0]
    assert r["phase"] in ("evaluate", "done"), r
    assert _count(policy, "SELECT count(*) FROM training_runs WHERE status = 'succeeded'") == 1

    (tmp_path / "cold").mkdir()
    policy2 = tiny_policy(tmp_path / "cold", tiny_model_dir, engine="transformers", stopping="")
    d = daemon_factory(policy2, "--max-rounds", "1")
    d.wait_for(lambda r: r.get("phase") == "train" and "attempt" in r)
    time.sleep(1.0)
    d.signal(signal.SIGTERM)
    time.sleep(0.3)
    d.signal(signal.SIGTERM)  # cold: the child's process group is killed
    assert d.wait(60) == 128 + signal.SIGTERM
    time.sleep(0.5)
    pids = [int(x) for x in os.popen("pgrep -f 'selfdistill.training'").read().split()]
    assert not [p for p in pids if str(policy2.parent) in open(f"/proc/{p}/cmdline").read().replace("\0", " ")], "training child survived"
    # restart: the interrupted training run is recorded and the round completes
    d2 = daemon_factory(policy2, "--max-rounds", "1")
    assert d2.wait(600) == 0, d2.stderr_path.read_text()[-3000:]
    assert _rounds(policy2)[0]["decision"] is not None
    # the killed attempt is recorded as failed exactly once: by the dying daemon's training thread
    # ("... (cold stop)") when it wins the race with os._exit, otherwise by the restart ("interrupted: ...")
    runs = _count(policy2, "SELECT count(*) FROM training_runs WHERE status = 'failed' AND "
                           "(error LIKE 'interrupted%' OR error LIKE '%(cold stop)')")
    assert runs == 1
    assert _count(policy2, "SELECT count(*) FROM training_runs WHERE status = 'running'") == 0
    assert _count(policy2, "SELECT count(*) FROM training_runs WHERE status = 'succeeded'") == 1
    _consistent(policy2)


@pytest.mark.parametrize("kill_at", ["generate", "train", "evaluate"])
def test_kill9_then_restart_loses_nothing(tmp_path, tiny_model_dir, daemon_factory, kill_at):
    policy = tiny_policy(tmp_path, tiny_model_dir, engine="transformers", stopping="")
    d = daemon_factory(policy, "--max-rounds", "1", env={"SELFDISTILL_TEST_DELAY": f"{kill_at}:30"})
    d.wait_for(lambda r: r.get("event") == "test delay" and r.get("phase") == kill_at)
    before = {t: _count(policy, f"SELECT count(*) FROM {t}") for t in ("tasks", "generations", "scores", "pairs", "sft_examples", "phases")}
    d.kill()
    after = {t: _count(policy, f"SELECT count(*) FROM {t}") for t in before}
    assert after == before  # nothing committed was lost by the kill
    d2 = daemon_factory(policy, "--max-rounds", "1")
    assert d2.wait(600) == 0, d2.stderr_path.read_text()[-3000:]
    final = {t: _count(policy, f"SELECT count(*) FROM {t}") for t in before}
    assert all(final[t] >= before[t] for t in before)
    r = _rounds(policy)
    assert len(r) == 1 and r[0]["decision"] is not None and r[0]["status"] != "running"
    assert _count(policy, "SELECT count(*) FROM generations WHERE purpose = 'train'") == 6 * 4
    _consistent(policy)


def test_lock_refuses_a_second_daemon(tmp_path, tiny_model_dir, daemon_factory):
    policy = tiny_policy(tmp_path, tiny_model_dir, engine="transformers", stopping="",
                         extra="[monitoring]\nprometheus_port = 0")
    d = daemon_factory(policy, env={"SELFDISTILL_TEST_DELAY": "generate:60"})
    d.wait_for(lambda r: r.get("event") == "test delay")
    # the running daemon serves Prometheus metrics from its store, on a free port it logs
    url = d.wait_for(lambda r: r.get("event") == "prometheus metrics")["url"]
    metrics = scrape_metrics(url)
    assert metrics[("selfdistill_round_phase", (("phase", "generate"),))] == 1
    assert metrics[("selfdistill_round_phase", (("phase", "train"),))] == 0
    assert metrics[("selfdistill_info", (("current_checkpoint", "base"), ("name", "tiny")))] == 1
    assert metrics[("selfdistill_round", ())] == 1
    d2 = daemon_factory(policy)
    assert d2.wait(60) != 0
    err = d2.stderr_path.read_text()
    assert f"PID {d.proc.pid}" in err and "Traceback" not in err
    # SIGHUP with an invalid policy: refused, the old one keeps running
    good = policy.read_text()
    policy.write_text(good + "\n[bogus]\n")
    d.signal(signal.SIGHUP)
    d.wait_for(lambda r: r.get("event", "").startswith("reload refused"))
    # and with a valid one: applied
    policy.write_text(good.replace("max_tokens = 12\n[pairs]", "max_tokens = 10\n[pairs]"))
    d.signal(signal.SIGHUP)
    rec = d.wait_for(lambda r: r.get("event") == "policy reloaded")
    assert "generation" in rec["applied"]
    policy.write_text(good.replace('name = "tiny"', 'name = "tiny"').replace("r = 8,", "r = 4,"))
    d.signal(signal.SIGHUP)
    d.wait_for(lambda r: r.get("event", "").startswith("reload: some changes need a restart"))
    assert d.proc.poll() is None
    d.signal(signal.SIGTERM)
    assert d.wait(120) == 0


@pytest.mark.parametrize("stopping,gates,expected", [
    ("max_rounds = 1", 'test = "none"\nmin_gain = -1.0', "max rounds"),
    ("plateau_rounds = 1", 'test = "none"\nmin_gain = 0.99', "plateau"),
    ("max_generated_tokens = 10", 'test = "none"\nmin_gain = -1.0', "token budget"),
    ("max_wall_s = 1", 'test = "none"\nmin_gain = -1.0', "wall clock"),
])
def test_stopping_policies_end_the_run_with_their_reason(tmp_path, tiny_model_dir, daemon_factory, stopping, gates, expected):
    policy = tiny_policy(tmp_path, tiny_model_dir, engine="transformers", stopping=stopping, gates=gates)
    d = daemon_factory(policy)
    code = d.wait(600)
    out = d.stderr_path.read_text()
    stop = [json.loads(l) for l in out.splitlines() if l.startswith("{") and json.loads(l).get("event") == "stopped"]
    assert code == 10, out[-2000:]
    assert stop and stop[0]["reason"].startswith(expected), stop


def test_stop_file_and_tasks_exhausted(tmp_path, tiny_model_dir, daemon_factory):
    policy = tiny_policy(tmp_path, tiny_model_dir, engine="transformers", stopping="")
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "STOP").write_text("")
    d = daemon_factory(policy)
    assert d.wait(120) == 10
    assert "stop file" in d.stderr_path.read_text()
    (tmp_path / "state" / "STOP").unlink()
    # 60 tasks, 30% held out, per_round 40 and max_uses 1: the second round finds nothing to sample
    p2 = tiny_policy(tmp_path, tiny_model_dir, engine="transformers", stopping="", name="p2.toml")
    p2.write_text(p2.read_text().replace("per_round = 6", "per_round = 40\ncurriculum = { max_uses = 1 }"))
    d = daemon_factory(p2)
    assert d.wait(900) == 10
    assert "tasks exhausted" in d.stderr_path.read_text()


def test_progress_counts_regressions_plateaus_and_only_finished_rounds(tmp_path):
    """What the stopping policies see, computed from stored rounds (no engine needed)."""
    from selfdistill.config import parse_policy
    from selfdistill.cycle import Cycle, RunState
    from selfdistill.store import Store

    policy = parse_policy({"state_dir": str(tmp_path), "tasks": {"sources": [{"type": "jsonl", "path": "x"}]},
                           "stopping": {"max_regressions": 2, "plateau_rounds": 3}})
    store = Store.create(tmp_path / "selfdistill.db")
    store.ensure_base_checkpoint()
    run = RunState(started=0.0)
    cyc = Cycle(policy, store, run)
    for gain, decision in ((-0.1, "reject"), (0.2, "promote"), (-0.05, "reject")):
        rid = store.create_round("base")
        store.update_round(rid, decision=decision, status="done", finished_at=10.0, metrics={"gain": gain})
    live = store.create_round("base")
    store.update_round(live, decision="reject", metrics={"gain": -1.0})  # decided but still running
    p = cyc.progress_snapshot()
    assert (p.regressions, p.decided_rounds, p.decisions) == (2, 3, ["reject", "promote", "reject"])
    reason, by_policy = cyc.stop_reason()
    assert reason.startswith("regressions: 2") and by_policy
    store.close()
