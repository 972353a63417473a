"""Helpers shared by tests (a module with a unique name: several conftest.py files exist, so
`from conftest import ...` would depend on import order)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m selfdistill ARGS` as a real process."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "selfdistill", *args], cwd=cwd or ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)
