"""A teacher server the daemon runs: vLLM's OpenAI-compatible server of a local model directory,
started as the daemon's child at the first teacher call, reached through `OpenAIEngine`.

Supervised: a server that died (killed, out of memory) is started again at the next call, up to
`serve.max_restarts` times in a run; a start that fails or takes longer than `start_timeout_s`
is one EngineError naming the teacher and its log (the server's output goes to
`<state>/cache/teacher-server/server.log`, appended). `release()` (before a training round) stops the
server when `serve.release = "stop"`, so the device memory it held is the trainer's; the next
teacher call starts it again. `close()` stops it for good. The server runs under a keeper (this
module run as a program) that leads its own process group and ends the whole group — the API
server and the engine-core process vLLM forks, which would otherwise outlive it holding its
memory — when it is stopped, when the server exits, and when the daemon dies, even by SIGKILL
(the kernel's parent-death signal). A server a killed run left behind is found by its pid file
and killed before a new one starts.

Prefix caching is off on this server: the teacher's log-probabilities of given tokens come from
prompt-logprob (echo) requests, which vLLM does not serve from its prefix cache, and a reported
bug gave wrong values at cached positions.

The vLLM CPU build's `vllm` command fails at start (FIELD-NOTES), so the server is run as
`python -m vllm.entrypoints.openai.api_server` with the daemon's interpreter.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from selfdistill.config import OpenAIEndpoint, TeacherConfig
from selfdistill.engines.base import Completion, Prompt, SamplingParams
from selfdistill.errors import EngineError
from selfdistill.logs import log

SERVED_NAME = "teacher"
MAX_TMPDIR = 60  # + a 37-byte socket name stays under the 107 bytes of sun_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_members(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _keeper(parent: int, argv: list[str]) -> int:
    """The server's keeper (`python -m selfdistill.engines.served PARENT -- CMD...`), leader of the
    server's process group: vLLM's engine core outlives a killed API server, so the keeper ends
    the whole group when the daemon dies (even by SIGKILL: the kernel's parent-death signal), when
    it is told to stop, and when the server exits by itself; it exits with the server's code."""
    import ctypes

    def down(*_):
        os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, down)
    signal.signal(signal.SIGINT, down)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the daemon died before the signal was armed
        down()
    code = subprocess.call(argv)
    for pid in _group_members(os.getpgid(0)):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return code if code >= 0 else 128 - code


def kill_stale(pid_file: Path) -> int | None:
    """A server an earlier run left behind (its pid file is still there and the process is a vLLM
    server): its process group is killed; its pid, or None."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return None
    pid_file.unlink(missing_ok=True)
    if b"selfdistill.engines.served" not in cmdline:
        return None
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return None
    return pid


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process in a process group (the keeper, the server and the engine core it forks), MiB."""
    total = 0
    for pid in _group_members(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return round(total / 1024, 1)


class ServedTeacher:
    """The Engine interface over a vLLM server this object starts, watches and stops."""

    def __init__(self, teacher: TeacherConfig, work_dir: str | os.PathLike[str], log_path: str | os.PathLike[str]):
        from selfdistill.models import check_model_dir

        self.cfg, self.serve = teacher, teacher.serve
        self.model = str(check_model_dir(teacher.model))
        self.work_dir, self.log_path = Path(work_dir), Path(log_path)
        self.starts = 0  # servers started in this run
        self.restarts = 0  # of them, after a server died
        self.last_start_s: float | None = None
        self.last_freed_mib: float | None = None
        self._proc: subprocess.Popen | None = None
        self._engine = None
        self._tmp: str | None = None  # a short TMPDIR made for the server, removed when it stops

    # -- the server ------------------------------------------------------------------------

    def command(self, port: int) -> list[str]:
        import torch

        from selfdistill.models import serving_dtype

        s = self.serve
        dtype = serving_dtype(s.dtype, not torch.cuda.is_available())
        if torch.cuda.is_available():
            memory = ["--gpu-memory-utilization", str(s.gpu_memory_utilization)] if s.gpu_memory_utilization is not None else []
        else:  # without it the CPU build wants most of the machine's memory
            memory = ["--kv-cache-memory-bytes", str(int(s.cpu_kv_cache_gib * 2**30))]
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--host", "127.0.0.1",
                "--port", str(port), "--served-model-name", SERVED_NAME, "--max-model-len", str(s.max_model_len),
                "--dtype", dtype, "--no-enable-prefix-caching", "--disable-uvicorn-access-log",
                *(["--enforce-eager"] if s.enforce_eager else []),
                *memory, *s.extra_args]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _ensure(self):
        if self._proc is not None and self._proc.poll() is None:
            return self._engine
        if self._proc is not None:  # it died under us
            code = self._proc.returncode
            self._drop_engine()
            self._proc = None
            self._drop_tmp()
            if self.restarts >= self.serve.max_restarts:
                raise EngineError(f"teacher server for {self.model} died (exit {code}) and was restarted {self.restarts} times "
                                  f"(teacher.serve.max_restarts); see {self.log_path}")
            self.restarts += 1
            log("teacher server died: restarting", logging.WARNING, model=self.model, exit_code=code, restart=self.restarts)
        self._start()
        return self._engine

    def _start(self) -> None:
        import httpx

        from selfdistill.engines.openai_compat import OpenAIEngine

        port = self.serve.port or _free_port()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The daemon's environment (its TMPDIR and caches are the service's, daemon.py), but vLLM's
        # ZMQ sockets live in TMPDIR and a socket path may not pass 107 bytes: a deep one is swapped
        # for a short private directory.
        tmp = os.environ.get("TMPDIR") or tempfile.gettempdir()
        if len(tmp) > MAX_TMPDIR:
            self._tmp = tmp = tempfile.mkdtemp(prefix="sdx-teacher-", dir="/tmp")
        env = dict(os.environ, TMPDIR=tmp, VLLM_CACHE_ROOT=os.environ.get("VLLM_CACHE_ROOT", str(self.work_dir / "vllm")),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        pid_file = self.work_dir / "server.pid"
        stale = kill_stale(pid_file)
        if stale:
            log("stale teacher server killed", logging.WARNING, pid=stale, model=self.model)
        t = time.time()
        with open(self.log_path, "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting the teacher server on port {port}\n".encode())
            out.flush()
            keeper = [sys.executable, "-m", "selfdistill.engines.served", str(os.getpid()), "--", *self.command(port)]
            self._proc = subprocess.Popen(keeper, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                          start_new_session=True)
        pid_file.write_text(f"{self._proc.pid}\n")
        base = f"http://127.0.0.1:{port}/v1"
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                self._drop_tmp()
                raise EngineError(f"teacher server for {self.model} exited with code {code} at start: {self._last_line()} "
                                  f"(full log: {self.log_path})")
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() - t > self.serve.start_timeout_s:
                self._kill()
                raise EngineError(f"teacher server for {self.model} did not answer within {self.serve.start_timeout_s:g} s "
                                  f"(teacher.serve.start_timeout_s); see {self.log_path}")
            time.sleep(0.5)
        self._engine = OpenAIEngine(OpenAIEndpoint(base_url=base, model=SERVED_NAME, timeout_s=self.serve.request_timeout_s,
                                                   max_retries=2, backoff_s=0.5))
        self.starts += 1
        self.last_start_s = round(time.time() - t, 2)
        log("teacher server started", model=self.model, pid=self._proc.pid, port=port, seconds=self.last_start_s,
            rss_mib=group_rss_mib(self._proc.pid))

    def _last_line(self) -> str:
        try:
            lines = [x for x in self.log_path.read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            return "(no log)"
        raised = [x for x in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", x.strip())]  # the exception it died of
        return (raised or lines or ["(empty log)"])[-1].strip()[:300]

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # the engine core may outlive its parent for a moment
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        (self.work_dir / "server.pid").unlink(missing_ok=True)
        self._drop_tmp()

    def _drop_tmp(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _drop_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def stop(self, why: str) -> None:
        if self._proc is None:
            return
        pid = self._proc.pid
        rss = group_rss_mib(pid)
        t = time.time()
        self._drop_engine()
        self._kill()
        self.last_freed_mib = round(rss - group_rss_mib(pid), 1)
        log(f"teacher server stopped for {why}", model=self.model, pid=pid, freed_mib=self.last_freed_mib, seconds=round(time.time() - t, 2))

    # -- the Engine interface ----------------------------------------------------------------

    def _call(self, fn):
        """fn(the server's engine); a call that failed because the server died under it is made
        once more on a new server (the death is counted against max_restarts)."""
        try:
            return fn(self._ensure())
        except EngineError:
            proc = self._proc
            if proc is None:
                raise
            try:
                proc.wait(5)  # alive after 5 s: the error is the request's, not a death
            except subprocess.TimeoutExpired:
                raise
            return fn(self._ensure())

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, adapter: str | None = None) -> list[list[Completion]]:
        return self._call(lambda e: e.generate(prompts, params, adapter=adapter))

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], adapter: str | None = None) -> list[tuple[float, int]]:
        return self._call(lambda e: e.score(prompts, completions, adapter=adapter))

    def token_logprobs(self, prompts: Sequence[Prompt], token_ids: Sequence[Sequence[int]], adapter: str | None = None) -> list[list[float]]:
        return self._call(lambda e: e.token_logprobs(prompts, token_ids, adapter=adapter))

    def token_topk(self, prompts: Sequence[Prompt], token_ids: Sequence[Sequence[int]], k: int, adapter: str | None = None) -> list:
        return self._call(lambda e: e.token_topk(prompts, token_ids, k, adapter=adapter))

    def tokenize(self, prompt: Prompt, adapter: str | None = None) -> list[int]:
        return self._call(lambda e: e.tokenize(prompt, adapter=adapter))

    def load_adapter(self, ref) -> None:
        raise EngineError("the teacher server serves its model without adapters")

    def drop_adapter(self, name: str) -> None:
        """No adapters here."""

    def release(self) -> None:
        if self.serve.release == "stop":
            self.stop("training")

    def resume(self) -> None:
        """Nothing: the server starts again at the next teacher call."""

    def close(self) -> None:
        self.stop("shutdown")


if __name__ == "__main__":
    sys.exit(_keeper(int(sys.argv[1]), sys.argv[3:]))
