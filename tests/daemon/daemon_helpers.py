"""Running the real daemon as a child process on the tiny model: a policy writer and a process wrapper."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sd_testutil import merged, tiny_policy_data, write_policy


def tiny_policy(tmp: Path, model_dir: Path, *, engine: str = "vllm", extra: str = "", stopping: str = "max_rounds = 2",
                gates: str = 'test = "none"\nmin_gain = -1.0', name: str = "p.toml") -> Path:
    """A policy file on the tiny model (sd_testutil.tiny_policy_data), with TOML snippets merged in."""
    import tomllib

    data = merged(tiny_policy_data(model_dir, engine), {"gates": tomllib.loads(gates), "stopping": tomllib.loads(stopping)},
                  tomllib.loads(extra))
    return write_policy(tmp / name, data)


class DaemonProc:
    """`selfdistill run POLICY` as a real child process, with its JSON log lines collected."""

    def __init__(self, policy: Path, *args: str, env: dict | None = None):
        e = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                 OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        e.update(env or {})
        self.policy = policy
        self.stderr_path = policy.parent / f"daemon-{time.time_ns()}.log"
        self._err = open(self.stderr_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "selfdistill", "run", str(policy), *args],
                                     cwd=policy.parent, env=e, stdout=subprocess.PIPE, stderr=self._err, text=True)

    def logs(self) -> list[dict]:
        out = []
        for line in self.stderr_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def wait_for(self, pred, timeout: float = 300) -> dict:
        t = time.time()
        while time.time() - t < timeout:
            for rec in self.logs():
                if pred(rec):
                    return rec
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before the awaited log line:\n{self.stderr_path.read_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for a log line:\n{self.stderr_path.read_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._err.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._err.close()


@pytest.fixture
def daemon_factory():
    """Start `selfdistill run` processes; any still running at the end of the test is killed."""
    procs: list[DaemonProc] = []

    def make(policy: Path, *args: str, env: dict | None = None) -> DaemonProc:
        d = DaemonProc(policy, *args, env=env)
        procs.append(d)
        return d

    yield make
    for d in procs:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(30)
