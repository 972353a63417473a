"""Self-instruct expansion: parsing and filtering tables, dedup with a fake engine that returns
known text, and the real transformers engine on a tiny random model (junk, all filtered)."""

import random
from collections import Counter

import pytest

from selfdistill.config import EngineConfig, ExpansionSource
from selfdistill.engines.base import Completion, SamplingParams
from selfdistill.records import TaskIn
from selfdistill.tasks.expansion import build_request, expand_tasks, parse_reply

SEEDS = [
    TaskIn(source="jsonl:s", prompt="What is the capital of France?", answer="Paris", verifier="normalized", category="geo"),
    TaskIn(source="jsonl:s", prompt="What is the capital of Japan?", answer="Tokyo", verifier="normalized", category="geo"),
    TaskIn(source="jsonl:s", prompt="Which river flows through Cairo?", answer="The Nile", verifier="normalized", category="geo"),
]


@pytest.mark.parametrize("reply,expected", [
    ("### Task\nWhich ocean lies west of Portugal?\n### Answer\nThe Atlantic", ("Which ocean lies west of Portugal?", "The Atlantic")),
    ("  ### Task\nWhich ocean lies west of Portugal?\n### Answer\nAtlantic\n", ("Which ocean lies west of Portugal?", "Atlantic")),
    ("Sure! ### Task\nWhich ocean lies west of Portugal?\n### Answer\nAtlantic", "format"),   # chatter before
    ("### Task\nWhich ocean lies west of Portugal?", "format"),                               # no answer
    ("### Task\nWhich sea?\n### Answer\nRed", "length"),
    ("### Task\n" + "Name a sea. " * 200 + "\n### Answer\nRed", "length"),
    ("### Task\n@@##$$%%^^&&**~~||{{}}ab cd\n### Answer\nx", "junk"),
    ("### Task\n12345 67890 12345 678\n### Answer\n3", "junk"),                              # no words at all
    ("### Task\nName the capital of Peru (it is Lima).\n### Answer\nLima", "answer_leak"),
    ("### Task\nHow many legs has a spider? 8 is common.\n### Answer\n8", ("How many legs has a spider? 8 is common.", "8")),
    ("### Task\nWhich sea is <answer>red</answer>?\n### Answer\nRed", "debris"),
    ("### Task\nWhich sea?\n### Task\nAnother one here\n### Answer\nRed", "debris"),
])
def test_parse_reply_table(reply, expected):
    assert parse_reply(reply, want_answer=True) == expected


def test_request_shows_examples_in_the_reply_format():
    req = build_request(SEEDS[:2])
    assert "### Task\nWhat is the capital of France?\n### Answer\nParis" in req
    assert req.rstrip().endswith("### Answer\n<its answer>")


class FakeEngine:
    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts = []

    def generate(self, prompts, params, adapter=None):
        self.prompts += prompts
        return [[Completion(self.replies.pop(0), 10, 10, "stop")] for _ in prompts]


def test_dedup_exact_near_and_against_known():
    replies = [
        "### Task\nWhich country has Rome as its capital?\n### Answer\nItaly",       # new
        "### Task\nWhich country has  Rome as its capital?\n### Answer\nItaly",      # exact duplicate (after normalising)
        "### Task\nwhich country has Rome as its capital city?\n### Answer\nItaly",  # near duplicate
        "### Task\nWhat is the capital of France?\n### Answer\nParis",               # a seed
        "### Task\nWhich mountain range separates Spain and France?\n### Answer\nThe Pyrenees",  # new
        "### Task\nHow many moons does Mars have?\n### Answer\n2",                   # known from the store
        "garbage",
    ]
    cfg = ExpansionSource(type="expansion", by="teacher", per_round=len(replies), examples_per_prompt=2, max_similarity=0.7)
    res = expand_tasks(FakeEngine(replies), SEEDS, cfg, ["How many moons does Mars have ?"], random.Random(0))
    assert [t.prompt for t in res.tasks] == ["Which country has Rome as its capital?", "Which mountain range separates Spain and France?"]
    assert res.rejected == Counter({"duplicate": 2, "near_duplicate": 2, "format": 1})
    t = res.tasks[0]
    assert (t.source, t.answer, t.verifier, t.category) == ("expansion:teacher", "Italy", "normalized", "geo")
    assert len(t.metadata["expanded_from"]) == 2 and res.asked == len(replies)


def test_no_seeds():
    res = expand_tasks(FakeEngine([]), [], ExpansionSource(type="expansion"), [], random.Random(0))
    assert res.tasks == [] and res.rejected == Counter({"no_seeds": 1})


def test_tiny_model_through_transformers_engine_is_all_filtered(tmp_path):
    from selfdistill.engines.hf import TransformersEngine
    from selfdistill.models import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny")
    engine = TransformersEngine(model_dir, EngineConfig(kind="transformers", dtype="float32", batch_size=8, threads=1), seed=0)
    try:
        cfg = ExpansionSource(type="expansion", by="student", per_round=4, examples_per_prompt=2)
        res = expand_tasks(engine, SEEDS, cfg, [], random.Random(1), params=SamplingParams(n=1, temperature=1.0, max_tokens=24))
    finally:
        engine.close()
    assert res.asked == 4
    assert res.tasks == []  # random weights write junk ...
    assert sum(res.rejected.values()) == 4 and set(res.rejected) <= {"format", "junk", "length", "debris"}  # ... and every one is counted
