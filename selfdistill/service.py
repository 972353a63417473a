"""Process plumbing of the daemon: the state directory, its single-instance lock, and sd_notify.

Standard library only; no work at import time.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
from pathlib import Path

from selfdistill.errors import StateDirError

SUBDIRS = ("checkpoints", "cache", "tmp", "exports", "reports")
MARKER = ".selfdistill-state"
MARKER_TEXT = "This directory is the state of a selfdistill service (database, checkpoints, caches, lock).\n"
LEGACY_DB = "selfdistill.db"  # state made before the marker existed holds the database


def _refusal(state_dir: Path) -> str | None:
    """Why this directory may not become (or be used as) a state directory, or None if it may."""
    here = state_dir.resolve()
    shared = {Path(here.anchor): "the filesystem root", Path(tempfile.gettempdir()).resolve(): "the system temp directory"}
    home = Path(os.path.expanduser("~"))  # stays "~" for a user without a home (a systemd DynamicUser)
    # a service user's home may be the directory systemd made for its state (StateDirectory=,
    # passed as $STATE_DIRECTORY): that one is the service's own, not a person's home
    given = {Path(d).resolve() for d in os.environ.get("STATE_DIRECTORY", "").split(":") if d}
    if home.is_absolute() and home.resolve() not in given:
        shared[home.resolve()] = "the home directory"
    if here in shared:
        return (f"{state_dir}: state_dir is {shared[here]} itself; point state_dir at a directory of its own, "
                f"e.g. {here / 'selfdistill-state'}")
    if not here.is_dir() or (here / MARKER).is_file() or (here / LEGACY_DB).is_file() or not any(here.iterdir()):
        return None
    return (f"{state_dir}: not a selfdistill state directory (it holds other files and no {MARKER} marker); "
            "point state_dir at a new or empty directory")


def prepare_state_dir(state_dir: Path) -> Path:
    """Create the state directory and its subdirectories, owner-only; check it is writable.

    Only a directory that is new, empty, or already the service's own (it holds the marker file,
    or the database of an earlier version) is taken: the chmod and the files written here must
    never land in a directory that holds other things, such as `.` or /tmp.
    """
    try:
        refusal = _refusal(state_dir)
    except OSError as e:
        raise StateDirError(f"{state_dir}: state directory cannot be read ({e.strerror}); fix its permissions or set state_dir") from None
    if refusal:
        raise StateDirError(refusal)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        marker = state_dir / MARKER
        if not marker.is_file():
            marker.write_text(MARKER_TEXT)
        for sub in SUBDIRS:
            (state_dir / sub).mkdir(mode=0o700, exist_ok=True)
        probe = state_dir / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise StateDirError(f"{state_dir}: state directory is not writable ({e.strerror}); fix its permissions or set state_dir") from None
    return state_dir


def check_state_dir_writable(state_dir: Path) -> None:
    """Fail early (before writing anything) if the state directory cannot be created or written."""
    p = state_dir
    while not p.exists():
        p = p.parent
    if not os.access(p, os.W_OK | os.X_OK):
        raise StateDirError(f"{state_dir}: state directory is not writable (no write access to {p}); fix its permissions or set state_dir")


class StateLock:
    """An exclusive flock on STATE/lock holding the owner's PID; a second daemon is refused."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateDirError(f"{self.path.parent}: another selfdistill daemon (PID {pid}) holds this state directory; stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def sd_notify(message: str) -> bool:
    """Send a message to systemd's notify socket, if there is one (READY=1, STATUS=..., WATCHDOG=1)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


def watchdog_interval_s() -> float | None:
    """Half the watchdog period systemd asked for (WATCHDOG_USEC), if any and if meant for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def hook_seconds(var: str, point: str) -> float | None:
    """Test hooks: the seconds an environment variable such as "generate:30,promote:committed:5"
    gives `point` (the text before its last colon), or None."""
    for part in os.environ.get(var, "").split(","):
        name, _, secs = part.rpartition(":")
        if name == point:
            return float(secs)
    return None


def hold_for_test(point: str) -> None:
    """Test hook: SELFDISTILL_TEST_HOLD="promote:committed:5,..." sleeps `secs` at the named point
    (a moment inside a step, not at a phase's start), so a kill can be aimed there."""
    secs = hook_seconds("SELFDISTILL_TEST_HOLD", point)
    if secs is not None:
        import time

        time.sleep(secs)
