"""The pure parts import nothing heavy: checked in a fresh interpreter."""

import subprocess
import sys

PURE = ["selfdistill.config", "selfdistill.records", "selfdistill.pairs", "selfdistill.gates", "selfdistill.stats",
        "selfdistill.stopping", "selfdistill.tasks.curriculum", "selfdistill.scoring.health", "selfdistill.errors",
        "selfdistill.engines", "selfdistill.cli"]
HEAVY = ["torch", "vllm", "transformers", "peft", "trl", "sqlite_utils", "apscheduler", "datasets", "numpy"]


def test_pure_modules_import_nothing_heavy():
    code = (
        "import sys\n"
        f"for m in {PURE!r}: __import__(m)\n"
        f"print(','.join(h for h in {HEAVY!r} if h in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"heavy modules imported by pure parts: {out}"


def test_help_is_instant_and_light():
    code = "import sys\nfrom selfdistill.cli import build_parser\nbuild_parser()\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
