"""systemd/selfdistill.service, run by a real systemd (PID 1 of a throwaway container, see
systemd_container.py), installed as the README says: the shipped unit file unchanged, a system
user, /etc/selfdistill/{policy.toml,env}, the package under /opt/selfdistill.

One boot, in order: the daemon runs the vLLM engine and trains under the unit's sandbox and
system-call filter for a round, READY and STATUS reach systemd, a reload (SIGHUP) is applied,
journald holds its JSON lines, the state belongs to the service user, and a stop by policy
(exit 10) is not restarted; a warm stop (SIGTERM) mid-phase ends cleanly with no round left
running; a wedged cycle makes the watchdog restart it; a missing or invalid policy file is one
journal line and no restart loop, and so are code tasks, whose answers the sandbox cannot isolate
under a service user without the shipped sandbox drop-in; with it, they are scored in the
unprivileged (user-namespace) sandbox. Skipped, with the reason, where no container can be made.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sd_testutil import ROOT, tiny_policy_data

pytestmark = pytest.mark.slow

UNIT = "selfdistill.service"
PY = "/opt/selfdistill/.venv/bin/python3"
DB = "/var/lib/selfdistill/selfdistill.db"


def _container_or_skip():
    from systemd_container import unavailable

    why = unavailable()
    if why:
        pytest.skip(f"no systemd container here: {why}")


def _sql(ct, query: str, db: str = DB) -> list:
    r = ct.sh(f"{PY} -c \"import json, sqlite3, sys; c = sqlite3.connect('file:{db}?mode=ro', uri=True); "
              f"print(json.dumps(c.execute(sys.stdin.read()).fetchall()))\"", input=query)
    return json.loads(r.stdout)


def _journal(ct, this_run: bool = False) -> list[str]:
    """The unit's journal lines (message only): all of them, or only the last invocation's."""
    if this_run:
        inv = ct.show(UNIT, "InvocationID")["InvocationID"]
        return ct.sh(f"journalctl _SYSTEMD_INVOCATION_ID={inv} -o cat --no-pager").stdout.splitlines()
    return ct.sh(f"journalctl -u {UNIT} -o cat --no-pager").stdout.splitlines()


def _start(ct) -> None:
    r = ct.sh(f"systemctl start {UNIT}", check=False, timeout=300)
    if r.returncode != 0:
        status = ct.sh(f"systemctl status --no-pager -l {UNIT}; journalctl --no-pager -n 40", check=False).stdout
        raise AssertionError(f"systemctl start failed: {r.stderr.strip()}\n{status[-4000:]}")


def _ended(ct, *props: str) -> dict | None:
    """The unit's properties once it is no longer running (inactive or failed) or was restarted, else None."""
    st = ct.show(UNIT, "ActiveState", "NRestarts", *props)
    return st if st["ActiveState"] in ("inactive", "failed") or st["NRestarts"] != "0" else None


def _policy(model: str, **stopping) -> dict:
    data = tiny_policy_data(Path(model), engine="vllm")
    data["state_dir"] = "/var/lib/selfdistill"
    data["engine"]["release_for_training"] = "restart"  # cpu-demo's: the engine stops and starts around training
    data["engine"]["enforce_eager"] = True
    data["tasks"]["sources"] = [{"type": "jsonl", "path": "/opt/selfdistill/src/policies/examples/tasks.jsonl"}]
    data["stopping"] = stopping
    data["logging"] = {"format": "json"}
    return data


def test_the_unit_runs_under_a_real_systemd(tmp_path, tiny_model_dir):
    _container_or_skip()
    import shutil

    from systemd_container import Container

    stage = tmp_path / "stage"
    shutil.copytree(tiny_model_dir, stage / "model")
    for f in [stage, stage / "model", *(stage / "model").iterdir()]:  # an admin's install: readable by the service
        f.chmod(0o755 if f.is_dir() else 0o644)
    with Container(stage, ROOT) as ct:
        try:
            _scenario(ct)
        except AssertionError as e:  # what the service said is what explains a failure here
            tail = ct.sh(f"journalctl --no-pager -n 60 -u {UNIT}", check=False).stdout
            raise AssertionError(f"{e}\n--- the unit's journal, last 60 lines ---\n{tail}") from None


def _scenario(ct) -> None:
    import tomli_w

    # the README's install, inside the container
    ct.sh("useradd --system --home /var/lib/selfdistill --shell /usr/sbin/nologin selfdistill")
    ct.sh(f"cp /opt/selfdistill/src/systemd/{UNIT} /etc/systemd/system/ && mkdir -p /etc/selfdistill")
    ct.write("/etc/selfdistill/env", "VLLM_CPU_KVCACHE_SPACE=1\nVLLM_ENABLE_V1_MULTIPROCESSING=0\nOMP_NUM_THREADS=1\n", 0o600)
    ct.write("/etc/selfdistill/policy.toml", tomli_w.dumps(_policy("/opt/selfdistill/stage/model", max_rounds=1)))
    ct.sh("systemctl daemon-reload")
    # `enable` (the README's) hangs it on multi-user.target, which this container does not boot: hang
    # it on the container's target instead, so that systemd keeps the unit (and its exit status)
    # loaded once it stops rather than collecting it
    ct.sh(f"systemctl add-wants selfdistill-test.target {UNIT}")

    # 1. start: Type=notify, so `systemctl start` returns once the daemon said READY=1
    _start(ct)
    st = ct.show(UNIT, "ActiveState", "MainPID", "StatusText")
    assert st["ActiveState"] == "active" and int(st["MainPID"]) > 0, st
    status = ct.wait_for("a STATUS= line naming a round", lambda: ct.show(UNIT, "StatusText")["StatusText"].startswith("round "),
                         timeout=120, every=0.5)
    assert status
    ct.sh(f"systemctl reload {UNIT}")
    # a round (the engine released for training and back, the candidate evaluated), then the policy's
    # stop: exit 10, which the unit counts as success and does not restart
    final = ct.wait_for("the stop by policy", lambda: _ended(ct, "ExecMainStatus", "Result", "NRestarts"), timeout=600, every=2)
    journal = _journal(ct)
    assert final == {"ActiveState": "inactive", "ExecMainStatus": "10", "Result": "success", "NRestarts": "0"}, (final, journal[-30:])
    rounds = _sql(ct, "SELECT id, decision, status FROM rounds ORDER BY id")
    assert [r[0] for r in rounds] == [1] and rounds[0][1] in ("promote", "reject"), (rounds, journal[-30:])
    events = [json.loads(line) for line in journal if line.startswith("{")]
    assert len(events) >= 10 and all("event" in e and "ts" in e for e in events), journal[-20:]
    assert "policy reloaded" in [e["event"] for e in events], [e["event"] for e in events]
    assert not [line for line in journal if "SIGSYS" in line or "core-dump" in line.lower()], journal
    owner = ct.sh("stat -c '%U %a' /var/lib/selfdistill /var/lib/selfdistill/selfdistill.db").stdout.split("\n")
    assert owner[0] == "selfdistill 700" and owner[1].startswith("selfdistill "), owner
    assert ct.sh("find /var/lib/selfdistill ! -user selfdistill").stdout == ""

    # 2. a warm stop mid-phase: SIGTERM cuts the (heartbeating) test delay short, the phase finishes and commits
    ct.write("/etc/selfdistill/policy.toml", tomli_w.dumps(_policy("/opt/selfdistill/stage/model", max_rounds=5)))
    ct.write(f"/etc/systemd/system/{UNIT}.d/test.conf", "[Service]\nEnvironment=SELFDISTILL_TEST_DELAY=generate:120\n")
    ct.sh("systemctl daemon-reload")
    _start(ct)
    ct.wait_for("round 2's generate phase", lambda: any('"test delay"' in line for line in _journal(ct, this_run=True)), timeout=120)
    ct.sh(f"systemctl stop {UNIT}", timeout=120)
    st = ct.show(UNIT, "ActiveState", "ExecMainStatus", "Result")
    assert st == {"ActiveState": "inactive", "ExecMainStatus": "0", "Result": "success"}, (st, _journal(ct)[-20:])
    # the phase in flight finished and was committed; the round waits, resumable, for the next start
    assert any('"event": "stopped"' in line for line in _journal(ct, this_run=True)), _journal(ct, this_run=True)[-10:]
    assert _sql(ct, "SELECT count(*) > 0 FROM generations WHERE round_id = 2") == [[1]]
    assert _sql(ct, "PRAGMA integrity_check") == [["ok"]]

    # 3. a wedged cycle (no heartbeat) withholds the ping: systemd's watchdog kills and restarts it
    ct.write(f"/etc/systemd/system/{UNIT}.d/test.conf",
             "[Service]\nEnvironment=SELFDISTILL_TEST_WEDGE=generate:20\nWatchdogSec=6\nRestartSec=1\n")
    ct.sh("systemctl daemon-reload")
    _start(ct)
    restarts = ct.wait_for("a watchdog restart", lambda: int(ct.show(UNIT, "NRestarts")["NRestarts"]), timeout=120)
    assert restarts >= 1
    journal = ct.sh("journalctl -o cat --no-pager").stdout
    assert "Watchdog timeout" in journal, journal[-3000:]
    assert "the cycle made no progress for a watchdog period" in journal, journal[-3000:]
    ct.sh(f"systemctl stop {UNIT}", timeout=120)

    # 4. bad input: no policy file, an invalid or unreadable one, code tasks it may not run, a state directory it may
    # not write, a teacher key file open to others: one line each, exit 2 (3 for the state), no restart loop
    ct.sh(f"rm /etc/systemd/system/{UNIT}.d/test.conf && systemctl daemon-reload && systemctl reset-failed {UNIT} || true")
    invalid = _policy("/opt/selfdistill/stage/model")
    invalid["tasks"]["per_round"] = "many"
    # code tasks under a service user: the sandbox could not isolate their answers, so they are refused
    ct.write("/etc/selfdistill/code.jsonl", json.dumps({"prompt": "Write add(a, b).", "verifier": "code",
                                                        "metadata": {"tests": ["assert add(1, 2) == 3"]}}) + "\n")
    code = _policy("/opt/selfdistill/stage/model")
    code["tasks"]["sources"].append({"type": "jsonl", "path": "/etc/selfdistill/code.jsonl"})
    # a state directory the unit may not write (ProtectSystem=strict: only its own is writable)
    elsewhere = _policy("/opt/selfdistill/stage/model")
    elsewhere["state_dir"] = "/var/lib/elsewhere"
    # a teacher key file other users can read
    ct.write("/etc/selfdistill/teacher.key", "sk-test\n")
    ct.sh("chown selfdistill /etc/selfdistill/teacher.key && chmod 0644 /etc/selfdistill/teacher.key")
    keyed = _policy("/opt/selfdistill/stage/model")
    keyed["teacher"] = {"kind": "openai", "endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "teacher",
                                                       "api_key_file": "/etc/selfdistill/teacher.key"}}
    keyed["scoring"] = {"teacher_label": True}
    cases = ((None, "no such policy file", 2), (tomli_w.dumps(invalid), "tasks.per_round", 2),
             ("unreadable", "cannot read the policy file (Permission denied)", 2),
             (tomli_w.dumps(code), "1 task(s) use the code verifier, and the daemon runs as uid", 2),
             (tomli_w.dumps(elsewhere), "/var/lib/elsewhere: state directory is not writable (no write access to /var/lib)", 3),
             (tomli_w.dumps(keyed), "API key file is open to other users (mode 644): run `chmod 600", 2))
    for broken, expect, status in cases:
        if broken is None:
            ct.sh("rm /etc/selfdistill/policy.toml")
        elif broken == "unreadable":  # a valid policy only root may read
            ct.write("/etc/selfdistill/policy.toml", tomli_w.dumps(_policy("/opt/selfdistill/stage/model")))
            ct.sh("chown root:root /etc/selfdistill/policy.toml && chmod 0600 /etc/selfdistill/policy.toml")
        else:
            ct.write("/etc/selfdistill/policy.toml", broken)
            ct.sh("chmod 0644 /etc/selfdistill/policy.toml")
        ct.sh(f"systemctl start {UNIT}", check=False, timeout=60)
        ct.wait_for("the refusal", lambda: _ended(ct), timeout=60)
        ct.sh("sleep 2")  # RestartSec is 30: a restart loop would not show yet, but NRestarts > 0 would
        st = ct.show(UNIT, "ActiveState", "ExecMainStatus", "NRestarts", "SubState")
        lines = _journal(ct, this_run=True)
        assert st["ExecMainStatus"] == str(status) and st["NRestarts"] == "0" and st["SubState"] != "auto-restart", (st, lines)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
        ct.sh(f"systemctl reset-failed {UNIT} || true")

    # 5. with the shipped sandbox drop-in, the same code tasks run: scored by the code verifier in
    # the unprivileged (user-namespace) sandbox, inside the unit's own sandbox
    ct.sh(f"install -D -m 0644 /opt/selfdistill/src/systemd/selfdistill-code-sandbox.conf /etc/systemd/system/{UNIT}.d/code-sandbox.conf"
          " && systemctl daemon-reload")
    ct.write("/etc/selfdistill/code.jsonl", "".join(json.dumps({"prompt": f"Write add{i}(a, b), returning a + b.", "verifier": "code",
                                                                  "metadata": {"tests": [f"assert add{i}(1, 2) == 3"]}}) + "\n"
                                                      for i in range(12)))
    code = _policy("/opt/selfdistill/stage/model", max_rounds=1)
    code["state_dir"] = "/var/lib/selfdistill/code"  # a state of its own (inside the unit's StateDirectory): only code tasks
    code["tasks"]["sources"] = [{"type": "jsonl", "path": "/etc/selfdistill/code.jsonl"}]
    ct.write("/etc/selfdistill/policy.toml", tomli_w.dumps(code))
    _start(ct)
    final = ct.wait_for("the code round", lambda: _ended(ct, "ExecMainStatus"), timeout=300, every=2)
    assert final["ExecMainStatus"] == "10" and final["NRestarts"] == "0", (final, _journal(ct, this_run=True)[-20:])
    isolations = _sql(ct, "SELECT DISTINCT json_extract(details, '$.isolation') FROM scores WHERE scorer = 'verifier:code'",
                      db="/var/lib/selfdistill/code/selfdistill.db")
    assert isolations == [["userns"]], isolations
