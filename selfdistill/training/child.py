"""The daemon's side of a training round: start the child, watch it, collect its result.

`run_training_child(spec, launcher, num_processes, time_limit_s, stop_event)` writes the spec
next to `spec.result_path`, starts `python -m selfdistill.training SPEC` (or the same under
torchrun / accelerate) in a new process group with its output in `<result>.log`, and waits. It
kills the whole group (SIGTERM, then SIGKILL after a grace period) when the time limit passes or
`stop_event` is set (a cold stop), and turns every way a child can end into a `TrainingResult`:
the child's own result JSON, or a one-line reason ("killed by signal 9 (out of memory?)", "time
limit of 60 s exceeded", "exited with status 1: <last line of its log>"). Whatever a child that
did not succeed left beside `output_dir` (hidden temporaries, an adapter it renamed into place
but never reported) is removed, so a failed attempt is never half-visible.

Imports no torch: this runs in the daemon.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from selfdistill.training.spec import RoundSpec, TrainingResult

TERM_GRACE_S = 5.0
POLL_S = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_command(spec_path: Path, launcher: str = "python", num_processes: int = 1,
                  accelerate_config: Path | None = None) -> list[str]:
    """The argv that runs one round under `launcher` ("python", "torchrun" or "accelerate")."""
    entry = ["-m", "selfdistill.training", str(spec_path)]
    if launcher == "python":
        return [sys.executable, *entry]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *entry]
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--main_process_port", str(free_port())]
        if accelerate_config is not None:
            cmd += ["--config_file", str(accelerate_config)]
        return [*cmd, *entry]
    raise ValueError(f"unknown launcher {launcher!r} (expected python, torchrun or accelerate)")


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it if the daemon dies (kill -9 leaves no orphan trainer
    racing the restarted daemon for the same checkpoint). Linux only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def kill_group(pid: int, grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL whatever is left after `grace_s`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _signal_reason(sig: int) -> str:
    name = signal.Signals(sig).name
    if sig == signal.SIGKILL:
        return f"killed by signal {sig} (out of memory?)"
    return f"killed by signal {sig} ({name})"


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return ""
    return lines[-1][:300] if lines else ""


def _remove_leftovers(output_dir: Path, ours: bool) -> None:
    for p in output_dir.parent.glob(f".{output_dir.name}.*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if ours and output_dir.exists():
        shutil.rmtree(output_dir, ignore_errors=True)


def run_training_child(
    spec: RoundSpec,
    launcher: str = "python",
    num_processes: int = 1,
    time_limit_s: float = 3600.0,
    stop_event: threading.Event | None = None,
    accelerate_config: Path | None = None,
    on_start=None,
    on_poll=None,
) -> TrainingResult:
    """Run one round in a child process group and return what became of it.

    `on_start(pid)`, if given, is called as soon as the child exists (the daemon records the pid
    so that a restarted daemon can kill an orphaned group with `kill_group`); `on_poll()` at each
    poll while the child runs (the daemon's heartbeat: waiting on a live child is progress).
    """
    spec.result_path.parent.mkdir(parents=True, exist_ok=True)
    spec.output_dir.parent.mkdir(parents=True, exist_ok=True)
    spec.hf_home.mkdir(parents=True, exist_ok=True)
    spec_path = spec.write(spec.result_path.with_name(spec.result_path.stem + ".spec.json"))
    log_path = spec.result_path.with_suffix(".log")
    output_was_there = spec.output_dir.exists()  # then the child refuses it; it is not ours to remove
    spec.result_path.unlink(missing_ok=True)  # a stale result of an earlier attempt must not be read

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if spec.threads:
        env["OMP_NUM_THREADS"] = str(spec.threads)
    cmd = child_command(spec_path, launcher, num_processes, accelerate_config)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, preexec_fn=_die_with_parent)
    if on_start is not None:
        on_start(proc.pid)
    why_killed = None
    while proc.poll() is None:
        if time.monotonic() - started > time_limit_s:
            why_killed = f"time limit of {time_limit_s:g} s exceeded"
        elif stop_event is not None and stop_event.is_set():
            why_killed = "stopped before the round finished (cold stop)"
        if why_killed:
            kill_group(proc.pid)
            proc.wait()
            break
        if on_poll is not None:
            on_poll()
        if stop_event is not None:
            stop_event.wait(POLL_S)
        else:
            time.sleep(POLL_S)
    # torchrun's workers share the group; make sure none outlives the launcher
    kill_group(proc.pid, grace_s=1.0)
    rc = proc.returncode
    wall_s = round(time.monotonic() - started, 3)

    result = None
    if why_killed is None and spec.result_path.is_file():
        result = TrainingResult.read(spec.result_path)
        if result.status == "succeeded" and rc != 0:
            result = result.model_copy(update=dict(status="failed", adapter_dir=None,
                                                   reason=f"exited with status {rc} after writing its result: {_last_line(log_path)}"))
    if result is None:
        if why_killed:
            reason = why_killed
        elif rc < 0:
            reason = _signal_reason(-rc)
        else:
            reason = f"exited with status {rc} and no result: {_last_line(log_path)}"
        result = TrainingResult(status="failed", reason=reason)
    if result.status != "succeeded":
        _remove_leftovers(spec.output_dir, ours=not output_was_there)
    result.metrics["wall_s"] = wall_s
    result.pid, result.returncode = proc.pid, rc
    return result
