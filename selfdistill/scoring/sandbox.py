"""Run untrusted Python (a student's code answer) in a child process that cannot hurt the daemon.

`run_python(code, ...)` writes the code to a throwaway directory and runs it with the daemon's own
interpreter in isolated mode (`-I -S`: no site, no user paths, no PYTHON* variables) and an empty
environment. Layers, each because the one before it is not enough:

- rlimits: CPU seconds, address space, file size, no core files. RLIMIT_NPROC as well, but the
  kernel does not enforce it for root, so on its own it stops no fork bomb under a root daemon.
- when the daemon runs as root (the usual case on these machines): the child enters a fresh mount
  and network namespace (no interface but a downed loopback: no network at all), gets read-only
  empty tmpfs mounts over /tmp, /var/tmp, /dev/shm and every path in `hide` (the state directory),
  and drops to a uid of its own (not `nobody`, which other sandboxes share) with RLIMIT_NPROC=1:
  as a non-root uid the limit is enforced, and 1 means it can neither fork nor start a thread, so
  fork bombs and shells both fail. The interpreter's prefix is bind-mounted read-only under the
  new /tmp, since the sandbox uid may not traverse the daemon's home (pyenv under /root).
- a wall-clock timeout that kills the whole process group, then a sweep that kills every process
  left with the sandbox uid (`kill -KILL -1` run as that uid), which also catches a child that
  escaped the group with setsid.

Not root: only the rlimits, the timeout and the process group apply, and `SandboxResult.isolation`
says "rlimits" instead of "namespaces" so callers can record it.

Run by hand: `python -m selfdistill.scoring.sandbox 'print(1+1)'`.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MOUNT_ROOT = "/tmp"  # hidden by an empty tmpfs; the interpreter is bind-mounted under it
_WORK = os.path.join(_MOUNT_ROOT, "work")
_DEFAULT_HIDE = ("/var/tmp", "/dev/shm")
# Unique uids per run, so RLIMIT_NPROC counts only this run's processes and the final sweep
# can only ever hit them. Far above any uid a system hands out.
_UID_BASE = 3_000_000
_uid_counter = itertools.count()


def isolation_unavailable() -> str | None:
    """Why `run_python` could not isolate code here (it would apply rlimits only), or None."""
    if os.geteuid() != 0:
        return (f"the daemon runs as uid {os.geteuid()}, not root: the sandbox would apply rlimits only (no network "
                "or mount namespace, the state directory visible, the daemon's own uid)")
    return None


@dataclass
class SandboxResult:
    returncode: int | None  # None when killed by the wall-clock timeout
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    isolation: str  # "namespaces" (root: netns, mount ns, own uid) or "rlimits"
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None = None) -> None:
    if libc.mount(source, target, fstype, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target.decode()}: {os.strerror(err)}")


def _isolating_preexec(uid: int, prefix: str, hide: list[str], cpu_s: int, memory_bytes: int, fsize_bytes: int):
    """The function the child runs between fork and exec, as root.

    The daemon has threads (vLLM), so the child must not take locks another thread might have
    held at fork time: libc is loaded and every path encoded here, in the parent.
    """
    libc = _libc()
    tmp, py_root, work = _MOUNT_ROOT.encode(), os.path.join(_MOUNT_ROOT, "python").encode(), _WORK.encode()
    prefix_b = prefix.encode()
    # paths under /tmp vanish with the /tmp tmpfs already (and cannot be mounted over once it is there)
    hidden = [h.encode() for h in hide if os.path.isdir(h) and not (h == _MOUNT_ROOT or h.startswith(_MOUNT_ROOT + "/"))]
    ro = _MS_RDONLY | _MS_NOSUID | _MS_NODEV

    def pre() -> None:
        if libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        _mount(libc, b"none", b"/", None, _MS_REC | _MS_PRIVATE)
        _mount(libc, b"tmpfs", tmp, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=64k,mode=0755")
        os.mkdir(py_root)
        _mount(libc, prefix_b, py_root, None, _MS_BIND | _MS_REC)
        _mount(libc, None, py_root, None, _MS_REMOUNT | _MS_BIND | ro)
        # The real workdir sits under the /tmp just hidden; bind it into view as the only writable place.
        os.mkdir(work)
        _mount(libc, b".", work, None, _MS_BIND)  # cwd is still the real workdir
        _mount(libc, None, tmp, None, _MS_REMOUNT | ro)
        for path in hidden:
            _mount(libc, b"tmpfs", path, b"tmpfs", ro, b"size=4k,mode=0555")
        _set_limits(cpu_s, memory_bytes, fsize_bytes)
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        os.chdir(work)

    return pre


def _set_limits(cpu_s: int, memory_bytes: int, fsize_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_bytes, fsize_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _sweep(uid: int) -> None:
    """Kill every process owned by the sandbox uid (kill(-1) as that uid signals exactly those)."""
    for _ in range(3):
        subprocess.run(["kill", "-KILL", "-1"], user=uid, group=uid, extra_groups=[],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})


def run_python(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    cpu_s: int | None = None,
    fsize_mb: int = 4,
    hide: list[str | os.PathLike[str]] = (),
    max_output: int = 65536,
) -> SandboxResult:
    """Run `code` as `python -I -S main.py` in a throwaway directory under the limits above.

    `hide`: directories the code must not see (the state directory); they appear empty.
    `cpu_s` defaults to the wall-clock timeout rounded up. Output beyond `max_output` characters
    is cut (a program printing forever still ends at the timeout or the file-size limit).
    """
    cpu = cpu_s if cpu_s is not None else max(1, int(timeout_s + 0.999))
    mem = memory_mb * 2**20
    fsize = fsize_mb * 2**20
    workdir = Path(tempfile.mkdtemp(prefix="selfdistill-sandbox-"))
    (workdir / "main.py").write_text(code)
    interpreter = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    notes: list[str] = []
    uid = None
    if os.geteuid() == 0:
        isolation = "namespaces"
        uid = _UID_BASE + (os.getpid() % 10_000) * 100 + next(_uid_counter) % 100
        os.chown(workdir, uid, uid)
        os.chown(workdir / "main.py", uid, uid)
        os.chmod(workdir, 0o700)
        if not interpreter.startswith(prefix + os.sep):
            raise RuntimeError(f"{interpreter}: interpreter is not under sys.base_prefix {prefix}; the sandbox cannot mount it")
        argv = [os.path.join(_MOUNT_ROOT, "python", os.path.relpath(interpreter, prefix)), "-I", "-S", "main.py"]
        hidden = [str(Path(p).resolve()) for p in (*_DEFAULT_HIDE, *hide)]
        preexec = _isolating_preexec(uid, prefix, hidden, cpu, mem, fsize)
    else:
        isolation = "rlimits"
        notes.append("not root: no network namespace, no hidden paths, RLIMIT_NPROC not applied")
        argv = [interpreter, "-I", "-S", "main.py"]
        preexec = lambda: _set_limits(cpu, mem, fsize)  # noqa: E731
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=workdir, env={}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=preexec, start_new_session=True, close_fds=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(stdin.encode(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
    finally:
        if uid is not None:
            _sweep(uid)
        shutil.rmtree(workdir, ignore_errors=True)
    return SandboxResult(
        returncode=None if timed_out else proc.returncode,
        stdout=out.decode("utf-8", "replace")[:max_output],
        stderr=err.decode("utf-8", "replace")[:max_output],
        timed_out=timed_out,
        duration_s=time.monotonic() - start,
        isolation=isolation,
        notes=notes,
    )


if __name__ == "__main__":
    res = run_python(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
    print(res)
