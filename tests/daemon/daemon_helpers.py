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

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "policies" / "examples" / "tasks.jsonl"


def tiny_policy(tmp: Path, model_dir: Path, *, engine: str = "vllm", extra: str = "", stopping: str = "max_rounds = 2",
                gates: str = 'test = "none"\nmin_gain = -1.0', name: str = "p.toml") -> Path:
    """A policy on the tiny model whose random answers often contain a digit (the verifier)."""
    p = tmp / name
    p.write_text(f"""
name = "tiny"
state_dir = "state"
[student]
base_model = "{model_dir}"
lora = {{ r = 8, alpha = 16 }}
[engine]
kind = "{engine}"
dtype = "float32"
max_model_len = 256
cpu_kv_cache_gib = 0.25
release_for_training = "keep"
batch_size = 64
[tasks]
heldout_fraction = 0.3
per_round = 6
default_verifier = "regex:.*[0-9].*"
[[tasks.sources]]
type = "jsonl"
path = "{TASKS}"
[generation]
samples_per_task = 4
max_tokens = 12
[pairs]
strategy = "verified_chosen"
[training]
algorithm = "sft_then_dpo"
epochs = 1
dpo_epochs = 1
batch_size = 4
max_length = 96
min_sft_examples = 1
min_pairs = 1
threads = 1
min_loss_change = 0.0
min_dpo_margin = -1000.0
time_limit_s = 300
[evaluation]
heldout_items = 8
max_tokens = 12
anchor_prompts = ["hello", "a b c"]
anchor_max_tokens = 8
[gates]
{gates}
max_anchor_nll_increase = 1000.0
max_empty_fraction = 1.0
max_repetition = 1.0
max_length_ratio = 1000.0
[schedule]
idle_sleep_s = 0.1
[stopping]
{stopping}
{extra}
""")
    return p


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
