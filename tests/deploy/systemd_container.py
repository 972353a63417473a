"""A throwaway container with a real systemd as its PID 1, for running selfdistill.service as the
README installs it.

Never on the host's tree: the container's root is an overlay of / whose upper layer is a tmpfs
that lives only in the container's own mount namespace, with its own /tmp, /run and /var/tmp
(booting systemd on the host's tree would run systemd-tmpfiles and empty the host's /tmp). Its
PID namespace ends when its PID 1 is killed (by the PID this module started), and its cgroup is
a child cgroup made for it and removed afterwards.

Inside, /opt/selfdistill is an install as the README's unit expects it: `src` (the repository,
bound read-only), `.venv` (a small virtual environment on the system's python3.11 whose
site-packages points at this checkout's virtual environment's, as a copy-on-write overlay:
the unit's ProtectHome hides /root, where this machine's own python lives), and `stage` (the test's files).

Needs root, util-linux's unshare and nsenter, overlayfs and /lib/systemd/systemd;
`unavailable()` names what is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
SYSTEM_PYTHON = Path("/usr/bin/python3.11")
CGROUP_V1 = Path("/sys/fs/cgroup/systemd")
CGROUP_UNIFIED = Path("/sys/fs/cgroup/unified")  # beside the v1 hierarchies on a hybrid host

BOOT = r"""#!/bin/bash
# Runs as the first process of `unshare --mount --pid --fork --uts --ipc --cgroup`; ends as systemd.
set -euo pipefail
CT=$1 REPO=$2 SITE=$3 STAGE=$4 CGROUP=$5
mount --make-rprivate /
mount -t tmpfs -o size=4g,mode=0755 sdx-ct "$CT"
mkdir "$CT/upper" "$CT/work" "$CT/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$CT/upper,workdir=$CT/work" "$CT/root"
R=$CT/root
mount -t proc proc "$R/proc"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
mount -t tmpfs -o mode=1777 tmpfs "$R/var/tmp"
mount -t tmpfs -o mode=0755 tmpfs "$R/run"
mount --rbind /dev "$R/dev"
mount -t sysfs -o ro sysfs "$R/sys"
if [ "$CGROUP" = v1 ]; then  # hybrid: systemd's own v1 hierarchy and the unified one, each rooted at our cgroup
  mount -t tmpfs -o mode=0755 cgroup "$R/sys/fs/cgroup"
  mkdir "$R/sys/fs/cgroup/systemd" "$R/sys/fs/cgroup/unified"
  mount -t cgroup -o none,name=systemd,xattr cgroup "$R/sys/fs/cgroup/systemd"
  mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup/unified"
else
  mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
fi
O=$R/opt/selfdistill
SP=$O/.venv/lib/python3.11/site-packages
mkdir -p "$O/src" "$O/stage" "$O/.venv/bin" "$SP" "$CT/site-upper" "$CT/site-work"
mount --bind -o ro "$REPO" "$O/src"
mount --bind -o ro "$STAGE" "$O/stage"
printf 'home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11\n' > "$O/.venv/pyvenv.cfg"
ln -s /usr/bin/python3.11 "$O/.venv/bin/python3"
ln -s python3 "$O/.venv/bin/python"
# site-packages is this checkout's virtual environment's, as an overlay (not a path added to
# sys.path: dill, which datasets hashes with, pickles modules outside site-packages by value and
# fails on pyarrow's types), plus a .pth naming the checkout, read before the editable install's
mount -t overlay overlay -o "lowerdir=$SITE,upperdir=$CT/site-upper,workdir=$CT/site-work" "$SP"
echo /opt/selfdistill/src > "$SP/00-selfdistill-src.pth"
printf '#!/opt/selfdistill/.venv/bin/python3\nimport sys\nfrom selfdistill.cli import main\nsys.exit(main())\n' \
  > "$O/.venv/bin/selfdistill"
chmod 0755 "$O/.venv/bin/selfdistill"
echo selfdistill-test > "$R/etc/hostname"
cat > "$R/etc/systemd/system/selfdistill-test.target" <<'UNIT'
[Unit]
Description=selfdistill container test: the journal and nothing else
Requires=systemd-journald.socket
After=systemd-journald.socket
UNIT
export container=selfdistill-test
# pivot_root, not chroot: inside a chroot the kernel refuses user namespaces (EPERM), which the
# code sandbox of an unprivileged daemon needs
mkdir "$R/.old-root"
cd "$R"
pivot_root . .old-root
umount -l /.old-root
rmdir /.old-root
exec /lib/systemd/systemd --unit=selfdistill-test.target
"""


def unavailable() -> str | None:
    """Why a container cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (mount and PID namespaces, overlayfs, a cgroup of its own)"
    for tool in ("unshare", "nsenter", "pivot_root"):
        if shutil.which(tool) is None:
            return f"util-linux's {tool} is not installed"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed (apt-get install systemd)"
    if not SYSTEM_PYTHON.exists():
        return f"{SYSTEM_PYTHON} is not installed: the unit's ProtectHome needs a python outside /root and /home"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    return None


class Container:
    """`with Container(stage_dir) as ct:` boots it; `ct.sh(...)` runs a command inside; leaving
    the block kills its PID 1 and removes its cgroup."""

    def __init__(self, stage: Path, repo: Path, site_packages: Path | None = None):
        self.stage, self.repo = Path(stage), Path(repo)
        self.site = Path(site_packages or sysconfig.get_paths()["purelib"])
        self.mnt = self.stage.parent / f"{self.stage.name}-ct"
        self.proc: subprocess.Popen | None = None
        self.pid1: int | None = None
        self.cgroups: list[Path] = []

    def __enter__(self) -> "Container":
        self.mnt.mkdir(exist_ok=True)
        boot = self.stage.parent / f"{self.stage.name}-boot.sh"
        boot.write_text(BOOT)
        v1 = CGROUP_V1.is_dir()
        name = f"selfdistill-test-{os.getpid()}-{time.monotonic_ns()}"
        bases = [CGROUP_V1, CGROUP_UNIFIED] if v1 else [Path("/sys/fs/cgroup")]
        self.cgroups = [b / name for b in bases if b.is_dir()]
        for cg in self.cgroups:
            cg.mkdir()

        def into_cgroup() -> None:  # before unshare: the container's cgroup namespace is rooted here
            for cg in self.cgroups:
                (cg / "cgroup.procs").write_text(str(os.getpid()))

        self.log = open(self.stage.parent / f"{self.stage.name}-boot.log", "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--uts", "--ipc", "--cgroup", "bash", str(boot), str(self.mnt),
             str(self.repo), str(self.site), str(self.stage), "v1" if v1 else "v2"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=into_cgroup, start_new_session=True)
        try:
            self._wait_booted()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_booted(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the container exited ({self.proc.returncode}): {self.boot_log()}")
            if self.pid1 is None:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                kids = children.read_text().split() if children.exists() else []
                if kids and Path(f"/proc/{kids[0]}/comm").read_text().strip() == "systemd":
                    self.pid1 = int(kids[0])
            if self.pid1 is not None:
                r = self.sh("systemctl is-system-running", check=False, timeout=10)
                if r.stdout.strip() in ("running", "degraded"):
                    return
            time.sleep(0.3)
        raise RuntimeError(f"systemd did not come up in {timeout:.0f}s: {self.boot_log()}")

    def boot_log(self) -> str:
        self.log.flush()
        return (self.stage.parent / f"{self.stage.name}-boot.log").read_text(errors="replace")[-2000:]

    def sh(self, command: str, *, check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
        """Run `sh -c COMMAND` inside the container, as root, in its namespaces and root."""
        assert self.pid1 is not None
        r = subprocess.run(["nsenter", "-t", str(self.pid1), "-m", "-p", "-u", "-i", "-C", "-r", "-w", "--", "/bin/sh", "-c", command],
                           capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"in the container: {command!r} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return r

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        self.sh(f"mkdir -p $(dirname {path}) && cat > {path} && chmod {mode:o} {path}", input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} -p {','.join(props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, what: str, check, timeout: float, every: float = 1.0):
        """Poll `check()` until it returns something true; its last value, or AssertionError naming `what`."""
        end = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {value!r})")
            time.sleep(every)

    def __exit__(self, *exc) -> None:
        if self.pid1 is not None:
            try:
                os.kill(self.pid1, signal.SIGKILL)  # the PID namespace (every process in it) goes with its PID 1
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close() if hasattr(self, "log") else None
        for cg in self.cgroups:
            if cg.exists():
                for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    _rmdir(d)
                _rmdir(cg)
        try:
            self.mnt.rmdir()
        except OSError:
            pass


def _rmdir(d: Path) -> None:
    for _ in range(50):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)  # its last processes are still exiting
    print(f"warning: could not remove the container's cgroup {d}", file=sys.stderr)
