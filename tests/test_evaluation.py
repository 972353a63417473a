"""Evaluation through an Engine: a fake engine where the engine is not the subject, and the real
transformers engine on a tiny local model for the forgetting guard."""

import pytest

from selfdistill.config import GateConfig
from selfdistill.engines.base import Completion, SamplingParams
from selfdistill.errors import EngineError
from selfdistill.evaluation import (
    anchor_nll,
    anchor_references,
    evaluate_heldout,
    repetition,
    sanity_stats,
)
from selfdistill.gates import SanityStats, decide
from selfdistill.records import Task, chat_messages


class FakeEngine:
    """Answers from a table per adapter; scores from a fixed per-token log-probability per adapter."""

    def __init__(self, answers, logprob_per_token=None):
        self.answers = answers  # adapter -> {prompt text -> answer}
        self.logprob_per_token = logprob_per_token or {}
        self.calls = []

    def generate(self, prompts, params, adapter=None):
        self.calls.append(("generate", params, adapter))
        table = self.answers[adapter]
        out = []
        for p in prompts:
            text = table[p if isinstance(p, str) else p[-1]["content"]]
            out.append([Completion(text=text, prompt_tokens=5, completion_tokens=len(text.split()), finish_reason="stop")])
        return out

    def score(self, prompts, completions, adapter=None):
        lp = self.logprob_per_token[adapter]
        return [(lp * len(c.split()), len(c.split())) for c in completions]


def tasks():
    qs = [("1+1", "2", "add"), ("2+2", "4", "add"), ("3+3", "6", "add"), ("5-3", "2", "sub"), ("9-1", "8", "sub")]
    return [Task(source="t", prompt=q, answer=a, category=c, id=i + 1, split="heldout") for i, (q, a, c) in enumerate(qs)]


def verify(text, task):
    ok = text.strip().split()[-1:] == [task.answer] if text.strip() else False
    return (1.0 if ok else 0.0), ok


def build(task):
    return chat_messages(task.prompt)


def test_evaluate_heldout_greedy_items_and_metrics():
    eng = FakeEngine({"c1": {"1+1": "it is 2", "2+2": "4", "3+3": "", "5-3": "2", "9-1": "a b c d a b c d"}})
    res = evaluate_heldout(eng, "c1", tasks(), verify, build, max_tokens=32)
    (_, params, adapter), = eng.calls
    assert params == SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=32) and adapter == "c1"
    assert [(it.task_id, it.correct, it.score, it.tokens) for it in res.items] == [
        (1, True, 1.0, 3), (2, True, 1.0, 1), (3, False, 0.0, 0), (4, True, 1.0, 1), (5, False, 0.0, 8),
    ]
    m = res.metrics
    assert (m["n"], m["accuracy"]) == (5, 0.6)
    assert m["ci_low"] == pytest.approx(0.2307, abs=1e-4) and m["ci_high"] == pytest.approx(0.8824, abs=1e-4)
    assert m["per_category"]["add"]["accuracy"] == pytest.approx(2 / 3)
    assert m["per_category"]["sub"]["n"] == 2
    assert m["empty_fraction"] == 0.2
    assert m["repetition"] == pytest.approx((1 / 5) / 5)  # one answer with 1 repeated 4-gram of 5
    assert m["mean_length"] == pytest.approx(13 / 5)


def test_candidate_vs_incumbent_end_to_end_through_the_gate():
    ts = [Task(source="t", prompt=f"q{i}", answer="x", category="", id=i, split="heldout") for i in range(40)]
    inc = {f"q{i}": ("y x" if i < 10 else "y z") for i in range(40)}
    cand = {f"q{i}": ("y x" if i < 30 else "y z") for i in range(40)}
    eng = FakeEngine({None: inc, "c1": cand}, {None: -1.0, "c1": -1.1})
    anchors = [chat_messages("sea"), chat_messages("capital")]
    refs = ["the sea is big", "paris"]
    r_inc = evaluate_heldout(eng, None, ts, verify, build, 16)
    r_cand = evaluate_heldout(eng, "c1", ts, verify, build, 16)
    d = decide(
        r_cand.to_metrics(anchor_nll=anchor_nll(eng, "c1", anchors, refs)),
        r_inc.to_metrics(anchor_nll=anchor_nll(eng, None, anchors, refs)),
        GateConfig(),
    )
    assert d.promote, d.reasons
    assert d.numbers["gain"] == pytest.approx(0.5)
    assert d.numbers["anchor_nll_increase"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "text,rep",
    [
        ("", 0.0),
        ("one two three", 0.0),
        ("a b c d e f", 0.0),
        ("a b c d a b c d", 1 / 5),  # grams abcd bcda cdab dabc abcd: 1 repeat of 5
        ("x x x x x x x x x x", 6 / 7),  # 7 grams, 1 distinct
    ],
)
def test_repetition(text, rep):
    assert repetition(text) == pytest.approx(rep)


def test_sanity_stats():
    s = sanity_stats(["", "  ", "fine answer", "x x x x x"], [0, 1, 2, 5])
    assert s == SanityStats(empty_fraction=0.5, repetition=pytest.approx((1 / 2) / 4), mean_length=2.0)


def test_anchor_references_refuse_an_all_empty_base():
    eng = FakeEngine({None: {"a": "", "b": ""}})
    with pytest.raises(EngineError, match="answered all 2 anchor prompts with nothing"):
        anchor_references(eng, ["a", "b"], 8)


# ---------------------------------------------------------------------------------------------
# the real transformers engine on a tiny model: the forgetting guard must see damage


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from selfdistill.models import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    model_dir = build_tiny_model(root / "model", hidden_size=64, num_layers=2, num_heads=2, seed=0)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # A random tiny model's logits are nearly flat (about ln(vocab) NLL for anything), so no
    # adapter could raise them much; sharpen them so the base has answers it is sure of.
    sharp = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        sharp.get_input_embeddings().weight.mul_(30.0)
    sharp.save_pretrained(str(model_dir))

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = {}
    for name, init in (("zero", True), ("damaged", False)):
        torch.manual_seed(1)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir))
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=targets, init_lora_weights=init))
        if name == "damaged":
            with torch.no_grad():
                for n_, p in peft_model.named_parameters():
                    if "lora_B" in n_:
                        p.mul_(20.0)
        peft_model.save_pretrained(str(root / name))
        adapters[name] = root / name
    return model_dir, adapters


def test_forgetting_guard_sees_a_damaged_adapter_and_not_a_zero_one(tiny):
    from selfdistill.config import EngineConfig
    from selfdistill.engines.base import AdapterRef
    from selfdistill.engines.hf import TransformersEngine

    model_dir, adapters = tiny
    eng = TransformersEngine(model_dir, EngineConfig(kind="transformers", dtype="float32", batch_size=8))
    for name, path in adapters.items():
        eng.load_adapter(AdapterRef(name=name, path=str(path)))
    prompts = [chat_messages(p) for p in ("Write one sentence about the sea.", "What is 2+2?", "Name a colour.")]
    refs = anchor_references(eng, prompts, max_tokens=24)
    assert len(refs) == 3 and all(refs)  # a random tiny model answers with newlines: still tokens
    base = anchor_nll(eng, None, prompts, refs)
    zero = anchor_nll(eng, "zero", prompts, refs)
    damaged = anchor_nll(eng, "damaged", prompts, refs)
    assert zero == pytest.approx(base, abs=1e-5)
    assert damaged > base + 1.0, (base, damaged)

    # the same answers, so only the guard can decide
    ts = [Task(source="t", prompt=f"{i}+{i}=", answer=str(2 * i), id=i + 1, split="heldout") for i in range(6)]
    res_base = evaluate_heldout(eng, None, ts, verify, build, max_tokens=8)
    res_zero = evaluate_heldout(eng, "zero", ts, verify, build, max_tokens=8)
    assert [it.text for it in res_zero.items] == [it.text for it in res_base.items]
    # a random model answers with whitespace: sanity is not the subject here
    cfg = GateConfig(test="none", max_empty_fraction=1.0)
    ok = decide(res_zero.to_metrics(anchor_nll=zero), res_base.to_metrics(anchor_nll=base), cfg)
    assert ok.promote, ok.reasons
    bad = decide(res_zero.to_metrics(anchor_nll=damaged), res_base.to_metrics(anchor_nll=base), cfg)
    assert not bad.promote
    assert any("anchor NLL" in r and "> max_anchor_nll_increase" in r for r in bad.reasons)
    eng.close()
