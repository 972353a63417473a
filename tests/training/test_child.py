"""The child process for real: started, watched, killed, timed out, stopped, run under torchrun.

Each test starts `python -m selfdistill.training` (about 5-10 s of imports on a shared 2-core
machine), so the cases here are the ones that need a real process.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest

from selfdistill.training.child import run_training_child


def wait_for_training(log_path, pid, timeout=120):
    """Block until the child has logged a training step (it is mid-round)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists() and "'loss'" in log_path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    raise AssertionError(f"child never started training: {log_path.read_text(errors='replace')[-2000:]}")


def nothing_visible(spec):
    return not spec.output_dir.exists() and not any(spec.output_dir.parent.iterdir())


def long_spec(make_spec, name):
    # enough steps that the round is still training when the test interrupts it
    return make_spec(name, algorithm="sft", n_sft=64, epochs=100, batch_size=1)


def test_child_trains_and_reports(make_spec):
    spec = make_spec("child")
    pids = []
    result = run_training_child(spec, time_limit_s=300, on_start=pids.append)
    assert result.status == "succeeded", result.reason
    assert result.returncode == 0 and result.pid == pids[0]
    assert (spec.output_dir / "adapter_model.safetensors").is_file()
    assert spec.result_path.is_file() and spec.result_path.with_suffix(".log").is_file()
    m = result.metrics
    assert m["sft_steps"] == 2 and m["dpo_steps"] == 2 and m["wall_s"] >= m["duration_s"] > m["train_s"] > 0
    assert sorted(p.name for p in spec.output_dir.parent.iterdir()) == ["child"]


def test_sigkill_mid_round_leaves_nothing_visible(make_spec):
    spec = long_spec(make_spec, "killed")
    log = spec.result_path.with_suffix(".log")

    def killer(pid):
        threading.Thread(target=lambda: (wait_for_training(log, pid), os.killpg(pid, signal.SIGKILL)), daemon=True).start()

    result = run_training_child(spec, time_limit_s=120, on_start=killer)
    assert result.status == "failed"
    assert result.reason == "killed by signal 9 (out of memory?)"
    assert result.returncode == -signal.SIGKILL
    assert nothing_visible(spec)


def test_cold_stop_kills_the_group(make_spec):
    spec = long_spec(make_spec, "stopped")
    stop = threading.Event()
    log = spec.result_path.with_suffix(".log")

    def stopper(pid):
        threading.Thread(target=lambda: (wait_for_training(log, pid), stop.set()), daemon=True).start()

    result = run_training_child(spec, time_limit_s=120, stop_event=stop, on_start=stopper)
    assert result.status == "failed" and result.reason.startswith("stopped before the round finished")
    with pytest.raises(ProcessLookupError):
        os.killpg(result.pid, 0)
    assert nothing_visible(spec)


def test_time_limit_kills_the_group(make_spec):
    spec = long_spec(make_spec, "slow")
    started = time.monotonic()
    result = run_training_child(spec, time_limit_s=3)
    assert result.status == "failed" and result.reason == "time limit of 3 s exceeded"
    assert time.monotonic() - started < 3 + 5 + 5  # limit + SIGTERM grace + slack
    with pytest.raises(ProcessLookupError):
        os.killpg(result.pid, 0)
    assert nothing_visible(spec)


def test_full_disk_while_saving_leaves_no_half_adapter(make_spec):
    """A file-size limit below the adapter's size makes the save fail the way a full disk does."""
    spec = make_spec("full", algorithm="sft")
    spec_path = spec.write(spec.result_path.with_name("full.spec.json"))

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    proc = subprocess.run([sys.executable, "-m", "selfdistill.training", str(spec_path)], preexec_fn=limit,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 6, proc.stderr[-2000:]
    assert "cannot save the adapter to" in proc.stderr
    assert nothing_visible(spec)


@pytest.mark.slow
def test_torchrun_two_processes(make_spec, adapter_tensors):
    spec = make_spec("ddp", n_sft=8, n_pairs=8)
    result = run_training_child(spec, launcher="torchrun", num_processes=2, time_limit_s=400)
    assert result.status == "succeeded", result.reason
    assert result.metrics["world_size"] == 2
    # 8 rows, batch 4 per process, 2 processes: one optimizer step per stage
    assert result.metrics["sft_steps"] == 1 and result.metrics["dpo_steps"] == 1
    weights = adapter_tensors(spec.output_dir)
    assert all(t.abs().max() > 0 for k, t in weights.items() if "lora_B" in k)
    # saved from the state dict gathered on every rank (the path ZeRO-3/FSDP need): the trained
    # adapter alone, every LoRA module's A and B, none of DPO's frozen reference copy
    assert weights and all(("lora_A" in k or "lora_B" in k) and ".ref." not in k for k in weights)
    assert {k.replace("lora_A", "lora_B") for k in weights if "lora_A" in k} == {k for k in weights if "lora_B" in k}
    assert sorted(p.name for p in spec.output_dir.parent.iterdir()) == ["ddp"]
