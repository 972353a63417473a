"""The sandbox, for real: escape attempts fail inside it and the calling process is unharmed."""

import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from selfdistill.scoring.sandbox import run_python

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespace isolation needs root; run the suite as root (as CI does)")

FAST = dict(timeout_s=3.0, memory_mb=128)


def test_plain_code_runs_and_gets_stdin():
    r = run_python("import sys; print(sum(map(int, sys.stdin.read().split())))", stdin="1 2 3", **FAST)
    assert r.ok and r.stdout.strip() == "6" and r.isolation == "namespaces"


def test_environment_is_empty_and_interpreter_isolated():
    os.environ["SELFDISTILL_SECRET_FOR_TEST"] = "s3cret"
    r = run_python("import os, sys; print(dict(os.environ)); print(sys.flags.isolated, sys.flags.no_site)", **FAST)
    assert "s3cret" not in r.stdout
    assert r.stdout.splitlines()[-1] == "1 1"


def test_fork_bomb_fails():
    r = run_python("import os\nwhile True:\n    os.fork()", **FAST)
    assert not r.ok and "BlockingIOError" in r.stderr and not r.timed_out


def test_shell_spawn_fails():
    r = run_python("import subprocess\nprint(subprocess.run(['/bin/sh', '-c', 'echo pwned'], capture_output=True).stdout)", **FAST)
    assert not r.ok and "pwned" not in r.stdout


def test_thread_bomb_fails():
    r = run_python("import threading\nthreading.Thread(target=lambda: None).start()\nprint('started')", **FAST)
    assert not r.ok and "started" not in r.stdout


def test_infinite_loop_is_killed_at_the_timeout():
    # a loop that sleeps uses almost no CPU, so only the wall clock can stop it (a busy loop may
    # meet the CPU limit first on a loaded machine: that guard has its own test below)
    r = run_python("import time\nwhile True:\n    time.sleep(0.01)", timeout_s=1.0, memory_mb=128)
    assert r.timed_out and r.returncode is None and r.duration_s < 3.0


def test_cpu_limit_applies_even_with_a_long_wall_clock():
    r = run_python("while True:\n    pass", timeout_s=10.0, memory_mb=128, cpu_s=1)
    assert not r.timed_out and r.returncode != 0 and r.duration_s < 8


def test_memory_hog_fails():
    r = run_python("x = bytearray(512 * 2**20)\nprint('got it')", **FAST)
    assert not r.ok and "MemoryError" in r.stderr


def test_big_file_fails():
    r = run_python("open('big', 'wb').write(b'x' * (16 * 2**20))", timeout_s=3.0, memory_mb=128, fsize_mb=1)
    assert not r.ok


def test_writes_outside_its_directory_fail(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.chmod(outside, 0o777)  # even a world-writable directory is out of reach
    target = outside / "pwned.txt"
    r = run_python(
        f"import os\nfor p in [{str(target)!r}, '/tmp/pwned.txt', '/var/tmp/pwned.txt', '/dev/shm/pwned.txt', '/pwned.txt']:\n"
        "    try:\n        open(p, 'w').write('x'); print('WROTE', p)\n    except OSError as e:\n        print('denied', p, e.errno)\n"
        "open('inside.txt', 'w').write('ok'); print('inside ok')",
        **FAST,
    )
    assert "WROTE" not in r.stdout and "inside ok" in r.stdout, r.stdout + r.stderr
    assert not target.exists() and not os.path.exists("/pwned.txt")


@pytest.fixture
def state_dir():
    # Outside /tmp, which the sandbox hides anyway: this must be hidden by `hide` alone.
    path = tempfile.mkdtemp(prefix="selfdistill-test-state-", dir="/var/lib")
    yield Path(path)
    shutil.rmtree(path)


def test_state_directory_is_hidden(state_dir):
    state = state_dir
    os.chmod(state, 0o755)
    r = run_python(f"import os\nprint(os.listdir({str(state)!r}))", **FAST)
    assert r.ok  # without `hide`, an empty world-readable dir is visible: the control
    (state / "selfdistill.db").write_text("secret rows")
    os.chmod(state, 0o755)
    os.chmod(state / "selfdistill.db", 0o644)  # readable by anyone on the host: hidden anyway
    code = f"import os\nprint(os.listdir({str(state)!r}))\nprint(open({str(state / 'selfdistill.db')!r}).read())"
    r = run_python(code, hide=[state], **FAST)
    assert "secret rows" not in r.stdout and not r.ok
    assert r.stdout.splitlines()[0] == "[]"
    assert (state / "selfdistill.db").read_text() == "secret rows"
    control = run_python(f"print(open({str(state / 'selfdistill.db')!r}).read())", **FAST)
    assert "secret rows" in control.stdout  # the same read works when the directory is not hidden


def test_network_is_unreachable():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    accepted = []
    srv.settimeout(3)

    def accept():
        try:
            accepted.append(srv.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('CONNECTED')", **FAST)
    t.join(4)
    srv.close()
    assert "CONNECTED" not in r.stdout and not r.ok and accepted == []


def test_process_group_and_uid_sweep_leave_nothing_behind():
    r = run_python("import time\ntime.sleep(30)", timeout_s=0.5, memory_mb=128)
    assert r.timed_out
    # nothing owned by a sandbox uid (>= 3,000,000) survives
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(int(l.split()[1]) for l in f if l.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if uid >= 3_000_000:
            left.append(pid)
    assert left == []
