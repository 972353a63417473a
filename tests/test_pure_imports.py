"""The pure parts import nothing heavy: checked in a fresh interpreter."""

import subprocess
import sys

PURE = ["selfdistill.config", "selfdistill.records", "selfdistill.schedule", "selfdistill.checkpoints", "selfdistill.service",
        "selfdistill.pairs", "selfdistill.gates", "selfdistill.stats",
        "selfdistill.stopping", "selfdistill.tasks.curriculum", "selfdistill.scoring.health", "selfdistill.scoring.overlap", "selfdistill.scoring.anchors",
        "selfdistill.errors",
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


# The dependency rule (DESIGN.md, "Layout, turn 2"): a module imports only modules of its own
# layer or of the layers before it; nothing imports to its left.
LAYERS = [
    ["selfdistill", "selfdistill.records", "selfdistill.config", "selfdistill.errors", "selfdistill.logs",
     "selfdistill.stats", "selfdistill.service"],
    ["selfdistill.pairs", "selfdistill.gates", "selfdistill.evaluation", "selfdistill.scoring", "selfdistill.tasks",
     "selfdistill.schedule", "selfdistill.stopping", "selfdistill.engines", "selfdistill.models",
     "selfdistill.checkpoints", "selfdistill.export"],
    ["selfdistill.serving", "selfdistill.training", "selfdistill.store", "selfdistill.report", "selfdistill.prometheus"],
    ["selfdistill.cycle"],
    ["selfdistill.daemon", "selfdistill.operations"],
    ["selfdistill.cli", "selfdistill.__main__"],
]


def _layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and (best is None or len(n) > len(best[1])):
                best = (i, n)
    assert best is not None, f"{module} is in no layer of the dependency rule: add it to LAYERS"
    return best[0]


def _imports():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "selfdistill"
    for f in sorted(root.rglob("*.py")):
        mod = ".".join(("selfdistill", *f.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(f.read_text())):  # function-level (lazy) imports count too
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.split(".")[0] == "selfdistill" and name != mod:
                    yield mod, name


def test_the_dependency_rule_holds():
    wrong = sorted({f"{m} -> {d}" for m, d in _imports() if _layer(d) > _layer(m)})
    assert wrong == [], "imports to the left of the dependency rule:\n" + "\n".join(wrong)


def test_the_dependency_rule_catches_an_import_to_the_left():
    assert _layer("selfdistill.cycle") > _layer("selfdistill.store") > _layer("selfdistill.pairs") > _layer("selfdistill.records")
    assert _layer("selfdistill.scoring.feedback") == _layer("selfdistill.scoring")
