"""The daemon-overhead benchmark still runs (tiny sizes; its figures live in benchmarks/RESULTS.md)."""

import json
import subprocess
import sys

from sd_testutil import ROOT


def test_overhead_benchmark_runs():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--generations", "160", "--rows", "3000"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    docs = [json.loads(chunk) for chunk in r.stdout.replace("}\n{", "}\x00{").split("\x00")]
    overhead, scale = docs[0]["round_overhead"], docs[1]["store_at_scale"]
    assert overhead["generations_per_round"] == 160 and overhead["pairs_per_round"] > 0
    assert set(overhead["last_round_phases_s"]) == {"sample", "generate", "score", "pair"}
    assert scale["rows"] == 3000 and set(scale["query_ms"]) >= {"rounds", "heldout_curve", "pair_stats", "throughput"}
