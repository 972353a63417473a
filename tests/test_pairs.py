"""Pairs and SFT examples from scored candidates: table tests, and the TRL files read back."""

import json
import subprocess
import sys

import pytest

from selfdistill.config import PairsConfig
from selfdistill.pairs import (
    build_pairs,
    build_sft,
    candidate_from,
    export_jsonl,
    export_sft_jsonl,
    similarity,
)
from selfdistill.records import Candidate


def C(text, score, correct=None, source="verifier", tokens=0, gid=None):
    return Candidate(task_id=1, text=text, score=score, correct=correct, source=source, tokens=tokens, generation_id=gid)


PROMPTS = {1: "What is 2 + 3?", 2: "What is 4 + 4?"}


@pytest.mark.parametrize("a,b,expected", [
    ("the answer is 5", "the answer is 5", 1.0),
    ("the answer is 5", "The Answer is 5", 1.0),
    ("a b c d", "e f g h", 0.0),
    ("a b c d", "a b x d", 0.75),
    ("", "", 1.0),
    ("", "x", 0.0),
])
def test_similarity_table(a, b, expected):
    assert similarity(a, b) == pytest.approx(expected)


def test_similarity_early_exit_only_below_threshold():
    assert similarity("a b c d", "a b x d", at_least=0.9) == 0.0
    assert similarity("a b c d", "a b c d", at_least=0.9) == 1.0


CASES = [
    # strategy, candidates, expected (chosen, rejected) list
    ("verified_chosen",
     [C("it is 5", 1.0, True), C("it is 6", 0.0, False), C("it is 7 I think", 0.0, False)],
     [("it is 5", "it is 6"), ("it is 5", "it is 7 I think")]),
    ("verified_chosen",  # partial credit is not correct: no chosen side
     [C("it is 50", 0.5, False), C("it is 6", 0.0, False)], []),
    ("verified_chosen",  # all correct: nothing to reject
     [C("5", 1.0, True), C("five: 5", 1.0, True)], []),
    ("best_vs_worst",
     [C("x 5", 1.0, True), C("y 50", 0.5, False), C("z 6", 0.0, False)], [("x 5", "z 6")]),
    ("best_vs_worst",  # margin below min_margin (0.5)
     [C("x 5", 0.6), C("z 6", 0.3)], []),
    ("all_above_margin",
     [C("x 5", 1.0), C("y 50", 0.5), C("z 6", 0.0)], [("x 5", "z 6"), ("x 5", "y 50"), ("y 50", "z 6")]),
    ("verified_chosen",  # exact duplicates collapse before pairing
     [C("it is 5", 1.0, True), C("it  is 5", 1.0, True), C("it is 6", 0.0, False)], [("it is 5", "it is 6")]),
    ("verified_chosen",  # near-identical sides are not a pair
     [C("we add the two numbers and the sum of the two numbers is 5", 1.0, True),
      C("we add the two numbers and the sum of the two numbers is 6", 0.0, False)], []),
    ("verified_chosen",  # unscored (unparseable) candidates are ignored
     [C("it is 5", 1.0, True), C("it is 6", None)], []),
]


@pytest.mark.parametrize("strategy,cands,expected", CASES)
def test_build_pairs_table(strategy, cands, expected):
    cfg = PairsConfig(strategy=strategy, max_pairs_per_task=4)
    pairs = build_pairs({1: cands}, PROMPTS, cfg)
    assert [(p.chosen, p.rejected) for p in pairs] == expected
    for p in pairs:
        assert p.prompt == PROMPTS[1] and p.margin >= cfg.min_margin and p.weight == 1.0


def test_cap_and_diversity_first():
    good = [C(f"answer {i} is 5", 1.0, True) for i in range(3)]
    bad = [C(f"wrong {w} {i}", 0.0, False) for i, w in enumerate(["six", "seven", "eight"])]
    pairs = build_pairs({1: good + bad}, PROMPTS, PairsConfig(max_pairs_per_task=3))
    assert len(pairs) == 3
    assert len({p.chosen for p in pairs}) == 3 and len({p.rejected for p in pairs}) == 3


def test_length_match_drops_lopsided_pairs():
    cands = [C("5", 1.0, True, tokens=2), C("no " * 20 + "6", 0.0, False, tokens=21), C("it is 6", 0.0, False, tokens=3)]
    pairs = build_pairs({1: cands}, PROMPTS, PairsConfig(length_match=True, length_ratio_max=1.5))
    assert [(p.chosen, p.rejected) for p in pairs] == [("5", "it is 6")]
    assert len(build_pairs({1: cands}, PROMPTS, PairsConfig(length_match=False))) == 2


def test_weights_by_source_and_verifier_outranks_judges():
    # Task 1 has a verifier: judge-scored candidates of the same task are not used.
    cands = [C("it is 5", 1.0, True), C("it is 6", 0.0, False), C("judge loves this", 1.0, None, "self"), C("meh", 0.0, None, "self")]
    pairs = build_pairs({1: cands, 2: [C("eight", 0.9, None, "teacher"), C("nine", 0.1, None, "teacher")]},
                        PROMPTS, PairsConfig(strategy="best_vs_worst"))
    assert [(p.task_id, p.chosen, p.source, p.weight) for p in pairs] == [
        (1, "it is 5", "verifier", 1.0), (2, "eight", "teacher", 0.7)]


def test_unknown_source_weight_is_a_clear_error():
    with pytest.raises(ValueError, match=r"pairs.weights has no weight for signal source 'oracle'"):
        build_pairs({1: [C("a", 1.0, source="oracle"), C("b", 0.0, source="oracle")]}, PROMPTS, PairsConfig(strategy="best_vs_worst"))


def test_duplicate_pairs_across_tasks_with_same_prompt_are_dropped():
    cands = lambda: [C("it is 5", 1.0, True), C("it is 6", 0.0, False)]  # noqa: E731
    pairs = build_pairs({1: cands(), 3: cands()}, {1: PROMPTS[1], 3: PROMPTS[1]}, PairsConfig())
    assert len(pairs) == 1


def test_candidate_from_verifier_outranks_judge():
    c = candidate_from(1, "x", verifier_score=0.0, verifier_correct=False, judge_score=1.0)
    assert (c.score, c.correct, c.source) == (0.0, False, "verifier")
    c = candidate_from(1, "x", judge_score=0.8, judge_source="teacher")
    assert (c.score, c.correct, c.source) == (0.8, None, "teacher")


SFT_CASES = [
    ("verified", [C("it is 5", 1.0, True), C("so it is 5", 1.0, True), C("6", 0.0, False)], ["it is 5", "so it is 5"]),
    ("verified", [C("adding two and three gives five so the answer is 5 .", 1.0, True),
                  C("adding two and three gives five so the answer is 5 !", 1.0, True)],
     ["adding two and three gives five so the answer is 5 ."]),
    ("verified", [C("50", 0.5, False)], []),
    ("top", [C("a good one", 0.8, None, "self"), C("bad", 0.2, None, "self")], ["a good one"]),
    ("top", [C("zero", 0.0, None, "self")], []),
    ("none", [C("it is 5", 1.0, True)], []),
]


@pytest.mark.parametrize("sft_from,cands,expected", SFT_CASES)
def test_build_sft_table(sft_from, cands, expected):
    sft = build_sft({1: cands}, PROMPTS, PairsConfig(sft_from=sft_from, max_sft_per_task=2))
    assert [e.completion for e in sft] == expected


def test_sft_cap_prefers_shorter():
    cands = [C("well, adding them gives 5", 1.0, True), C("5", 1.0, True), C("it is 5", 1.0, True)]
    sft = build_sft({1: cands}, PROMPTS, PairsConfig(max_sft_per_task=2))
    assert [e.completion for e in sft] == ["5", "it is 5"]
    assert all(e.source == "verifier" for e in sft)


def test_export_reads_back_as_trl_conversational(tmp_path):
    from datasets import load_dataset
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    pairs = build_pairs({1: [C("it is 5", 1.0, True), C("it is 6", 0.0, False)]}, PROMPTS, PairsConfig())
    sft = build_sft({1: [C("it is 5", 1.0, True)]}, PROMPTS, PairsConfig())
    assert export_jsonl(pairs, tmp_path / "pairs.jsonl", system_prompt="Be brief.") == 1
    assert export_sft_jsonl(sft, tmp_path / "sft.jsonl", system_prompt="Be brief.") == 1
    dpo = load_dataset("json", data_files=str(tmp_path / "pairs.jsonl"), split="train")
    lm = load_dataset("json", data_files=str(tmp_path / "sft.jsonl"), split="train")
    assert set(dpo.column_names) == {"prompt", "chosen", "rejected"}
    assert is_conversational(dpo[0]) and is_conversational(lm[0])
    assert dpo[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]

    class Tok:  # ChatML, as the bundled student's template renders it
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, **kw):
            s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    row = maybe_apply_chat_template(dpo[0], Tok())
    assert row["prompt"].endswith("<|im_start|>assistant\n") and "it is 5" in row["chosen"] and "it is 6" in row["rejected"]
    assert json.loads((tmp_path / "sft.jsonl").read_text())["messages"][-1] == {"role": "assistant", "content": "it is 5"}


@pytest.mark.parametrize("modules", [
    "selfdistill.pairs, selfdistill.tasks.curriculum, selfdistill.scoring.health",  # pure
    # not pure, but nothing heavy at import time either: reasoning-gym and engines load lazily
    "selfdistill.tasks.sources, selfdistill.tasks.expansion, selfdistill.scoring.verifiers, "
    "selfdistill.scoring.judges, selfdistill.scoring.sandbox",
])
def test_modules_import_nothing_heavy(modules):
    code = (
        f"import sys; import {modules}; "
        "heavy = {'torch', 'vllm', 'transformers', 'peft', 'sqlite_utils', 'apscheduler', 'reasoning_gym'}; "
        "print(sorted(heavy & set(m.split('.')[0] for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_build_groups_keeps_informative_groups_and_counts_what_it_drops():
    from selfdistill.config import RLConfig
    from selfdistill.pairs import build_groups

    C = Candidate
    by_task = {
        1: [C(1, "4", 1.0, True, generation_id=1, tokens=2), C(1, "5", 0.0, False, generation_id=2, tokens=2),
            C(1, "4", 1.0, True, generation_id=3, tokens=2)],  # duplicates stay: k draws of one policy
        2: [C(2, "a", 0.0, False, generation_id=4), C(2, "b", 0.0, False, generation_id=5)],  # flat: no signal
        3: [C(3, "x", None, None, "self", generation_id=6), C(3, "y", float("nan"), None, "self", generation_id=7)],
        # a verifier outranks the judge in a task: the judged answer is not compared on another scale
        4: [C(4, "p", 1.0, True, generation_id=8, tokens=8), C(4, "q", 0.7, None, "self", generation_id=9),
            C(4, "r", 0.5, False, generation_id=10, tokens=8)],
    }
    prompts = {t: f"task {t}" for t in by_task}
    groups, counts = build_groups(by_task, prompts, RLConfig(), logprobs={1: ([7, 8], [-0.1, -0.2])},
                                  finish_reasons={10: "length"}, max_tokens=8)
    assert [g.task_id for g in groups] == [1, 4]
    assert [s.reward for s in groups[0].samples] == [1.0, 0.0, 1.0]
    assert groups[0].samples[0].token_ids == [7, 8] and groups[0].samples[1].logprobs is None
    assert counts == {"groups": 2, "flat_groups": 2, "dropped_samples": 3, "samples": 5, "with_logprobs": 1}
    # partial credit by default; 1/0 correct on request; shaping subtracts named terms
    shaped, _ = build_groups({4: by_task[4]}, prompts, RLConfig(reward="correct", length_penalty=0.1, truncation_penalty=0.5),
                             finish_reasons={10: "length"}, max_tokens=8)
    assert [round(s.reward, 3) for s in shaped[0].samples] == [0.9, -0.6]


@pytest.mark.parametrize("strategy", ["verified_chosen", "best_vs_worst", "all_above_margin"])
def test_anchored_rejection_chooses_among_the_rounds_answers_and_rejects_among_the_bases(strategy):
    own = [C("so it is 5", 1.0, True, gid=1), C("it is 7", 0.0, False, gid=2)]
    base = [C("it is 9", 0.0, False, gid=11), C("it is 7", 0.0, False, gid=12), C("5", 1.0, True, gid=13)]
    cfg = PairsConfig(strategy=strategy, max_pairs_per_task=8)
    pairs = build_pairs({1: own + base}, PROMPTS, cfg, chosen_ids={1, 2}, rejected_ids={11, 12, 13})
    assert {(p.chosen_gen_id, p.rejected_gen_id) for p in pairs} == {(1, 11), (1, 12)}
    # the base's "it is 7" is kept beside the round's own (the same text on the other side): without
    # the sides, exact duplicates collapse and the base's copy is lost
    plain = build_pairs({1: own + base}, PROMPTS, cfg)
    assert 12 not in {p.rejected_gen_id for p in plain}
    # nothing the round answered right, or nothing the base answered wrong: no pair
    assert build_pairs({1: own + base}, PROMPTS, cfg, chosen_ids={2}, rejected_ids={11, 12}) == []
    assert build_pairs({1: own + base}, PROMPTS, cfg, chosen_ids={1, 2}, rejected_ids={13}) == []
