"""Faults injected into a running daemon: a full disk, a misbehaving teacher, the training child
killed like the OOM killer does, the daemon killed while it trains, and a database held locked by
other processes. Each test runs the real daemon on the tiny model and checks that it keeps going,
stores nothing wrong, and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from daemon_helpers import tiny_policy

pytestmark = pytest.mark.slow


def _db(policy: Path) -> Path:
    return policy.parent / "state" / "selfdistill.db"


def _q(policy: Path, sql: str, params=()) -> list[tuple]:
    con = sqlite3.connect(f"file:{_db(policy)}?mode=ro", uri=True, timeout=60)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _training_children(under: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "selfdistill.training"], capture_output=True, text=True).stdout.split()
    pids = []
    for p in out:
        try:
            if str(under) in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(p))
        except OSError:
            pass
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# -- (a) disk full ----------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 160 MiB tmpfs (root only; these machines run tests as root)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m,mode=0755", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): the disk-full test needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    """Write zeros until the filesystem refuses (ENOSPC), down to the last page."""
    for name, chunk in ((path, 1 << 20), (path.with_suffix(".2"), 4096)):
        try:
            with open(name, "wb") as f:
                while True:
                    f.write(b"\0" * chunk)
                    f.flush()
        except OSError:
            pass  # full (the close may be what says so)


def test_disk_full_pauses_with_a_clear_line_corrupts_nothing_and_resumes(small_fs, tiny_model_dir, daemon_factory):
    policy = tiny_policy(small_fs, tiny_model_dir, engine="transformers", stopping="")
    d = daemon_factory(policy, "--max-rounds", "1", env={"SELFDISTILL_TEST_DELAY": "generate:4"})
    d.wait_for(lambda r: r.get("event") == "test delay" and r.get("phase") == "generate", timeout=300)
    filler = small_fs / "filler"
    _fill(filler)
    rec = d.wait_for(lambda r: r.get("event", "").startswith("disk full"), timeout=120)
    assert rec["level"] == "error" and "pausing until space returns" in rec["event"]
    assert "disk is full" in rec["error"]
    time.sleep(2)
    assert d.proc.poll() is None, "the daemon died on a full disk instead of pausing"
    # nothing half-written: the DB is intact and the phase in flight left no trace
    assert _q(policy, "PRAGMA integrity_check")[0][0] == "ok"
    assert _q(policy, "SELECT phase, status FROM rounds WHERE id = 1")[0] == ("generate", "running")
    assert _q(policy, "SELECT count(*) FROM generations")[0][0] == 0
    filler.unlink()
    filler.with_suffix(".2").unlink(missing_ok=True)
    d.wait_for(lambda r: r.get("event") == "disk space is back: resuming", timeout=180)
    assert d.wait(600) == 0, d.stderr_path.read_text()[-3000:]
    assert _q(policy, "PRAGMA integrity_check")[0][0] == "ok"
    assert _q(policy, "SELECT count(*) FROM generations WHERE purpose = 'train' AND round_id = 1")[0][0] == 6 * 4
    r = _q(policy, "SELECT status, decision FROM rounds")
    assert len(r) == 1 and r[0][0] != "running" and r[0][1] in ("promote", "reject", "fail", "skip"), r
    assert _q(policy, "SELECT count(*) FROM phases GROUP BY round_id, phase HAVING count(*) > 1") == []


# -- (b) the teacher misbehaves ---------------------------------------------------------------


def test_teacher_faults_keep_the_loop_going_and_store_no_garbage(teacher_run):
    run = teacher_run
    policy, served = run["policy"], run["served"]
    # every kind of fault was really served, and so were good answers
    for mode in ("ok", "down", "slow", "429", "500", "malformed", "truncated", "garbage", "echo401"):
        assert served.get(mode, 0) > 0, served
    rounds = _q(policy, "SELECT id, status, decision FROM rounds WHERE status != 'running' ORDER BY id")
    assert len(rounds) >= 6, rounds
    # the loop kept going on verifier data: every finished round has verifier scores and its SFT data
    for rid, _, _ in rounds:
        n = _q(policy, "SELECT count(*) FROM scores s JOIN generations g ON g.id = s.generation_id "
                       "WHERE g.round_id = ? AND s.scorer LIKE 'verifier:%'", (rid,))[0][0]
        assert n == 6 * 4, (rid, n)
    unavailable = _q(policy, "SELECT round_id, message FROM events WHERE kind = 'teacher_unavailable'")
    assert len(unavailable) >= 2, unavailable
    # nothing wrong stored as a score: every teacher score is either unparsed (NULL) or exactly the
    # mapping of a 'Score: N' line the teacher really sent
    rows = _q(policy, "SELECT scorer, score, parsed, details FROM scores WHERE scorer LIKE 'teacher:%'")
    # no round drops the teacher silently: each finished round either stored teacher scores or
    # recorded why the teacher was skipped (which requests meet which fault depends on thread
    # timing, so whether an 'ok' stretch covers a whole judge batch varies from run to run)
    skipped = {r[0] for r in unavailable}
    for rid, _, _ in rounds:
        scored = _q(policy, "SELECT count(*) FROM scores s JOIN generations g ON g.id = s.generation_id "
                            "WHERE g.round_id = ? AND s.scorer LIKE 'teacher:%'", (rid,))[0][0]
        health = _q(policy, "SELECT count(*) FROM judge_health WHERE round_id = ?", (rid,))[0][0]
        assert scored or rid in skipped or health, f"round {rid}: teacher neither scored nor reported skipped"
    for scorer, score, parsed, details in rows:
        det = json.loads(details)
        if score is None:
            assert not parsed
            continue
        assert parsed and det["raw"].strip() in ("Score: 9", "Score: 2"), (scorer, score, det)
        assert abs(score - (det["score_1_10"] - 1) / 9) < 1e-9 and 0.0 <= score <= 1.0
    # teacher labels are only the sane answer, never a fragment of a broken response
    labels = [r[0] for r in _q(policy, "SELECT completion FROM sft_examples WHERE source LIKE 'teacher%'")]
    assert all(t == "The answer is 7" for t in labels), labels
    assert _q(policy, "PRAGMA integrity_check")[0][0] == "ok"


# -- (c) the training child is OOM-killed --------------------------------------------------------


def _wait_for_training_children(tmp_path, timeout: float = 60) -> list[int]:
    deadline = time.time() + timeout
    kids: list[int] = []
    while not kids and time.time() < deadline:
        kids = _training_children(tmp_path)
        time.sleep(0.1)
    assert kids, "the training child never showed up"
    return kids


def test_training_child_sigkill_is_recorded_and_retried(tmp_path, tiny_model_dir, daemon_factory):
    policy = tiny_policy(tmp_path, tiny_model_dir, engine="transformers", stopping="")
    policy.write_text(policy.read_text().replace("time_limit_s = 300", "time_limit_s = 300\nmax_retries = 1"))
    d = daemon_factory(policy, "--max-rounds", "1")
    d.wait_for(lambda r: r.get("phase") == "train" and r.get("attempt") == 1, timeout=300)
    kids = _wait_for_training_children(tmp_path)
    time.sleep(1.0)  # let it get into its imports / training step
    for k in kids:
        os.kill(k, signal.SIGKILL)  # what the OOM killer does
    assert d.wait(900) == 0, d.stderr_path.read_text()[-3000:]
    runs = _q(policy, "SELECT attempt, status, error FROM training_runs WHERE round_id = 1 ORDER BY attempt")
    assert [r[:2] for r in runs] == [(1, "failed"), (2, "succeeded")], runs
    assert "signal 9" in runs[0][2], runs
    ev = _q(policy, "SELECT message FROM events WHERE kind = 'training_failed'")
    assert len(ev) == 1 and "signal 9" in ev[0][0], ev
    assert _q(policy, "SELECT decision FROM rounds WHERE id = 1")[0][0] in ("promote", "reject")


def test_daemon_sigkill_during_training_leaves_no_training_child(tmp_path, tiny_model_dir, daemon_factory):
    policy = tiny_policy(tmp_path, tiny_model_dir, engine="transformers", stopping="")
    d = daemon_factory(policy, "--max-rounds", "1")
    d.wait_for(lambda r: r.get("phase") == "train" and r.get("attempt") == 1, timeout=300)
    kids = _wait_for_training_children(tmp_path)
    d.kill()
    # the restarted daemon must not train while the old child still trains into the same checkpoint id
    d2 = daemon_factory(policy, "--max-rounds", "1")
    try:
        d2.wait_for(lambda r: r.get("phase") == "train" and r.get("attempt") == 2, timeout=300)
        alive = [k for k in kids if _alive(k)]
    finally:
        for k in kids:
            if _alive(k):
                os.killpg(k, signal.SIGKILL)
    assert alive == [], f"training child {alive} of the killed daemon still running beside the new attempt"


# -- (d) the database is held by other processes ----------------------------------------------

HOLDER = textwrap.dedent("""
    import sqlite3, sys, time
    db, how, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
    con = sqlite3.connect(db, isolation_level=None, timeout=60)
    if how == "exclusive":
        con.execute("BEGIN EXCLUSIVE")
    else:
        con.execute("BEGIN")
        con.execute("SELECT count(*) FROM generations").fetchone()
        con.execute("SELECT * FROM rounds").fetchall()
    print("held", flush=True)
    time.sleep(secs)
    con.execute("COMMIT")
    print("released", flush=True)
""")


def test_long_reader_and_exclusive_lock_make_writes_wait_not_fail(tmp_path, tiny_model_dir, daemon_factory):
    policy = tiny_policy(tmp_path, tiny_model_dir, engine="transformers", stopping="")
    d = daemon_factory(policy, "--max-rounds", "1", env={"SELFDISTILL_TEST_DELAY": "generate:2,score:1"})
    d.wait_for(lambda r: r.get("event") == "test delay" and r.get("phase") == "generate", timeout=300)
    db = str(_db(policy))
    reader = subprocess.Popen([sys.executable, "-c", HOLDER, db, "read", "30"], stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "held"
    # held far longer than the tiny model's generate phase takes (1-3 s), so its commit meets the lock
    excl = subprocess.Popen([sys.executable, "-c", HOLDER, db, "exclusive", "20"], stdout=subprocess.PIPE, text=True)
    assert excl.stdout.readline().strip() == "held"
    held_at = time.time()
    # the generate phase's commit must wait for the exclusive lock, then succeed
    rec = d.wait_for(lambda r: r.get("event") == "round 1 generate", timeout=300)
    assert rec["ts"] >= held_at + 19.0, "the write did not wait for the exclusive lock: the test held nothing"
    assert excl.wait(30) == 0 and reader.wait(60) == 0
    assert d.wait(900) == 0, d.stderr_path.read_text()[-3000:]
    log = d.stderr_path.read_text()
    assert "locked" not in log and "Traceback" not in log
    assert _q(policy, "SELECT count(*) FROM generations WHERE purpose = 'train'")[0][0] == 6 * 4
    assert _q(policy, "SELECT count(*) FROM scores WHERE scorer LIKE 'verifier:%'")[0][0] == 6 * 4
    assert _q(policy, "SELECT decision FROM rounds WHERE id = 1")[0][0] in ("promote", "reject", "fail", "skip")
    assert _q(policy, "PRAGMA integrity_check")[0][0] == "ok"


def test_restart_after_kill_between_adapter_rename_and_record_resumes(tmp_path, tiny_model_dir, daemon_factory):
    policy = tiny_policy(tmp_path, tiny_model_dir, engine="transformers", stopping="")
    d = daemon_factory(policy, "--max-rounds", "1", env={"SELFDISTILL_TEST_DELAY": "train:60"})
    d.wait_for(lambda r: r.get("event") == "test delay" and r.get("phase") == "train", timeout=300)
    d.kill()
    # what a kill leaves when it lands after the child renamed the adapter into place but before
    # the daemon recorded the checkpoint (the torture hit this): a complete, unrecorded directory
    stale = policy.parent / "state" / "checkpoints" / "ckpt-000001"
    stale.mkdir(parents=True)
    (stale / "adapter_config.json").write_text("{}")
    (stale / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    assert _q(policy, "SELECT count(*) FROM checkpoints WHERE id = 'ckpt-000001'")[0][0] == 0
    d2 = daemon_factory(policy, "--max-rounds", "1")
    assert d2.wait(900) == 0, d2.stderr_path.read_text()[-2000:]
    assert _q(policy, "SELECT decision FROM rounds WHERE id = 1")[0][0] in ("promote", "reject")


def test_restart_removes_a_killed_trainers_scratch_directory(tmp_path, tiny_model_dir, daemon_factory):
    policy = tiny_policy(tmp_path, tiny_model_dir, engine="transformers", stopping="")
    ck = policy.parent / "state" / "checkpoints"
    d = daemon_factory(policy, "--max-rounds", "1")
    d.wait_for(lambda r: r.get("phase") == "train" and r.get("attempt") == 1, timeout=300)
    deadline = time.time() + 120
    while not list(ck.glob(".*scratch*")) and time.time() < deadline:
        time.sleep(0.2)
    assert list(ck.glob(".*scratch*")), "the trainer never made its scratch directory"
    kids = _training_children(tmp_path)
    d.kill()
    for k in kids:  # what a reboot or the OOM killer does to the orphan
        os.killpg(k, signal.SIGKILL)
    d2 = daemon_factory(policy, "--max-rounds", "1")
    assert d2.wait(900) == 0, d2.stderr_path.read_text()[-2000:]
    assert [p.name for p in ck.iterdir() if p.name.startswith(".")] == []
