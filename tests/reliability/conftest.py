"""Fixtures for the reliability suite: the daemon as a real process (helpers shared with
tests/daemon), a fake teacher on loopback, and read-only access to a state directory's DB."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# daemon_helpers lives beside tests/daemon's conftest; import it by path, not as a package, so the
# two conftest modules never clash. benchmarks/ holds the torture and load drivers the CI tests run.
for p in (ROOT / "tests" / "daemon", ROOT / "benchmarks", HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from daemon_helpers import DaemonProc, daemon_factory  # noqa: E402,F401  (daemon_factory: a fixture, registered by import)

SECRET = "sk-test-SECRET-1234567890"


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory, tiny_model_dir):
    """One daemon run against a fake teacher that fails in every way it can, then is down, then
    is fine; the key is a known fake so the secrets tests can look for it everywhere.

    Rounds only collect data (no training) so that many rounds pass quickly. Returns the policy,
    the daemon's log path, what the server served and the Authorization headers it saw.
    """
    from daemon_helpers import tiny_policy
    from teacher_server import FakeTeacher, teacher_toml

    tmp = tmp_path_factory.mktemp("teacher")
    with FakeTeacher("chaos", slow_s=1.5) as srv:
        extra = teacher_toml(srv.base_url) + """
[scoring]
teacher_label = true
teacher_judge = { enabled = true, anchor_size = 8, recheck_every_rounds = 1, min_agreement = 0.5 }
"""
        policy = tiny_policy(tmp, tiny_model_dir, engine="transformers", stopping="", extra=extra)
        policy.write_text(policy.read_text().replace("idle_sleep_s = 0.1", "idle_sleep_s = 0.1\ntrain_min_new_pairs = 1000000"))
        d = DaemonProc(policy, env={"SD_TEST_TEACHER_KEY": SECRET})
        try:
            def done(n):
                # a collect-only round ends with its pair phase
                return lambda r: r.get("event") == f"round {n} pair"

            d.wait_for(done(3), timeout=600)
            srv.mode = "down"
            d.wait_for(done(6), timeout=600)
            srv.mode = "ok"
            d.wait_for(done(9), timeout=600)
            d.signal(__import__("signal").SIGTERM)
            code = d.wait(300)
        finally:
            if d.proc.poll() is None:
                d.kill()
        served, auth = dict(srv.served), list(srv.auth_seen)
    assert code == 0, d.stderr_path.read_text()[-3000:]
    return {"policy": policy, "log": d.stderr_path, "served": served, "auth": auth, "secret": SECRET}
