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

Not root (a systemd unit's user): the same mount and network namespaces and mounts, made from a
user namespace of the sandbox's own (where the kernel and, under systemd, the unit allow one:
systemd/selfdistill-code-sandbox.conf), with the code then an ordinary uid of a second, nested
user namespace: exec drops every capability and the mounts of the first are locked, so it can
neither unmount what hides the state directory nor raise an interface. RLIMIT_NPROC=1 stops forks
as above. Its files are the daemon's uid outside, so the daemon's home and cache are hidden too.
`SandboxResult.isolation` says "userns". Where no user namespace can be made, only the rlimits,
the timeout and the process group apply, and it says "rlimits" (the code verifier refuses that
unless scoring.code_sandbox = "rlimits").

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
_CLONE_NEWUSER = 0x10000000
_USERNS_INNER_UID = 1000  # the code's uid inside its user namespace (the daemon's uid outside)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MOUNT_ROOT = "/tmp"  # hidden by an empty tmpfs; the interpreter is bind-mounted under it
_WORK = os.path.join(_MOUNT_ROOT, "work")
_DEFAULT_HIDE = ("/var/tmp", "/dev/shm")
# Unique uids per run, so RLIMIT_NPROC counts only this run's processes and the final sweep
# can only ever hit them. Far above any uid a system hands out.
_UID_BASE = 3_000_000
_uid_counter = itertools.count()


_userns_probe: dict[int, str | None] = {}


def _userns_problem() -> str | None:
    """Why this process cannot make the user namespaces of the unprivileged sandbox (probed once, in
    a child that does what `run_python` does and runs /bin/true), or None."""
    pid = os.getpid()
    if pid not in _userns_probe:
        pre = _isolating_preexec(None, "/", [], 5, 256 * 2**20, 2**20, probe=True)
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # the child reports the step that failed, if one did, and exits at once
            try:
                os.close(r)
                pre()
                os._exit(0)
            except BaseException as e:
                os.write(w, (str(e) or type(e).__name__).encode()[:500])
            os._exit(1)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            said = f.read().decode(errors="replace")
        _, status = os.waitpid(child, 0)
        _userns_probe[pid] = None if status == 0 else (said or f"the probe exited with status {status}")
    return _userns_probe[pid]


def isolation_unavailable() -> str | None:
    """Why `run_python` could not isolate code here (it would apply rlimits only), or None."""
    if os.geteuid() == 0:
        return None
    problem = _userns_problem()
    if problem is None:
        return None
    return (f"the daemon runs as uid {os.geteuid()}, not root, and cannot create user namespaces ({problem}): the "
            "sandbox would apply rlimits only (no network or mount namespace, the state directory visible, the daemon's "
            "own uid; under systemd, add systemd/selfdistill-code-sandbox.conf)")


@dataclass
class SandboxResult:
    returncode: int | None  # None when killed by the wall-clock timeout
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    isolation: str  # "namespaces" (root: netns, mount ns, own uid), "userns" (the same, unprivileged) or "rlimits"
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


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _id_maps(inner: int, outer_uid: int, outer_gid: int) -> tuple[bytes, bytes]:
    """The uid_map and gid_map lines mapping `inner` to the caller's ids (made in the parent: see below)."""
    return f"{inner} {outer_uid} 1".encode(), f"{inner} {outer_gid} 1".encode()


def _enter_user_namespace(libc, flags: int, maps: tuple[bytes, bytes]) -> None:
    """unshare(CLONE_NEWUSER | flags) and write the namespace's id maps."""
    if libc.unshare(_CLONE_NEWUSER | flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    _write("/proc/self/setgroups", b"deny")
    _write("/proc/self/uid_map", maps[0])
    _write("/proc/self/gid_map", maps[1])


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1  # x86_64, Linux >= 5.12


def _mount_setattr(libc, path: bytes, attr: _MountAttr, flags: int) -> None:
    if libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path, flags, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        raise OSError(ctypes.get_errno(), f"mount_setattr({path.decode()})")


def _bind_flags(path: str) -> int:
    """The per-mount flags of the mount holding `path` that a remount in a user namespace must keep."""
    f = os.statvfs(path).f_flag
    return sum(ms for st, ms in ((os.ST_NOSUID, _MS_NOSUID), (os.ST_NODEV, _MS_NODEV), (os.ST_NOEXEC, 8),
                                 (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (getattr(os, "ST_RELATIME", 4096), 1 << 21))
               if f & st)


def _isolating_preexec(uid: int | None, prefix: str, hide: list[str], cpu_s: int, memory_bytes: int, fsize_bytes: int,
                       probe: bool = False, workdir: str = "."):
    """The function the child runs between fork and exec: as root (`uid`: the sandbox's own), or,
    with `uid` None, as an unprivileged daemon through user namespaces (see `run_python`).

    The daemon has threads (vLLM), so the child must not take locks another thread might have
    held at fork time: libc is loaded and every path encoded here, in the parent.
    """
    libc = _libc()
    first_maps, nested_maps = _id_maps(0, os.getuid(), os.getgid()), _id_maps(_USERNS_INNER_UID, 0, 0)
    tmp, py_root, work = _MOUNT_ROOT.encode(), os.path.join(_MOUNT_ROOT, "python").encode(), _WORK.encode()
    prefix_b = prefix.encode()
    # paths under /tmp vanish with the /tmp tmpfs already (and cannot be mounted over once it is there)
    hidden: list[bytes] = []
    for h in sorted(set(hide), key=len):  # a path under another hidden one vanishes with it (and cannot be mounted on)
        if os.path.isdir(h) and not any(h == d or h.startswith(d.rstrip("/") + "/") for d in (_MOUNT_ROOT, *map(os.fsdecode, hidden))):
            hidden.append(h.encode())
    ro = _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    readonly, writable = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY), _MountAttr(attr_clr=_MOUNT_ATTR_RDONLY)
    work_flags = _bind_flags(workdir) if uid is None and not probe else 0  # only a user namespace remounts it

    def pre() -> None:
        if uid is None:  # root of a user namespace of our own: enough to make the mounts below
            _enter_user_namespace(libc, _CLONE_NEWNS | _CLONE_NEWNET, first_maps)
        elif libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        _mount(libc, b"none", b"/", None, _MS_REC | _MS_PRIVATE)
        if uid is None:  # the code is the daemon's uid outside: nothing it may write but its workdir
            _mount_setattr(libc, b"/", readonly, _AT_RECURSIVE)
            _mount_setattr(libc, b"/proc", writable, 0)  # the nested user namespace's maps are written there
        _mount(libc, b"tmpfs", tmp, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=64k,mode=0755")
        if not probe:
            os.mkdir(py_root)
            _mount(libc, prefix_b, py_root, None, _MS_BIND | _MS_REC)
            _mount(libc, None, py_root, None, _MS_REMOUNT | _MS_BIND | ro)
            # The real workdir sits under the /tmp just hidden; bind it into view as the only writable place.
            os.mkdir(work)
            _mount(libc, b".", work, None, _MS_BIND)  # cwd is still the real workdir
            if uid is None:  # writable again, this one mount (it came read-only from the tree above)
                _mount(libc, None, work, None, _MS_REMOUNT | _MS_BIND | work_flags)
        _mount(libc, None, tmp, None, _MS_REMOUNT | ro)
        for path in hidden:
            _mount(libc, b"tmpfs", path, b"tmpfs", ro, b"size=4k,mode=0555")
        _set_limits(cpu_s, memory_bytes, fsize_bytes)
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
        if uid is None:
            # a second user namespace, as an ordinary uid: exec drops every capability, and the
            # mounts above, made in the first, are locked (this one owns no mount namespace)
            _enter_user_namespace(libc, 0, nested_maps)
        else:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        if not probe:
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
    if os.geteuid() == 0 or _userns_problem() is None:
        if not interpreter.startswith(prefix + os.sep):
            raise RuntimeError(f"{interpreter}: interpreter is not under sys.base_prefix {prefix}; the sandbox cannot mount it")
        argv = [os.path.join(_MOUNT_ROOT, "python", os.path.relpath(interpreter, prefix)), "-I", "-S", "main.py"]
        own: list[str] = []
        if os.geteuid() == 0:
            isolation = "namespaces"
            uid = _UID_BASE + (os.getpid() % 10_000) * 100 + next(_uid_counter) % 100
            os.chown(workdir, uid, uid)
            os.chown(workdir / "main.py", uid, uid)
        else:
            # not root: the same namespaces and mounts from a user namespace of the sandbox's own, the
            # code then an ordinary uid of a second one. Its files are the daemon's uid outside, so the
            # daemon's home and cache are hidden as well as `hide`; under the systemd unit every other
            # path is read-only to it (ProtectSystem=strict)
            isolation = "userns"
            home = os.path.expanduser("~")
            own = [h for h in (home, os.environ.get("SELFDISTILL_CACHE")) if h and os.path.isabs(h) and h != "/"]
        os.chmod(workdir, 0o700)
        hidden = [str(Path(p).resolve()) for p in (*_DEFAULT_HIDE, *own, *hide)]
        preexec = _isolating_preexec(uid, prefix, hidden, cpu, mem, fsize, workdir=str(workdir))
    else:
        isolation = "rlimits"
        notes.append(f"not root and no user namespaces ({_userns_problem()}): no network namespace, no hidden paths, "
                     "RLIMIT_NPROC not applied")
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
