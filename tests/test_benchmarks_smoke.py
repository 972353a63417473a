"""The daemon-overhead benchmark still runs (tiny sizes; its figures live in benchmarks/RESULTS.md)."""

import json
import subprocess
import sys

import pytest
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


def test_rl_benchmark_runs(tmp_path, spell_bootstrap):
    """benchmarks/rl.py end to end at toy sizes: the session's spell_backward bootstrap, one round
    of two arms, every candidate measured on the audit split greedily and at T = 1."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rl.py"), "--out", str(tmp_path), "--rounds", "1", "--arms", "sft,grpo",
                        "--per-round", "60", "--model", str(spell_bootstrap[0]), "--audit", "40", "--k", "2", "--alpha", "1.0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "rl.json").read_text())
    assert set(res["arms"]) == {"sft", "grpo"} and res["audit_items"] == 40
    for arm in res["arms"].values():
        for c in arm["candidates"].values():
            assert c["audit"]["n"] == 40 and 0 <= c["pass_rate_T1"] <= 1
    assert res["arms"]["sft"]["candidates"], res["arms"]["sft"]["rounds"]
    assert "| sft | 1 | ckpt-000001 |" in (tmp_path / "rl.md").read_text()


def test_distill_benchmark_runs(tmp_path, tiny_model_dir):
    """benchmarks/distill.py end to end at toy sizes: two arms on the tiny model with itself as
    the teacher, the same split checked across arms, base / arms / teacher scored on both splits."""
    from sd_testutil import merged, tiny_policy_data, write_policy

    policy = write_policy(tmp_path / "tiny-distill.toml", merged(tiny_policy_data(tiny_model_dir, "transformers"), {
        "teacher": {"kind": "transformers", "model": str(tiny_model_dir), "max_tokens": 12},
        "scoring": {"teacher_label": True},
        "training": {"algorithm": "sft_then_distill", "distill": {"min_samples": 4}},
        "stopping": {"max_teacher_tokens": 1_000_000}}))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill.py"), "--policy", str(policy), "--out", str(tmp_path / "out"),
                        "--arms", "loop,distill", "--minutes", "10", "--rounds", "1", "--audit", "10"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    res = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert set(res["arms"]) == {"loop", "distill"} and res["arms"]["loop"]["teacher_tokens"] == 0
    assert res["arms"]["distill"]["teacher"]["distill"]["requests"] > 0 and res["arms"]["distill"]["rounds"] == 1
    assert all(d in ("promote", "reject") for arm in res["arms"].values() for d in arm["decisions"]), res["arms"]
    for split in ("gate", "audit"):
        assert set(res["results"][split]) == {"base", "loop", "distill", "teacher"} and res["results"][split]["base"]["n"] > 0
    table = (tmp_path / "out" / "distill.md").read_text()
    assert "| teacher |" in table and "| distill |" in table
    # benchmarks/gate_reuse.py on the loop arm's finished store: base and every promotion answer the whole held-out pool
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gate_reuse.py"), str(tmp_path / "out" / "loop" / "policy.toml"),
                        "--out", str(tmp_path / "reuse.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    reuse = json.loads((tmp_path / "reuse.json").read_text())
    promoted = [d for d in res["arms"]["loop"]["decisions"] if d == "promote"]
    assert len(reuse["promotions"]) == len(promoted) and set(reuse["all_items"]) >= {"base"}
    for p in reuse["promotions"]:
        assert p["window"] + p["rest"] == reuse["heldout_pool"] and -1 <= p["selection_effect"] <= 1, p
    # every decided round's candidate against its incumbent on the whole pool
    assert [d["decision"] for d in reuse["rounds"]] == [d for d in res["arms"]["loop"]["decisions"] if d in ("promote", "reject")]
    for d in reuse["rounds"]:
        assert d["pool_wins"] + d["pool_losses"] <= reuse["heldout_pool"] and 0 <= d["pool_p"] <= 1, d


def test_distill_benchmark_rl_arm_without_a_teacher(tmp_path, tiny_model_dir):
    """The RL issue's comparison arm on the distillation benchmark, from a policy with no teacher
    (as cpu-demo.toml): no chosen arm needs one, so the run goes on without the teacher's ceiling;
    the arm's samples' pass rate and diversity come from its store."""
    from sd_testutil import merged, tiny_policy_data, write_policy

    policy = write_policy(tmp_path / "tiny-rl.toml", merged(tiny_policy_data(tiny_model_dir, "transformers"), {
        "training": {"rl": {"reward": "correct", "min_groups": 1}}}))
    assert "[teacher]" not in policy.read_text()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill.py"), "--policy", str(policy), "--out", str(tmp_path / "out"),
                        "--arms", "grpo", "--minutes", "10", "--rounds", "1", "--audit", "10"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    res = json.loads((tmp_path / "out" / "distill.json").read_text())
    arm = res["arms"]["grpo"]
    assert arm["rounds"] == 1 and arm["decisions"][0] in ("promote", "reject") and arm["teacher_tokens"] == 0, arm  # it trained
    assert 0 <= arm["sample_pass_rate"] <= 1 and arm["distinct_answers_per_task"] >= 1, arm
    assert set(res["results"]["audit"]) == {"base", "grpo"}  # no teacher, no ceiling
    written = (tmp_path / "out" / "grpo" / "policy.toml").read_text()
    assert 'algorithm = "grpo"' in written and "[teacher]" not in written
    table = (tmp_path / "out" / "distill.md").read_text()
    assert "| grpo |" in table and "| teacher |" not in table and "distinct answers/task" in table
    rounds = (tmp_path / "out" / "distill-rounds.md").read_text().splitlines()
    assert len(rounds) == 3 and rounds[2].startswith("| grpo | 1 | "), rounds  # the one round, read from the arm's store
    cells = [c.strip() for c in rounds[2].strip("|").split("|")]
    assert cells[4] == arm["decisions"][0] and " -> " in cells[2] and cells[2].split(" -> ")[1] != "-", cells  # its gate figures
    assert float(cells[8]) >= 0 and float(cells[9]) >= 0 and cells[10] == "-", cells  # clip fraction, KL from the sampler; no KL penalty
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill.py"), "--rounds-table", "--out", str(tmp_path / "out"),
                            "--arms", "grpo"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.splitlines() == rounds, again.stderr[-2000:]


def test_self_judge_benchmark_runs(tmp_path, tiny_model_dir):
    """benchmarks/self_judge.py end to end at toy sizes: the verifier arm and the judge-only arm on
    one split, the judge arm's tasks written without answers, scored afterwards by the verifier."""
    from sd_testutil import merged, tiny_policy_data, write_policy

    policy = write_policy(tmp_path / "tiny-rg.toml", merged(tiny_policy_data(tiny_model_dir, "transformers"), {
        "engine": {"max_model_len": 512},
        "tasks": {"sources": [{"type": "reasoning_gym", "dataset": "chain_sum", "seed": 1, "size": 60,
                               "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}]},
        "stopping": {"max_rounds": 1}}))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "self_judge.py"), "--policy", str(policy), "--out", str(tmp_path / "out"),
                        "--arms", "verifier,self", "--minutes", "10", "--rounds", "1", "--audit", "10",
                        "--per-round", "6", "--heldout-items", "8"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    res = json.loads((tmp_path / "out" / "self_judge.json").read_text())
    assert set(res["arms"]) == {"verifier", "self"}
    open_tasks = [json.loads(x) for x in (tmp_path / "out" / "tasks-open.jsonl").read_text().splitlines()]
    assert len(open_tasks) == 60 and all(set(t) == {"prompt", "metadata", "group"} for t in open_tasks)  # the judge arm sees no answer
    assert all(t["metadata"]["num_terms"] == 2 and t["group"] for t in open_tasks)  # the curriculum's levels and the split's groups kept
    anchors = [json.loads(x) for x in (tmp_path / "out" / "anchors.jsonl").read_text().splitlines()]
    assert anchors and {a["prompt"] for a in anchors}.isdisjoint({t["prompt"] for t in open_tasks})  # in no split
    assert all(res["arms"][arm]["rounds"] == 1 for arm in res["arms"]), res["arms"]
    for split in ("gate", "audit"):
        assert set(res["results"][split]) == {"base", "verifier", "self"} and res["results"][split]["base"]["n"] > 0
    assert "| self |" in (tmp_path / "out" / "self_judge.md").read_text()


@pytest.mark.slow
def test_gpu_check_runs_its_steps_on_cpu(tmp_path, tiny_model_dir):
    """benchmarks/gpu_check.py, which gpu_check.sh runs on a GPU, with --device cpu: every step (the
    transformers engine with its release and resume, a training round through the child, the vLLM
    engine with the trained adapter and both release modes) runs and reports the device it ran on."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--model", str(tiny_model_dir),
                        "--dtype", "float32", "--out", str(tmp_path / "check.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    res = json.loads((tmp_path / "check.json").read_text())
    assert res["transformers"]["device"] == "cpu" and res["transformers"]["answers_after_resume"] == 1
    assert res["training"]["device"] == "cpu" and res["training"]["sft_train_s"] > 0 and res["training"]["dpo_train_s"] > 0
    for mode in ("sleep", "restart"):  # the CPU build has no sleep mode: a restart stands in, and says so
        assert res["vllm"][mode]["mode"] == "restart" and res["vllm"][mode]["resume_s"] >= 0
    assert "adapter_load_s" in res["vllm"]["sleep"]
    assert r.stdout.count("| ok |") == 5, r.stdout  # model, env, transformers, training, vllm


def test_every_distill_benchmark_arm_is_a_valid_policy_of_the_shipped_files(tmp_path):
    """Each arm of benchmarks/distill.py, written from each shipped policy it is run on, passes the
    policy's own checks (a dead key or an incoherent combination would fail the arm at its start)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import distill

    from selfdistill.config import load_policy

    for src, arms in (("cpu-demo.toml", distill.TEACHER_FREE), ("cpu-distill.toml", distill.ARMS)):
        for arm in arms:
            p = load_policy(distill.arm_policy(ROOT / "policies" / src, arm, tmp_path / src, 25, 0.25))
            assert p.pairs.rejected_from == ("base" if arm == "loop_anchored" else "round")
            assert (p.teacher is None) == (arm in distill.TEACHER_FREE), (src, arm)
            levels = p.tasks.curriculum.level_field
            if arm in ("loop_flat", "loop_curriculum") or (arm in distill.TEACHER_FREE and src == "cpu-demo.toml"):
                # the demo ships the curriculum, so its loop and every variant but loop_flat have levels
                assert levels == (None if arm == "loop_flat" else "num_terms"), (src, arm, levels)
            rotate = arm == "loop_rotate" or (src == "cpu-demo.toml" and arm != "loop_fixed")  # the demo ships "rotate"
            assert p.evaluation.gate_items == ("rotate" if rotate else "fixed"), (src, arm)
