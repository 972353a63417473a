"""Fixtures for running the real daemon as a child process on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon_helpers import DaemonProc


@pytest.fixture
def daemon_factory():
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
