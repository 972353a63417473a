"""The teacher server the daemon runs (teacher.kind = "served"): a real vLLM CPU server of the tiny
model, started as this process's child, killed from outside, released and stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from topk_check import assert_topk_matches

from selfdistill.config import TeacherConfig
from selfdistill.engines import make_teacher_engine
from selfdistill.engines.base import SamplingParams
from selfdistill.engines.served import group_rss_mib
from selfdistill.errors import EngineError, ModelError

SERVE = {"dtype": "float32", "max_model_len": 256, "cpu_kv_cache_gib": 0.25, "start_timeout_s": 240}
PROMPTS = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "2+2=?"}]]
IDS = [[5, 9, 12, 7], [30, 31]]


def _gone(pgid: int, within_s: float = 15) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if group_rss_mib(pgid) == 0:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.vllm
def test_a_served_teacher_starts_on_first_use_comes_back_after_a_kill_and_frees_its_memory(tiny_dir, hf_tiny, tmp_path):
    teacher = make_teacher_engine(TeacherConfig(kind="served", model=str(tiny_dir), serve={**SERVE, "max_restarts": 1}), tmp_path)
    try:
        assert teacher.pid is None  # nothing runs until the teacher is asked
        want = hf_tiny.token_logprobs(PROMPTS, IDS)
        got = teacher.token_logprobs(PROMPTS, IDS)
        for a, b in zip(got, want):  # the offline reference's figures, through echo + logprobs
            assert len(a) == len(b) and a == pytest.approx(b, rel=1e-3, abs=1e-3)
        assert_topk_matches(teacher.token_topk(PROMPTS, IDS, 4), hf_tiny.token_topk(PROMPTS, IDS, 10_000), IDS, 4)
        first = teacher.pid
        assert teacher.starts == 1 and first and group_rss_mib(first) > 50
        # killed from outside (an OOM kill): the next call starts a new server and answers
        os.killpg(first, signal.SIGKILL)
        assert _gone(first)
        assert teacher.token_logprobs(PROMPTS[:1], IDS[:1])[0] == pytest.approx(want[0], rel=1e-3, abs=1e-3)
        second = teacher.pid
        assert second != first and (teacher.starts, teacher.restarts) == (2, 1)
        # released for training: the whole process group is gone and its memory with it
        teacher.release()
        assert teacher.pid is None and _gone(second) and teacher.last_freed_mib > 50
        # a second death is one more than max_restarts = 1 allows: one line naming the teacher and its log
        teacher.token_logprobs(PROMPTS[:1], IDS[:1])
        third = teacher.pid
        os.killpg(third, signal.SIGKILL)
        assert _gone(third)
        with pytest.raises(EngineError, match=r"teacher server for .* died \(exit -9\) and was restarted 1 times .*server\.log"):
            teacher.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0.0))
    finally:
        teacher.close()
    assert teacher.pid is None
    log = (tmp_path / "teacher-server" / "server.log").read_text()
    assert log.count("starting the teacher server") == 3


def test_a_teacher_that_is_not_a_model_is_refused_before_any_server_starts(tmp_path):
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelError, match="notamodel: not a model directory"):
        make_teacher_engine(TeacherConfig(kind="served", model=str(tmp_path / "notamodel")), tmp_path)


@pytest.mark.vllm
def test_a_server_that_fails_at_start_is_one_line_with_its_log(tiny_dir, tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 70)  # a TMPDIR too deep for vLLM's sockets: a short private one is made, and removed
    deep.mkdir()
    monkeypatch.setenv("TMPDIR", str(deep))
    before = set(Path("/tmp").glob("sdx-teacher-*"))
    teacher = make_teacher_engine(TeacherConfig(kind="served", model=str(tiny_dir), serve={**SERVE, "extra_args": ["--no-such-flag"]}), tmp_path)
    with pytest.raises(EngineError) as e:
        teacher.token_logprobs(PROMPTS[:1], IDS[:1])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"teacher server for {tiny_dir} exited with code 2 at start: ") and "--no-such-flag" in msg, msg
    assert teacher.pid is None and set(Path("/tmp").glob("sdx-teacher-*")) == before


@pytest.mark.slow
@pytest.mark.vllm
def test_a_served_teacher_dies_with_the_process_that_runs_it(tiny_dir, tmp_path):
    """The daemon killed with SIGKILL (no close, no atexit) leaves no teacher server holding the
    device: the server and the engine core it forked are gone."""
    script = (f"import time\nfrom selfdistill.config import TeacherConfig\nfrom selfdistill.engines import make_teacher_engine\n"
              f"t = make_teacher_engine(TeacherConfig(kind='served', model={str(tiny_dir)!r}, serve={SERVE!r}), {str(tmp_path)!r})\n"
              f"t.tokenize('hi')\nprint(t.pid, flush=True)\ntime.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(owner.stdout.readline())
        assert group_rss_mib(pid) > 50
    finally:
        owner.kill()
        owner.wait()
    assert _gone(pid, 30)
