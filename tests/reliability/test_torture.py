"""Crash torture, CI size: SIGKILL the real daemon, running with the shipped release mode, inside
the engine's generate, the training child's optimizer steps, the evaluation (between the two
checkpoints' evaluations) and the promotion (after its commit, before the pointer switch), plus
random moments; restart it each time, and prove that no committed row was lost and the end state
is consistent. Where each kill landed is read from evidence (store, child log, pointer), not from
where it was aimed; a target that missed is retried (bounded). The long run is
`benchmarks/torture.py --kills 1000 --parallel N` (results in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json

import pytest
from torture import DECIDED, torture

pytestmark = pytest.mark.slow


# policies/cpu-demo.toml's mode; "auto" (the default) and gpu.toml's "sleep" release by the same
# restart on CPU (the transformers engine frees its model the same way for all three)
@pytest.mark.parametrize("release,kills,rounds,seed", [("restart", 6, 3, 7)])
def test_sigkill_torture_loses_no_committed_row(tmp_path, tiny_model_dir, release, kills, rounds, seed):
    run = tmp_path / "run"
    res = torture(run, tiny_model_dir, rounds=rounds, kills=kills, seed=seed, max_wait_s=20.0, release=release)
    print(json.dumps(res, indent=1, default=str))
    assert f'release_for_training = "{release}"' in (run / "p.toml").read_text()
    # the release mode was exercised: the engine was freed before training and came back after
    assert res["engine_events"]["released for training"] >= 1 and res["engine_events"]["resumed"] >= 1, res["engine_events"]
    assert res["kills"] >= kills, res  # the run was really interrupted, not just left to finish
    # every kind of real work was hit, as the evidence after the kill shows
    landed = res["landed"]
    assert res["uncovered"] == [], res["covered"]
    assert landed.get("generate", 0) >= 1, landed  # the round in generate, the engine up
    assert landed.get("train(child running)", 0) >= 1 and res["kills_in_optimizer_steps"] >= 1, landed
    assert any(k.startswith("evaluate") for k in landed), landed
    assert landed.get("promote(committed, pointer behind)", 0) >= 1, landed
    # each pointer left behind was repaired by the next start ("current pointer repaired")
    assert res["pointer_repairs"]["seen"] == res["pointer_repairs"]["needed"] >= 1, res["pointer_repairs"]
    assert res["rows_lost"] == 0, res["lost"]
    # the allowance for phases that had not finished is never needed: rows commit with their phase
    assert res["rows_rewritten_by_unfinished_phases"] == 0, res
    # the training child dies with the daemon (PR_SET_PDEATHSIG): none outlives it by 3 s
    assert res["orphaned_training_children"] == 0, res
    assert res["problems"] == [], res["problems"]
    assert len(res["decisions"]) == res["rounds"] >= rounds and all(d in DECIDED for d in res["decisions"]), res["decisions"]
