"""Helpers shared by tests (a module with a unique name: several conftest.py files exist, so
`from conftest import ...` would depend on import order)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def scrape_metrics(url: str) -> dict[tuple[str, tuple], float]:
    """GET a Prometheus endpoint: {(sample name, sorted label items): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m selfdistill ARGS` as a real process."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "selfdistill", *args], cwd=cwd or ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)
