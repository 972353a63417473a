"""The cycle in-process, fast: the transformers engine on the tiny model, a real store, the real
training child. Each test drives `Cycle.run_round` through the path it is about; faults are
injected by wrapping a phase (the faked part is the operator or the fault, never the cycle)."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
from sd_testutil import TASKS, merged, tiny_policy_data, write_policy

from selfdistill.checkpoints import checkpoint_path, read_current
from selfdistill.config import load_policy
from selfdistill.cycle import Cycle, RunState, StopRequested, Waiting
from selfdistill.errors import EngineError
from selfdistill.operations import ingest_tasks, open_state, rollback

COLLECT = {"schedule": {"train_min_new_pairs": 10**6}}


@pytest.fixture
def make_cycle(tmp_path, tiny_model_dir):
    made = []

    def make(*overrides: dict, name: str = "p") -> Cycle:
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        policy = load_policy(write_policy(d / "p.toml", merged(tiny_policy_data(tiny_model_dir, "transformers"), *overrides)))
        store = open_state(policy)
        ingest_tasks(policy, store)
        cyc = Cycle(policy, store, RunState())
        made.append(cyc)
        return cyc

    yield make
    for c in made:
        c.close()
        c.store.close()


def _with(cyc: Cycle, phase: str, before=None, after=None) -> None:
    """Wrap one phase of this cycle with something that happens just before or after it."""
    real = getattr(cyc, f"phase_{phase}")

    def wrapped(rnd, t0):
        if before:
            before(rnd)
        real(rnd, t0)
        if after:
            after(rnd)

    setattr(cyc, f"phase_{phase}", wrapped)


def _policy_with(cyc: Cycle, **sections) -> None:
    """A reload, as the daemon offers it: the new policy is adopted at the next round boundary."""
    data = cyc.policy.model_dump(mode="json", exclude_unset=True)
    cyc.offer_policy(type(cyc.policy).model_validate(merged(data, sections)))


def test_a_collect_round_then_a_training_round_that_promotes(make_cycle):
    cyc = make_cycle(COLLECT, {"engine": {"release_for_training": "restart"}})
    r1 = cyc.run_round()
    assert (r1.decision, r1.status, r1.phase) == ("collect", "done", "done")
    _policy_with(cyc, schedule={"train_min_new_pairs": 0})  # swapped in at the round boundary
    r2 = cyc.run_round()
    assert r2.decision == "promote", r2.reasons
    assert cyc.current_id() == r2.candidate_id == "ckpt-000001" == read_current(cyc.state_dir)
    phases = [p["phase"] for p in cyc.store.phases(r2.id)]
    assert phases == ["sample", "generate", "score", "pair", "train", "evaluate", "decide", "promote"]
    # each round samples with its own seed (the same every time it is re-run), so a task asked
    # again under an unchanged incumbent gets fresh answers
    seeds = {r: {g["params"]["seed"] for g in cyc.store.generations(r)} for r in (1, 2)}
    assert len(seeds[1]) == len(seeds[2]) == 1 and seeds[1] != seeds[2]


@pytest.mark.parametrize("start_from", ["incumbent", "base"])
def test_a_round_starts_its_lora_where_the_policy_says_and_is_gated_against_the_incumbent(make_cycle, monkeypatch, start_from):
    """training.start_from: "incumbent" continues the incumbent's adapter; "base" trains a fresh
    LoRA on the base on all the data so far (STaR's restart). Either way the candidate's parent is
    the incumbent it was gated against, and round 2 trains on round 1's data too."""
    from selfdistill.training import child

    specs = []
    real = child.run_training_child

    def spy(spec, **kw):
        specs.append(spec)
        return real(spec, **kw)

    monkeypatch.setattr(child, "run_training_child", spy)
    cyc = make_cycle({"schedule": {"train_min_new_pairs": 0},
                      "training": {"start_from": start_from, "reference": start_from, "data_scope": "all"}})
    r1, r2 = cyc.run_round(), cyc.run_round()
    assert (r1.decision, r2.decision) == ("promote", "promote"), (r1.reasons, r2.reasons)
    assert specs[0].incumbent_adapter_dir is None  # round 1: the incumbent is the base
    if start_from == "incumbent":
        assert specs[1].incumbent_adapter_dir == cyc.state_dir / "checkpoints" / "ckpt-000001"
    else:
        assert specs[1].incumbent_adapter_dir is None
    (run1,), (run2,) = cyc.store.training_runs(r1.id), cyc.store.training_runs(r2.id)
    assert run1["spec"]["starts_from"] == "base"
    assert run2["spec"]["starts_from"] == ("ckpt-000001" if start_from == "incumbent" else "base")
    assert run2["spec"]["sft"] > run1["spec"]["sft"]  # all the data so far
    parents = {c["id"]: c["parent_id"] for c in cyc.store.query("SELECT id, parent_id FROM checkpoints")}
    assert parents["ckpt-000002"] == "ckpt-000001"


def test_skipped_and_failed_training_rounds_bring_a_released_engine_back(make_cycle, monkeypatch):
    monkeypatch.setenv("SELFDISTILL_TEST_TRAINING", "1:skip,2:fail")
    cyc = make_cycle({"engine": {"release_for_training": "restart"}, "training": {"max_retries": 0}})
    r1 = cyc.run_round()
    assert r1.decision == "skip" and "test hook" in r1.reasons[0]
    assert cyc.serving.released
    r2 = cyc.run_round()  # generates on the engine the skipped round released
    assert r2.decision == "fail" and r2.status == "failed" and "training failed" in r2.reasons[0]
    _policy_with(cyc, **COLLECT)
    r3 = cyc.run_round()
    assert r3.decision == "collect" and len(cyc.store.generations(r3.id)) == 6 * 4
    assert cyc.current_id() == "base"


def test_a_rollback_during_a_round_supersedes_its_promotion(make_cycle):
    cyc = make_cycle()
    # a warm stop that arrives while round 1 trains still lets its candidate be evaluated and decided
    _with(cyc, "train", after=lambda rnd: cyc.run.warm_stop.set())
    with pytest.raises(StopRequested, match="signal"):
        cyc.run_round()
    r1 = cyc.store.get_round(1)
    assert r1.decision == "promote" and r1.finished and cyc.current_id() == "ckpt-000001"
    cyc.run.warm_stop.clear()
    cyc.run.stop_reason = None
    # round 2 decides to promote ckpt-000002 over ckpt-000001; the operator rolls back meanwhile
    cyc2 = make_cycle(name="p")
    _with(cyc2, "promote", before=lambda rnd: rollback(cyc2.policy, "base", "operator: bad answers in production"))
    r2 = cyc2.run_round()
    assert r2.incumbent_id == "ckpt-000001" and r2.decision == "superseded", r2
    assert "ckpt-000001" in r2.reasons[0] and "base is current" in r2.reasons[0]
    assert cyc2.current_id() == "base" == read_current(cyc2.state_dir)
    assert cyc2.store.checkpoint("ckpt-000002")["status"] == "rejected"


def test_a_candidate_that_vanishes_before_promotion_fails_its_round_only(make_cycle):
    cyc = make_cycle()
    _with(cyc, "promote", before=lambda rnd: shutil.rmtree(checkpoint_path(cyc.state_dir, rnd.candidate_id)))
    r1 = cyc.run_round()
    assert r1.decision == "fail" and "checkpoint directory is missing" in r1.reasons[0]
    assert cyc.current_id() == "base" and cyc.store.checkpoint("ckpt-000001")["status"] == "failed"
    _policy_with(cyc, **COLLECT)
    assert cyc.run_round().decision == "collect"  # the next round runs: no crash loop


def test_errors_evaluating_the_incumbent_retry_and_never_move_current(make_cycle):
    cyc = make_cycle()
    assert cyc.run_round().decision == "promote"
    real = cyc.evaluate_checkpoint

    def flaky(ckpt_id, round_id):
        if ckpt_id == "ckpt-000001":
            raise EngineError("http://teacher/v1: 503 Service Unavailable after 5 retries")
        return real(ckpt_id, round_id)

    cyc.evaluate_checkpoint = flaky
    for _ in range(2):
        with pytest.raises(Waiting, match="evaluate failed; retried"):
            cyc.run_round()
        assert cyc.store.get_round(2).phase == "evaluate"
    r2 = cyc.run_round()
    assert r2.decision == "fail" and "evaluate failed 3 times: " in r2.reasons[0] and "503" in r2.reasons[0]
    assert cyc.current_id() == "ckpt-000001" == read_current(cyc.state_dir)
    assert not [e for e in cyc.store.events() if e["kind"] in ("fallback", "incumbent_unloadable")]


def test_an_incumbent_whose_adapter_is_gone_falls_back_to_the_base_in_one_step(make_cycle):
    cyc = make_cycle()
    assert cyc.run_round().decision == "promote"
    (checkpoint_path(cyc.state_dir, "ckpt-000001") / "adapter_model.safetensors").unlink()
    cyc2 = make_cycle(COLLECT, name="p")  # a restarted daemon: nothing is loaded in its engine
    r2 = cyc2.run_round()
    assert r2.decision == "collect" and r2.incumbent_id == "base"
    assert {g["checkpoint_id"] for g in cyc2.store.generations(r2.id)} == {"base"}
    assert cyc2.current_id() == "base" == read_current(cyc2.state_dir)
    ev = [e for e in cyc2.store.events() if e["kind"] == "incumbent_unloadable"]
    assert len(ev) == 1 and "adapter_model.safetensors: missing" in ev[0]["message"]


def test_score_phase_writes_judge_health_with_its_scores_or_not_at_all(make_cycle):
    cyc = make_cycle(COLLECT, {"scoring": {"self_judge": {"enabled": True, "anchor_size": 4}}, "engine": {"max_model_len": 1024}})
    real = cyc.store.record_phase

    def crash_at_score(rid, phase, *a, **kw):
        if phase == "score":
            raise KeyboardInterrupt("killed mid-commit")
        return real(rid, phase, *a, **kw)

    cyc.store.record_phase = crash_at_score
    with pytest.raises(KeyboardInterrupt):
        cyc.run_round()
    assert cyc.store.query("SELECT count(*) AS n FROM judge_health")[0]["n"] == 0
    assert cyc.store.query("SELECT count(*) AS n FROM scores")[0]["n"] == 0
    cyc.store.record_phase = real
    cyc.run_round()
    assert cyc.store.query("SELECT count(*) AS n FROM judge_health")[0]["n"] == 1


def test_expanded_tasks_are_written_with_the_sample_phase_or_not_at_all(make_cycle, monkeypatch):
    from selfdistill.records import TaskIn
    from selfdistill.tasks import expansion

    asked = []

    def fake_expand(engine, seeds, src, known, rng, **kw):  # the writer of new tasks is not under test
        asked.append(1)
        return expansion.ExpansionResult(tasks=[TaskIn(source="expansion:student", prompt=f"New task {len(asked)}: 2+2?", answer="4")],
                                         asked=1, rejected={})

    monkeypatch.setattr(expansion, "expand_tasks", fake_expand)
    cyc = make_cycle(COLLECT, {"tasks": {"sources": [{"type": "jsonl", "path": str(TASKS)},
                                                     {"type": "expansion", "by": "student"}]}})
    before = sum(cyc.store.count_tasks().values())
    real = cyc.store.record_phase
    cyc.store.record_phase = lambda rid, phase, *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt()) if phase == "sample" else real(rid, phase, *a, **kw)
    with pytest.raises(KeyboardInterrupt):
        cyc.run_round()
    assert sum(cyc.store.count_tasks().values()) == before and not cyc.store.events("expansion")
    cyc.store.record_phase = real
    cyc.run_round()
    assert sum(cyc.store.count_tasks().values()) == before + 1 and len(cyc.store.events("expansion")) == 1


def test_source_weights_shape_what_is_sampled(make_cycle, tmp_path):
    import json

    heavy, light = tmp_path / "heavy.jsonl", tmp_path / "light.jsonl"
    for f, word in ((heavy, "heavy"), (light, "light")):
        f.write_text("".join(json.dumps({"prompt": f"{word} item {i}: 1+{i}?", "answer": str(1 + i)}) + "\n" for i in range(40)))
    cyc = make_cycle(COLLECT, {"tasks": {"sources": [{"type": "jsonl", "path": str(heavy), "weight": 1000.0},
                                                     {"type": "jsonl", "path": str(light), "weight": 0.001}]}})
    cyc.phase_sample(cyc.store.get_round(cyc.store.create_round("base")), time.time())
    prompts = [t.prompt for t in cyc.store.round_tasks(1)]
    assert len(prompts) == 6 and all(p.startswith("heavy") for p in prompts), prompts


def test_a_difficulty_curriculum_opens_the_next_level_when_the_student_passes_the_one_it_is_on(make_cycle, tmp_path):
    # level 1's answers always pass (their own verifier matches anything), level 2's pass on a digit
    f = tmp_path / "levels.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"level {lv} item {i}: 1+{i}?", "answer": str(1 + i), "metadata": {"level": lv},
                                     **({"verifier": "regex:.*"} if lv == 1 else {})}) + "\n"
                         for lv in (1, 2) for i in range(12)))
    cyc = make_cycle(COLLECT, {"tasks": {"sources": [{"type": "jsonl", "path": str(f)}], "per_round": 4, "curriculum": {
        "level_field": "level", "advance_at": 0.9, "min_attempted": 4, "review_weight": 0.0}}})
    levels_of = lambda rid: {t.metadata["level"] for t in cyc.store.round_tasks(rid)}  # noqa: E731
    assert cyc.run_round().decision == "collect" and levels_of(1) == {1}
    assert cyc.store.phases(1)[0]["counts"]["curriculum_level"] == 1
    with cyc.store.transaction():  # as if an earlier, weaker student had failed them 40 times each: the pooled rate
        cyc.store.execute("UPDATE tasks SET attempts = attempts + 40 WHERE attempts > 0")  # falls below 0.9
    cyc.run_round()  # the base tried four level-1 tasks and passed all: level 2 opens, level 1 weighs 0 (review_weight)
    assert levels_of(2) == {2} and cyc.store.phases(2)[0]["counts"]["curriculum_level"] == 2
    opened = [e["message"] for e in cyc.store.events("curriculum")]
    assert opened == ["round 2: curriculum at level = 2 (1: passed, 4/8 tried, pass rate 1.00; 2: open, 0/10 tried)",
                      "round 1: curriculum at level = 1 (1: open, 0/8 tried; 2: closed, 0/10 tried)"], opened
    cyc.run_round()  # the same level: no new event
    assert len(cyc.store.events("curriculum")) == 2
    from selfdistill.store import canned_queries

    shown = [(r["round"], r["open_level"], r["tasks"], r["change"][:20]) for r in cyc.store.query(canned_queries()["curriculum"])]
    assert shown == [(1, 1, 4, "round 1: curriculum "), (2, 2, 4, "round 2: curriculum "), (3, 2, 4, "")], shown


def test_a_passed_levels_rows_are_cut_to_the_review_share_of_the_next_levels_training(make_cycle, tmp_path, monkeypatch):
    """training.review_fraction: once level 2 is open, round 1's level-1 rows are cut to that share of
    what round 2 trains on (a mastered level does not fill the next level's training)."""
    from selfdistill.training import child

    f = tmp_path / "levels.jsonl"  # level 1's answers always pass, level 2's on a digit
    f.write_text("".join(json.dumps({"prompt": f"level {lv} item {i}: 1+{i}?", "answer": str(1 + i), "metadata": {"level": lv},
                                     **({"verifier": "regex:.*"} if lv == 1 else {})}) + "\n"
                         for lv in (1, 2) for i in range(12)))
    trained = []  # per training run: the level of each row it was given
    real = child.run_training_child

    def spy(spec, **kw):
        trained.append([json.loads(line)["prompt"].split(" item")[0] for line in Path(spec.data_path).read_text().splitlines()])
        return real(spec, **kw)

    monkeypatch.setattr(child, "run_training_child", spy)
    cyc = make_cycle({"schedule": {"train_min_new_pairs": 0}, "training": {"review_fraction": 0.2},
                      "tasks": {"sources": [{"type": "jsonl", "path": str(f)}], "per_round": 4, "curriculum": {
                          "level_field": "level", "advance_at": 0.9, "min_attempted": 4, "review_weight": 0.0}}})
    cyc.run_round()
    cyc.run_round()
    assert [cyc.store.phases(r)[0]["counts"]["curriculum_level"] for r in (1, 2)] == [1, 2]
    first, second = (Counter(t) for t in trained)
    assert set(first) == {"level 1"}  # round 1: its own level, nothing cut
    stored = cyc.store.training_data(2)  # what round 2 could have trained on
    level1 = sum(r.prompt.startswith("level 1") for r in [*stored.sft, *stored.pairs])
    assert level1 >= 4 and second["level 2"] > 0, (level1, second)
    # 0.2 of what is trained on: a quarter of the level-2 rows, per table (SFT, pairs), rounded
    assert 0 < second["level 1"] <= round(second["level 2"] * 0.25) + 1 < level1, second
    (run2,) = cyc.store.training_runs(2)
    assert run2["spec"]["review_cut"] == level1 - second["level 1"]


@pytest.mark.parametrize("stop_when_exhausted", [True, False])
def test_running_out_of_tasks(make_cycle, stop_when_exhausted):
    cyc = make_cycle(COLLECT, {"tasks": {"per_round": 1000, "curriculum": {"max_uses": 1}},
                               "stopping": {"stop_when_tasks_exhausted": stop_when_exhausted}})
    assert cyc.run_round().decision == "collect"  # every training task used once
    if stop_when_exhausted:
        with pytest.raises(StopRequested, match="tasks exhausted"):
            cyc.run_round()
        assert cyc.store.get_round(2).decision == "skip"
    else:
        for _ in range(2):
            with pytest.raises(Waiting, match="no training task can be sampled"):
                cyc.run_round()
        assert [r.id for r in cyc.store.rounds()] == [1, 2] and cyc.store.get_round(2).phase == "sample"


def test_idle_outside_the_windows_starts_no_round(make_cycle):
    now = time.localtime()
    start = f"{(now.tm_hour + 2) % 24:02d}:00"
    end = f"{(now.tm_hour + 3) % 24:02d}:00"
    cyc = make_cycle({"schedule": {"train_windows": [{"start": start, "end": end}], "outside_windows": "idle"}})
    with pytest.raises(Waiting, match="outside the training windows"):
        cyc.run_round()
    assert cyc.store.rounds() == [] and cyc.serving._engine is None
    collect = make_cycle({"schedule": {"train_windows": [{"start": start, "end": end}]}}, name="q")
    r = collect.run_round()
    assert r.decision == "collect" and r.reasons == ["outside the training windows"]


def test_the_wall_clock_does_not_start_a_training_round_it_cannot_finish(make_cycle):
    cyc = make_cycle({"stopping": {"max_wall_s": 600}})
    rid = cyc.store.create_round("base")
    now = time.time()
    for phase, secs in (("train", 500), ("evaluate", 200), ("decide", 1)):
        cyc.store.record_phase(rid, phase, now - secs, {}, "done")
    with pytest.raises(StopRequested, match=r"wall clock: the next training round would take about 701s .* it starts on the next run"):
        cyc.check_stop("train")
    assert cyc.run.stop_is_policy
    cyc.run.warm_stop.set()
    cyc.check_stop("evaluate")  # a trained candidate is evaluated before any but an immediate stop
    (cyc.state_dir / "STOP").write_text("now\n")
    with pytest.raises(StopRequested):
        cyc.check_stop("evaluate")


def test_a_reloaded_policy_takes_effect_at_the_next_round_boundary(make_cycle):
    from selfdistill.logs import LOGGER, HumanFormatter, JsonFormatter, setup_logging

    cyc = make_cycle(COLLECT)
    setup_logging("json", "INFO")
    try:
        assert cyc.run_round().decision == "collect"
        _policy_with(cyc, tasks={"per_round": 3}, logging={"format": "human", "level": "WARNING"})
        assert isinstance(LOGGER.handlers[0].formatter, JsonFormatter)  # nothing changes under a running round
        r2 = cyc.run_round()
        assert len(cyc.store.round_tasks(r2.id)) == 3 and len(cyc.store.round_tasks(1)) == 6
        assert isinstance(LOGGER.handlers[0].formatter, HumanFormatter) and LOGGER.level == 30
    finally:
        LOGGER.handlers[:] = []
        LOGGER.setLevel("NOTSET")
        LOGGER.propagate = True


def test_a_policy_gradient_round_trains_on_the_rounds_own_samples_with_their_logprobs(make_cycle):
    """grpo through the cycle: the generate phase stores each answer's tokens and log-probabilities,
    the train phase hands the round's groups (train split only) to the child, the figures reach
    the round's metrics; a collect round's samples are pruned after keep_logprobs_rounds."""
    cyc = make_cycle({"tasks": {"per_round": 8}, "training": {"algorithm": "sft_then_grpo", "rl": {"min_groups": 1, "keep_logprobs_rounds": 1}},
                      "generation": {"temperature": 1.0}})
    rnd = cyc.run_round()
    assert rnd.decision == "promote", rnd.reasons
    gens = cyc.store.generations(rnd.id)
    stored = cyc.store.sample_logprobs(rnd.id)
    assert len(stored) == len(gens)
    for g in gens:
        ids, lps = stored[g["id"]]
        assert len(ids) == len(lps) == g["completion_tokens"] and all(lp <= 0 for lp in lps)
    run = cyc.store.training_runs(rnd.id)[-1]
    m = run["metrics"]
    assert m["grpo_steps"] > 0 and m["sft_steps"] > 0 and m["grpo_missing_logprobs"] == 0, m
    assert m["grpo_groups"] >= 1
    rl = cyc.store.get_round(rnd.id).metrics["rl"]
    assert set(rl) == {"reward_mean", "pass_rate", "clip_fraction", "kl", "policy_kl", "entropy"}
    assert rl["kl"] is None and rl["policy_kl"] > 0, rl  # no KL penalty, so no reference KL; SFT moved the policy from its sampler
    # the next round's pair phase prunes what no RL stage will use any more
    _policy_with(cyc, schedule={"train_min_new_pairs": 10**6})
    cyc.run_round()
    assert cyc.store.sample_logprobs(rnd.id) == {}


def test_a_reward_model_trained_on_the_pairs_scores_tasks_no_verifier_judges(make_cycle):
    """Round 1 (verifier on) trains a reward model on its pairs beside the policy and records its
    held-out accuracy as judge health; round 2 turns the verifier off and runs the policy gradient:
    the healthy reward model scores every answer, and those scores are the groups' rewards."""
    rm = {"enabled": True, "min_pairs": 8, "min_heldout_pairs": 8, "min_accuracy": 0.65, "epochs": 4, "learning_rate": 3e-3}
    cyc = make_cycle({"tasks": {"per_round": 40, "heldout_fraction": 0.2}, "pairs": {"strategy": "all_above_margin"},
                      "training": {"reward_model": rm, "max_length": 160}, "generation": {"temperature": 1.0, "samples_per_task": 6}})
    r1 = cyc.run_round()
    h = cyc.store.latest_judge_health("reward_model")
    assert h is not None and h["round_id"] == r1.id, r1.reasons
    assert h["details"]["heldout_pairs"] >= 8 and h["agreement"] >= 0.65 and h["healthy"], h
    _policy_with(cyc, scoring={"use_verifier": False}, training={"algorithm": "grpo", "rl": {"min_groups": 1}})
    r2 = cyc.run_round()
    scores = cyc.store.scores_for_round(r2.id)
    assert scores and {s_["scorer"].split(":")[0] for s_ in scores} == {"reward_model"}
    assert len(scores) == len(cyc.store.generations(r2.id)) and all(0 < s_["score"] < 1 for s_ in scores)
    m = cyc.store.training_runs(r2.id)[-1]["metrics"]
    assert m.get("grpo_steps", 0) > 0, (r2.reasons, m)


def test_a_checkpoint_is_measured_once_so_its_figure_as_incumbent_is_its_figure_as_candidate(make_cycle):
    """One answer per model and item: round 2's incumbent is round 1's promoted candidate, and the
    gate reuses its stored held-out answers instead of measuring it again (a second greedy pass
    can disagree with the first where batch composition changes the arithmetic)."""
    cyc = make_cycle()
    r1, r2 = cyc.run_round(), cyc.run_round()
    assert r1.decision == "promote", r1.reasons
    assert r2.incumbent_id == r1.candidate_id
    assert r2.metrics["incumbent_accuracy"] == r1.metrics["candidate_accuracy"]
    runs = cyc.store.query("SELECT count(*) AS n FROM evaluations WHERE checkpoint_id = ? AND suite = 'heldout'", (r1.candidate_id,))
    assert runs[0]["n"] == 1


def test_rotating_gate_items_move_through_the_pool_and_a_checkpoint_answers_each_item_once(make_cycle, monkeypatch):
    """evaluation.gate_items = "rotate": each round's gate tests on the next heldout_items of the
    held-out pool (cyclically), so round 2 tests mostly on items round 1's promotion was not chosen
    on; the incumbent answers only the items it never answered (its earlier answers are reused, the
    same text), and each round's items are kept for its later phases."""
    import selfdistill.evaluation as evaluation

    real, asked = evaluation.evaluate_heldout, []

    def counting(engine, adapter, tasks, verify, builder, max_tokens, known=None):
        asked.append(sum(t.id not in (known or {}) for t in tasks))
        return real(engine, adapter, tasks, verify, builder, max_tokens, known)

    monkeypatch.setattr(evaluation, "evaluate_heldout", counting)
    cyc = make_cycle({"evaluation": {"gate_items": "rotate", "heldout_items": 12}})
    pool = [t.id for t in sorted(cyc.store.tasks(split="heldout"), key=lambda t: t.key)]  # windows go by key, not by id
    assert 12 < len(pool) < 24 and pool != sorted(pool), pool  # windows of 12 that overlap round to round
    r1, r2 = cyc.run_round(), cyc.run_round()
    assert r1.decision == r2.decision == "promote", (r1.reasons, r2.reasons)
    w1, w2 = ([t.id for t in cyc.gate_tasks(r.id)] for r in (r1, r2))
    assert w1 == sorted(pool[:12]) and w2 == sorted(pool[12:] + pool[: 24 - len(pool)])
    overlap = set(w1) & set(w2)
    assert cyc.gate_items_new(r2.id) == 12 - len(overlap) and cyc.gate_items_new(r1.id) == 12
    # base and ckpt 1 answer round 1's 12; ckpt 1, round 2's incumbent, only the items new to it; ckpt 2 all 12
    assert asked == [12, 12, 12 - len(overlap), 12], asked
    evs = cyc.store.query("SELECT id FROM evaluations WHERE checkpoint_id = ? AND suite = 'heldout' ORDER BY id", (r1.candidate_id,))
    texts = [{r["task_id"]: r["text"] for r in cyc.store.query("SELECT task_id, text FROM eval_items WHERE evaluation_id = ?", (e["id"],))}
             for e in evs]
    assert [sorted(t) for t in texts] == [w1, w2]  # as round 1's candidate, then round 2's incumbent
    assert all(texts[0][t] == texts[1][t] for t in overlap)  # one answer per checkpoint and item
    second = cyc.store.latest_evaluation(r1.candidate_id, "heldout", w2)
    assert r2.metrics["incumbent_accuracy"] == second.metrics["accuracy"]
    assert json.loads(cyc.store.get_meta(f"gate_items:{r2.id}")) == w2


@pytest.mark.parametrize("kind", ["transformers", pytest.param("served", marks=[pytest.mark.slow, pytest.mark.vllm])])
def test_a_distillation_round_scores_the_rounds_answers_with_the_teacher_once_and_stores_them(make_cycle, tiny_model_dir, kind):
    """distill through the cycle with a real teacher (here the student's own base, so the
    teacher's figures must equal the trainer's: the reverse KL before training is ~0), in process
    or as a vLLM server the cycle runs as its child (stopped for training: no process is left
    while the trainer runs, and none after): every train-split answer of the round is scored
    token by token, stored with the teacher and its tokenizer's fingerprint, never asked again,
    and the stage's figures reach the round."""
    serve = {"dtype": "float32", "max_model_len": 256, "cpu_kv_cache_gib": 0.25, "start_timeout_s": 240}
    cyc = make_cycle({"tasks": {"per_round": 8}, "generation": {"temperature": 1.0},
                      "teacher": {"kind": kind, "model": str(tiny_model_dir), **({"serve": serve} if kind == "served" else {})},
                      "training": {"algorithm": "distill", "distill": {"min_samples": 4, "samples_per_task": 3}}})
    rnd = cyc.run_round()
    assert rnd.decision in ("promote", "reject"), rnd.reasons
    train_tasks = {t.id for t in cyc.store.round_tasks(rnd.id) if t.split == "train"}
    gens = {g["id"]: g for g in cyc.store.generations(rnd.id)}
    stored = cyc.store.teacher_logprobs(rnd.id)
    sampled = cyc.store.sample_logprobs(rnd.id)
    assert stored and all(gens[gid]["task_id"] in train_tasks for gid in stored)
    assert len(stored) == 3 * len(train_tasks)  # samples_per_task
    assert all(len(lps) == len(sampled[gid][0]) for gid, lps in stored.items())
    row = cyc.store.query("SELECT teacher, tokenizer FROM teacher_logprobs LIMIT 1")[0]
    assert row["teacher"] == str(tiny_model_dir) and row["tokenizer"].startswith("sha256:")
    m = cyc.store.training_runs(rnd.id)[-1]["metrics"]
    assert m["distill_steps"] > 0 and abs(m["distill_reverse_kl_before"]) < 1e-3, m
    d = cyc.store.get_round(rnd.id).metrics["distill"]
    assert d["samples"] == len(stored) and d["teacher_tokens"] == sum(map(len, stored.values()))
    _, counts = cyc.distill_data(rnd.id)  # a restarted phase asks the teacher nothing twice
    assert counts["distill_asked"] == 0 and counts["distill_samples"] == len(stored)
    assert cyc.store.teacher_usage(rnd.id)["distill"]["completion_tokens"] == d["teacher_tokens"]
    if kind == "served":
        teacher = cyc.serving._teacher
        assert teacher.starts == 1 and teacher.pid is None and teacher.last_freed_mib > 50  # stopped before training


def test_a_topk_distillation_round_stores_the_teachers_alternatives_and_trains_on_them(make_cycle, tiny_model_dir):
    """objective forward_kl through the cycle (the teacher is the student's own base, so its
    divergence from the trainer's student is ~0): one teacher request per answer gives the sampled
    tokens' figures and each position's top-k, stored beside them (4 + 8k bytes a token) and read
    back into the round's rows; answers scored for reverse KL only are asked again for the lists."""
    cyc = make_cycle({"tasks": {"per_round": 8}, "generation": {"temperature": 1.0},
                      "teacher": {"kind": "transformers", "model": str(tiny_model_dir)},
                      "training": {"algorithm": "distill", "distill": {"min_samples": 4, "samples_per_task": 2,
                                                                         "objective": "forward_kl", "top_k": 4}}})
    rnd = cyc.run_round()
    assert rnd.decision in ("promote", "reject"), rnd.reasons
    sampled, stored = cyc.store.sample_logprobs(rnd.id), cyc.store.teacher_topk(rnd.id, 4)
    assert stored and cyc.store.teacher_topk(rnd.id, 5) == {}
    for gid, (ids, lps) in stored.items():
        assert len(ids) == len(lps) == len(sampled[gid][0]) and all(len(r) == 4 == len(set(r)) for r in ids)
        assert all(r == sorted(r, reverse=True) and r[0] <= 0 for r in lps)
    size = cyc.store.query("SELECT sum(length(logprobs) + length(topk_ids) + length(topk_logprobs)) AS b, "
                           "max(top_k) AS k FROM teacher_logprobs")[0]
    assert size["k"] == 4 and size["b"] == (4 + 8 * 4) * sum(len(sampled[g][0]) for g in stored)
    m = cyc.store.training_runs(rnd.id)[-1]["metrics"]
    assert m["distill_steps"] > 0 and abs(m["distill_divergence_before"]) < 1e-3, m
    rows, counts = cyc.distill_data(rnd.id)
    assert counts["distill_asked"] == 0 and all(r.topk_ids and len(r.topk_ids) == len(r.token_ids) for r in rows)
    # a row scored without alternatives (reverse KL) is scored again for them, and replaced
    gid = next(iter(stored))
    cyc.store.execute("UPDATE teacher_logprobs SET top_k = NULL, topk_ids = NULL, topk_logprobs = NULL WHERE generation_id = ?", (gid,))
    _, counts = cyc.distill_data(rnd.id)
    assert counts["distill_asked"] == 1 and cyc.store.teacher_topk(rnd.id, 4)[gid] == stored[gid]


class _BadTeacher:
    """A teacher server gone wrong: the faked part is the teacher, the cycle's handling is under test."""

    def __init__(self, fail: bool):
        self.fail, self.calls = fail, 0

    def token_logprobs(self, prompts, token_ids, adapter=None):
        self.calls += 1
        if self.fail:
            raise EngineError("teacher http://127.0.0.1:9/v1: connection refused")
        bad = [[], [float("nan")], [0.5]]  # too few figures, not a number, a probability above 1
        return [([-1.0] * len(ids) if i % 2 else bad[i // 2 % 3] + [-1.0] * (len(ids) - 1)) for i, ids in enumerate(token_ids)]

    def token_topk(self, prompts, token_ids, k, adapter=None):
        from selfdistill.engines.base import TokenTopK

        lps = self.token_logprobs(prompts, token_ids)
        good = list(range(3, 3 + k)), [-0.5 - j for j in range(k)]
        bad = [(good[0][:-1] + [3], good[1]), (good[0], [0.3] + good[1][1:]), (good[0][:-1], good[1][:-1])]  # a repeat, > 0, too few
        return [TokenTopK([-1.0] * len(ids), [(good if i % 4 == 1 else bad[i // 4 % 3])[0]] * len(ids),
                          [(good if i % 4 == 1 else bad[i // 4 % 3])[1]] * len(ids)) if lp == [-1.0] * len(ids) else TokenTopK(lp, [], [])
                for i, (ids, lp) in enumerate(zip(token_ids, lps))]

    def release(self):
        pass

    def resume(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("objective", ["forward_kl"])
def test_a_teacher_whose_top_k_lists_are_garbage_stores_none_of_them(make_cycle, tiny_model_dir, objective):
    cyc = make_cycle({"tasks": {"per_round": 8}, "generation": {"temperature": 1.0, "max_tokens": 6},
                      "teacher": {"kind": "transformers", "model": str(tiny_model_dir)},
                      "training": {"algorithm": "distill", "distill": {"min_samples": 2, "objective": objective, "top_k": 3}}})
    cyc.serving._teacher, cyc._teacher_tokenizer = _BadTeacher(False), "sha256:test"
    rnd = cyc.run_round()
    stored = cyc.store.teacher_topk(rnd.id, 3)
    assert stored and all(ids[0] == [3, 4, 5] and lps[0] == [-0.5, -1.5, -2.5] for ids, lps in stored.values())
    asked = len(cyc.store.generations(rnd.id, "train"))
    assert len(stored) <= asked / 4, (len(stored), asked)  # one in four of the teacher's lists is well formed
    rows, counts = cyc.distill_data(rnd.id)  # the rejected ones are asked again; still only good lists are kept
    assert counts["distill_asked"] == asked - len(stored) and counts["distill_rejected"] > 0
    assert counts["distill_samples"] == len(cyc.store.teacher_topk(rnd.id, 3)) == len(rows)


@pytest.mark.parametrize("fail", [False, True])
def test_a_teacher_that_answers_garbage_or_fails_stores_nothing_wrong_and_the_round_goes_on(make_cycle, tiny_model_dir, fail):
    cyc = make_cycle({"tasks": {"per_round": 8}, "generation": {"temperature": 1.0, "max_tokens": 6},
                      "teacher": {"kind": "transformers", "model": str(tiny_model_dir)},
                      "training": {"algorithm": "distill", "distill": {"min_samples": 4}}})
    bad = _BadTeacher(fail)
    cyc.serving._teacher, cyc._teacher_tokenizer = bad, "sha256:test"
    rnd = cyc.run_round()
    stored = cyc.store.teacher_logprobs(rnd.id)
    if fail:
        assert stored == {} and rnd.decision == "skip", rnd.reasons
        assert "0 samples scored by the teacher" in rnd.reasons[0]
        ev = cyc.store.query("SELECT kind, message FROM events WHERE kind = 'teacher_unavailable'")
        assert ev and "connection refused" in ev[0]["message"]
    else:
        assert stored and all(lps == [-1.0] * len(lps) for lps in stored.values())  # only the well-formed half
        m = cyc.store.training_runs(rnd.id)[-1]["metrics"]
        assert m["distill_steps"] > 0


def _fake_teacher(monkeypatch, mode):
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "reliability"))
    from teacher_server import FakeTeacher

    monkeypatch.setenv("SD_TEST_TEACHER_KEY", "sk-test")
    return FakeTeacher(mode)


def _pairwise_policy(url: str, min_win_rate: float) -> dict:
    return {"teacher": {"kind": "openai", "max_tokens": 16, "endpoint": {"base_url": url, "model": "t", "api_key_env": "SD_TEST_TEACHER_KEY"}},
            "evaluation": {"pairwise_judge": "teacher", "pairwise_items": 6}, "gates": {"min_win_rate": min_win_rate}}


@pytest.mark.parametrize("min_win_rate", [0.5, 0.6])
def test_the_pairwise_gate_decides_the_round_on_the_win_rate(make_cycle, monkeypatch, min_win_rate):
    """Through a whole round: the tiny model's candidate answers the held-out items as the base
    does (greedy newlines), so no judge is asked (two calls an item are saved where answers are
    the same), each item is a tie, the win rate is 0.5 and the gate applies min_win_rate to it."""
    with _fake_teacher(monkeypatch, "ok") as teacher:
        cyc = make_cycle(_pairwise_policy(teacher.base_url, min_win_rate))
        rnd = cyc.run_round()
    pw = cyc.store.get_round(rnd.id).metrics["pairwise"]
    assert (pw["items"], pw["judged"], pw["same_answer"], pw["win_rate"], pw["trusted"]) == (6, 0, 6, 0.5, True), pw
    reasons = " ".join(rnd.reasons)
    if min_win_rate == 0.5:
        assert rnd.decision == "promote" and "pairwise win rate 0.5000 >= min_win_rate 0.5" in reasons, rnd.reasons
    else:
        assert rnd.decision == "reject" and "pairwise win rate 0.5000 < min_win_rate 0.6" in reasons, rnd.reasons


def test_a_real_local_teacher_judges_the_pairwise_gate_in_both_orders(make_cycle, bundled_model_dir):
    """The pairwise gate with a real local teacher, not a scripted server: the bundled
    SmolLM2-135M-Instruct loaded in the daemon (teacher.kind = "transformers") compares the
    candidate's and the incumbent's answers in both orders. Whatever it prefers, every comparison is
    asked twice and counted as the teacher's use, each pair of verdicts is a win, a loss or a tie,
    and the gate trusts the judge exactly when its position-following share is within
    max_position_bias. (Measured with this model: it follows the position, so it is not trusted;
    benchmarks/RESULTS.md, "The pairwise gate with a real local teacher".)"""
    from types import SimpleNamespace

    cyc = make_cycle({"teacher": {"kind": "transformers", "model": str(bundled_model_dir), "max_tokens": 8, "temperature": 0.0},
                      "evaluation": {"pairwise_judge": "teacher", "pairwise_items": 6}, "gates": {"min_win_rate": 0.5}})
    rnd = cyc.store.create_round("base")
    tasks = cyc.gate_tasks(rnd)[:6]
    inc = SimpleNamespace(items=[{"task_id": t.id, "text": "I do not know."} for t in tasks])
    cand_texts = [t.answer for t in tasks[:4]] + ["I do not know."] * 2  # 4 right answers against a refusal, 2 the same
    cand = SimpleNamespace(items=[{"task_id": t.id, "text": x} for t, x in zip(tasks, cand_texts)])
    pw = cyc.pairwise(rnd, inc, cand)
    assert (pw["items"], pw["judged"], pw["same_answer"]) == (6, 4, 2), pw
    assert cyc.store.teacher_usage(rnd)["pairwise"]["requests"] == 2 * 4  # both orders, only where the answers differ
    ties = pw["position_biased"] + pw["unparseable"]
    assert pw["wins"] + pw["losses"] + ties == pw["judged"], pw
    assert pw["win_rate"] == pytest.approx((pw["wins"] + 0.5 * (6 - pw["wins"] - pw["losses"])) / 6, abs=1e-4)
    assert pw["trusted"] == (pw["position_biased"] / pw["judged"] <= cyc.policy.scoring.teacher_judge.max_position_bias), pw
    print("real local pairwise judge:", pw)


@pytest.mark.parametrize("mode", ["ok", "biased"])
def test_the_pairwise_judge_asks_both_orders_and_a_position_following_judge_is_not_trusted(make_cycle, monkeypatch, mode):
    """The comparison itself, against a real teacher server on loopback (scripted: it prefers the
    answer with a digit, then the longer, in either order; 'biased' always picks the first), on
    answers that differ: wins and losses in both orders, ties for the same answer, and a judge
    that follows the position is flagged, whatever win rate it gives."""
    from types import SimpleNamespace

    with _fake_teacher(monkeypatch, mode) as teacher:
        cyc = make_cycle(_pairwise_policy(teacher.base_url, 0.5))
        rnd = cyc.store.create_round("base")
        ids = [t.id for t in cyc.gate_tasks(rnd)][:6]
        inc = SimpleNamespace(items=[{"task_id": t, "text": "no idea"} for t in ids])
        cand_texts = ["it is 4", "it is 12", "7", "no idea", "hmm", "no idea"]  # 3 better, 1 worse ("hmm" is shorter), 2 the same
        cand = SimpleNamespace(items=[{"task_id": t, "text": x} for t, x in zip(ids, cand_texts)])
        pw = cyc.pairwise(rnd, inc, cand)
        asked = sum(teacher.served.values())
    assert asked == 2 * 4  # both orders, only where the answers differ
    assert (pw["items"], pw["judged"], pw["same_answer"]) == (6, 4, 2), pw
    if mode == "ok":
        assert (pw["wins"], pw["losses"], pw["position_biased"], pw["trusted"]) == (3, 1, 0, True), pw
        assert pw["win_rate"] == pytest.approx((3 + 0.5 * 2) / 6, abs=1e-4)
    else:
        assert (pw["wins"], pw["losses"], pw["position_biased"], pw["win_rate"], pw["trusted"]) == (0, 0, 4, 0.5, False), pw
        assert "followed the answers' position in 4 of 4 comparisons" in pw["problem"]


def test_teacher_calls_are_counted_by_use_and_a_spent_budget_stops_the_teacher_then_the_daemon(make_cycle, monkeypatch, tmp_path):
    """Against a real teacher server on loopback (it reports 10 prompt tokens and 3 answered ones
    a request): every label request is counted as it is made, per round and by use, equal to what
    the server served; the labels spend stopping.max_teacher_tokens, so the round's revisions are
    refused with the budget named (the round goes on without them: its labels are kept, nothing
    more is asked), and the stopping policy ends the run with the round decided."""
    tasks = tmp_path / "animals.jsonl"  # answers the tiny model never gives: every train task is unsolved
    tasks.write_text("".join(json.dumps({"prompt": f"Name animal number {i}.", "answer": f"zebra{i}", "verifier": "exact"}) + "\n"
                             for i in range(40)))
    with _fake_teacher(monkeypatch, "ok") as teacher:
        cyc = make_cycle(COLLECT, {"tasks": {"per_round": 6, "sources": [{"type": "jsonl", "path": str(tasks)}]},
                                   "teacher": {"kind": "openai", "max_tokens": 16,
                                               "endpoint": {"base_url": teacher.base_url, "model": "t", "api_key_env": "SD_TEST_TEACHER_KEY"}},
                                   "scoring": {"teacher_label": True, "teacher_revise": True},
                                   "stopping": {"max_teacher_tokens": 30, "stop_when_tasks_exhausted": False}})
        assert cyc.stop_reason()[0] is None
        with pytest.raises(StopRequested, match="teacher budget"):
            cyc.run_round()
        served = sum(teacher.served.values())
        with pytest.raises(StopRequested, match="teacher budget"):
            cyc.run_round()  # nothing starts, nothing is asked
        assert sum(teacher.served.values()) == served
    (rnd,) = cyc.store.rounds()
    train = [t for t in cyc.store.round_tasks(rnd.id) if t.split == "train"]
    used = cyc.store.teacher_usage(rnd.id)
    # the tiny model solves nothing: a label for every train task (13 tokens each, >= 30 in all)
    assert len(train) >= 3 and rnd.status == "done"
    assert used == {"label": {"requests": len(train), "prompt_tokens": 10 * len(train), "completion_tokens": 3 * len(train),
                              "tokens": 13 * len(train)}} and served == len(train), used
    msgs = [e["message"] for e in cyc.store.events("teacher_unavailable")]
    assert len(msgs) == 1 and msgs[0].startswith("teacher revised answers skipped this round: teacher ")
    assert f"token budget spent ({13 * len(train)} tokens used, stopping.max_teacher_tokens = 30)" in msgs[0]
    assert cyc.stop_reason()[0] == f"teacher budget: {13 * len(train)} teacher tokens used (limit 30)"


def test_the_audit_split_is_measured_for_the_base_and_each_promotion_and_decides_nothing(make_cycle):
    """tasks.audit_fraction > 0: the base and every promoted checkpoint answer the audit items once
    (after the promotion is committed); no round samples, trains or gates on them; a rejected
    candidate is never measured there; status gives the figures."""
    from selfdistill.cli import status_dict

    cyc = make_cycle({"tasks": {"audit_fraction": 0.25}, "evaluation": {"audit_items": 6}})
    audit_ids = {t.id for t in cyc.store.tasks(split="audit")}
    assert len(audit_ids) >= 6
    r1 = cyc.run_round()
    assert r1.decision == "promote", r1.reasons
    evs = cyc.store.evaluations("audit")
    assert sorted(e.checkpoint_id for e in evs) == ["base", "ckpt-000001"]
    assert all(e.metrics["n"] == 6 and len(items := cyc.store.latest_evaluation(e.checkpoint_id, "audit").items) == 6
               and {i["task_id"] for i in items} <= audit_ids for e in evs)
    _policy_with(cyc, gates={"min_gain": 0.99, "test": "none"})  # the next candidate is rejected
    r2 = cyc.run_round()
    assert r2.decision == "reject" and len(cyc.store.evaluations("audit")) == 2
    used = {g["task_id"] for r in (r1, r2) for g in cyc.store.generations(r.id, "train")}
    gated = {i["task_id"] for c in ("base", "ckpt-000001", "ckpt-000002") for i in cyc.store.latest_evaluation(c, "heldout").items}
    assert used and gated and not (used | gated) & audit_ids
    assert not any("audit" in x for r in cyc.store.rounds() for x in (r.reasons or []))
    st = status_dict(cyc.policy)
    assert st["audit_current_metrics"] == next(e.metrics for e in evs if e.checkpoint_id == "ckpt-000001")
    assert st["audit_base_metrics"] == next(e.metrics for e in evs if e.checkpoint_id == "base")


def test_a_conversation_task_is_asked_trained_and_evaluated_as_its_turns(make_cycle, tmp_path, monkeypatch):
    """Multi-turn tasks (`messages` in a JSONL line) through a real round: the student is asked
    every turn with the suffix on the last, the stored SFT rows and pairs carry the conversation,
    the training child renders it, and the held-out evaluation asks the same turns."""
    from selfdistill.engines.hf import TransformersEngine
    from selfdistill.records import conversation

    talk = tmp_path / "talk.jsonl"
    talk.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"I have {i} pens."},
                                                     {"role": "assistant", "content": f"You have {i} pens."},
                                                     {"role": "user", "content": "I get 1 more. How many now?"}],
                                        "answer": str(i + 1)}) + "\n" for i in range(40)))
    asked = []
    real = TransformersEngine.generate

    def spy(self, prompts, *a, **kw):
        asked.extend(prompts)
        return real(self, prompts, *a, **kw)

    monkeypatch.setattr(TransformersEngine, "generate", spy)
    cyc = make_cycle({"tasks": {"sources": [{"type": "jsonl", "path": str(talk)}], "prompt_suffix": " Number only."},
                      "training": {"max_length": 256}})  # three turns and a chat template: longer than one question
    rnd = cyc.run_round()
    assert rnd.decision in ("promote", "reject"), rnd.reasons
    turns = [m for m in asked if isinstance(m, list) and len(m) == 3]
    assert turns and all(m[1]["role"] == "assistant" and m[2]["content"].endswith("How many now? Number only.") for m in turns)
    data = cyc.store.training_data(rnd.id)
    rows = list(data.sft) + list(data.pairs)
    assert rows and all(conversation(r.prompt)[-1]["content"].endswith(" Number only.") for r in rows)
    assert cyc.store.latest_evaluation(rnd.candidate_id, "heldout") is not None


def test_the_teacher_labels_the_self_judges_anchors_once_and_the_store_keeps_them(make_cycle, monkeypatch, tmp_path):
    """scoring.self_judge.teacher_anchors on tasks with no verifier and no anchor file: in round 1
    the teacher (a real server on loopback, scripted to call an answer with a digit good) labels 6
    of the student's answers, kept in the store with their provenance and counted as its 'anchor'
    use, and the self judge is measured on them (the tiny student judges garbage: refused, no row).
    Round 2 asks the teacher nothing more and measures the judge on the same stored labels."""
    tasks = tmp_path / "open.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"Item {i}?"}) + "\n" for i in range(40)))
    with _fake_teacher(monkeypatch, "ok") as teacher:
        cyc = make_cycle(COLLECT, {
            "teacher": {"kind": "openai", "max_tokens": 16,
                        "endpoint": {"base_url": teacher.base_url, "model": "t", "api_key_env": "SD_TEST_TEACHER_KEY"}},
            "tasks": {"per_round": 6, "default_verifier": "auto", "sources": [{"type": "jsonl", "path": str(tasks)}]},
            "engine": {"max_model_len": 1024}, "generation": {"temperature": 1.0},
            "scoring": {"self_judge": {"enabled": True, "teacher_anchors": 6, "anchor_size": 6, "recheck_every_rounds": 1}}})
        r1 = cyc.run_round()
        stored = cyc.store.teacher_anchors()
        r2 = cyc.run_round()
    assert len(stored) == 6 and {r["round_id"] for r in stored} == {r1.id}, stored
    assert all(r["kind"] == "verdict" and r["teacher"] == f"{teacher.base_url} t" and len(r["generation_ids"]) == 1 and r["details"]["score_1_10"] in (2, 9)
               for r in stored), stored
    assert all(r["good"] == int(any(c.isdigit() for c in r["answer"])) for r in stored)  # the teacher's rule, as stored
    assert cyc.store.teacher_anchors() == stored  # round 2 added none
    assert cyc.store.teacher_usage(r1.id)["anchor"]["requests"] >= 6 and "anchor" not in cyc.store.teacher_usage(r2.id)
    health = cyc.store.query("SELECT round_id, healthy, details FROM judge_health WHERE judge = 'self' ORDER BY id")
    assert [h["round_id"] for h in health] == [r1.id, r2.id], health
    for h in health:
        assert json.loads(h["details"])["anchors"] == {"file_items": 0, "teacher_items": 6, "verifier_items": 0}, h
        assert not h["healthy"]
    assert not [s_ for s_ in cyc.store.scores_for_round(r1.id) if s_["scorer"].startswith("self")]


def test_a_judge_calibrated_on_an_anchor_file_trains_verifier_less_tasks_and_one_that_fails_adds_nothing(make_cycle, monkeypatch, tmp_path):
    """Tasks with no verifier at all (no answer, default_verifier auto). The teacher judge (a real
    server on loopback, scripted to call an answer with a digit good) agrees with the anchor file
    and scores every answer; the tiny student, asked to judge itself on the same file, answers
    garbage, fails its check and contributes no row. The teacher's scores make the pairs and SFT
    rows a round trains on, the held-out items (no verifier either) are compared by the pairwise
    judge alone, and the candidate is promoted on its win rate."""
    tasks = tmp_path / "open.jsonl"  # open-ended: nothing can check an answer but a judge
    tasks.write_text("".join(json.dumps({"prompt": f"Item {i}?"}) + "\n" for i in range(40)))
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": f"Item {i}?", "answer": a, "verdict": v}  # short: the tiny model's context (512) must hold the judge's prompt
        for i in range(100, 104) for a, v in ((f"{i % 7} parts", True), ("nice", False))]))
    judge = {"enabled": True, "anchors": str(anchors), "anchor_size": 8, "min_agreement": 0.75}
    with _fake_teacher(monkeypatch, "ok") as teacher:
        cyc = make_cycle(_pairwise_policy(teacher.base_url, 0.5), {
            "tasks": {"per_round": 12, "default_verifier": "auto", "sources": [{"type": "jsonl", "path": str(tasks)}]},
            "engine": {"max_model_len": 1024}, "generation": {"temperature": 1.0},
            "pairs": {"strategy": "best_vs_worst", "sft_from": "top"},
            "scoring": {"teacher_judge": judge, "self_judge": judge}})
        rnd = cyc.run_round()
    health = {h["judge"]: h for h in cyc.store.query("SELECT * FROM judge_health")}
    assert health["teacher"]["healthy"] and health["teacher"]["agreement"] == 1.0, health
    assert "self" in health and not health["self"]["healthy"], (health, [e["message"] for e in cyc.store.events()])
    for h in health.values():  # measured on the file alone: this round has no verifier verdict
        details = json.loads(h["details"])
        assert details["anchors"]["file_items"] == 8 and details["anchors"]["verifier_items"] == 0, details
        assert details["anchors"]["file"] == str(anchors) and len(details["anchors"]["sha256"]) == 64
    score_phase = cyc.store.query("SELECT counts FROM phases WHERE round_id = ? AND phase = 'score'", (rnd.id,))[0]
    assert json.loads(score_phase["counts"])["unscored_tasks"] == 0  # the teacher scored every task
    from selfdistill.store import canned_queries

    shown = cyc.store.query(canned_queries()["judge_health"])  # what an operator's canned query shows
    assert {(r["judge"], r["healthy"], r["from_file"], r["from_verifier"], r["anchor_file"]) for r in shown} == {
        ("teacher", 1, 8, 0, str(anchors)), ("self", 0, 8, 0, str(anchors))}, shown
    scorers = {s_["scorer"] for s_ in cyc.store.scores_for_round(rnd.id)}
    assert scorers == {"teacher:pointwise"}, scorers  # no verifier row, no row of the judge that failed
    pairs = cyc.store.query("SELECT count(*) AS n FROM pairs WHERE round_id = ?", (rnd.id,))[0]["n"]
    sft = cyc.store.query("SELECT count(*) AS n FROM sft_examples WHERE round_id = ?", (rnd.id,))[0]["n"]
    assert pairs > 0 and sft > 0, (pairs, sft, rnd.reasons)
    m = cyc.store.get_round(rnd.id).metrics
    assert m["candidate_accuracy"] is None and m["pairwise"]["trusted"], m
    assert rnd.decision == "promote", rnd.reasons
    assert any("none of the" in r and "has a verifier (the pairwise win rate decides)" in r for r in rnd.reasons), rnd.reasons
    # without the teacher, no scorer is left that may score these tasks: they are skipped and counted
    _policy_with(cyc, scoring={"teacher_judge": {"enabled": False}}, evaluation={"pairwise_judge": "self"}, **COLLECT)
    r2 = cyc.run_round()
    counts = json.loads(cyc.store.query("SELECT counts FROM phases WHERE round_id = ? AND phase = 'score'", (r2.id,))[0]["counts"])
    train2 = [t for t in cyc.store.round_tasks(r2.id) if t.split == "train"]
    assert counts == {"scores": 0, "unscored_tasks": len(train2)} and train2, counts
    assert cyc.store.query("SELECT count(*) AS n FROM pairs WHERE round_id = ?", (r2.id,))[0]["n"] == 0


def test_anchored_rejection_pairs_the_rounds_answers_with_the_bases_and_keeps_them_apart(make_cycle):
    """pairs.rejected_from = "base": after the base stops being the incumbent, every pair's rejected
    side is one of the base's answers to the task (copied where the base answered it in an earlier
    round, sampled from the base where not), the chosen side the round's own; the base's answers
    are scored in the round but never counted as the round's samples."""
    cyc = make_cycle({"tasks": {"per_round": 24}, "pairs": {"rejected_from": "base", "anchor_samples": 2}})
    r1 = cyc.run_round()
    assert r1.decision == "promote", r1.reasons
    assert cyc.store.generations(1, "anchor") == []  # the base was the incumbent: its answers are the round's own
    r2 = cyc.run_round()
    assert r2.incumbent_id == r1.candidate_id
    first = {g["id"]: g for g in cyc.store.generations(1, "train")}
    anchors = cyc.store.generations(2, "anchor")
    tasks2 = {t.id for t in cyc.store.round_tasks(2)}
    assert {a["task_id"] for a in anchors} == tasks2 and {a["checkpoint_id"] for a in anchors} == {"base"}
    copied = [a for a in anchors if "copied_from" in a["params"]]
    sampled = [a for a in anchors if "copied_from" not in a["params"]]
    assert copied and sampled  # round 2 met tasks round 1 asked, and new ones
    for a in copied:
        orig = first[a["params"]["copied_from"]]
        assert (orig["task_id"], orig["text"], orig["checkpoint_id"]) == (a["task_id"], a["text"], "base")
    per_task = {t: sum(1 for a in anchors if a["task_id"] == t) for t in tasks2}
    assert max(per_task.values()) <= 2
    assert {a["task_id"] for a in sampled}.isdisjoint({g["task_id"] for g in first.values()})
    assert all(len([a for a in sampled if a["task_id"] == t]) == 2 for t in {a["task_id"] for a in sampled})

    sides = cyc.store.query(
        "SELECT c.round_id AS c_round, c.purpose AS c_purpose, c.checkpoint_id AS c_ckpt, r.round_id AS r_round, "
        "r.purpose AS r_purpose, r.checkpoint_id AS r_ckpt FROM pairs p JOIN generations c ON c.id = p.chosen_gen_id "
        "JOIN generations r ON r.id = p.rejected_gen_id WHERE p.round_id = 2")
    assert sides, "no pair formed in round 2"
    for s in sides:
        assert (s["c_round"], s["c_purpose"], s["c_ckpt"]) == (2, "train", r1.candidate_id)
        assert (s["r_round"], s["r_purpose"], s["r_ckpt"]) == (2, "anchor", "base")
    # the base's answers are scored in round 2, but the tasks' pass-rate counts hold only the rounds' own samples
    assert len(cyc.store.scores_for_round(2, "anchor")) == len(anchors)
    attempts = cyc.store.query("SELECT sum(attempts) AS n FROM tasks")[0]["n"]
    assert attempts == len(first) + len(cyc.store.generations(2, "train"))
