"""vLLM against the reference: greedy tokens and scores must agree with transformers + peft on
the same model and adapter (float32 in both)."""

from __future__ import annotations

import pytest

from selfdistill.engines.base import AdapterRef, SamplingParams

pytestmark = pytest.mark.vllm

TINY_PROMPTS = [[{"role": "user", "content": q}] for q in ("hello", "2+2=?", "name a colour", "sort: c b a")]
STUDENT_PROMPTS = [
    [{"role": "user", "content": "What is 3 + 4?"}],
    [{"role": "user", "content": "Name a fruit that is yellow."}],
]


def _texts(out):
    return [cs[0].text for cs in out]


def test_tiny_greedy_and_scores_agree(vllm_tiny, hf_tiny, adapters):
    g = SamplingParams(temperature=0.0, max_tokens=24)
    base_v, base_h = vllm_tiny.generate(TINY_PROMPTS, g), hf_tiny.generate(TINY_PROMPTS, g)
    assert _texts(base_v) == _texts(base_h)
    assert len(set(_texts(base_v))) > 1  # the prompts lead to different text: not a vacuous match
    for eng in (vllm_tiny, hf_tiny):
        eng.load_adapter(AdapterRef("agree", str(adapters["a"])))
    lora_v = vllm_tiny.generate(TINY_PROMPTS, g, adapter="agree")
    lora_h = hf_tiny.generate(TINY_PROMPTS, g, adapter="agree")
    assert _texts(lora_v) == _texts(lora_h) != _texts(base_v)
    sv = vllm_tiny.score(TINY_PROMPTS, _texts(base_v), adapter="agree")
    sh = hf_tiny.score(TINY_PROMPTS, _texts(base_v), adapter="agree")
    for (a, n), (b, m) in zip(sv, sh):
        assert n == m and a == pytest.approx(b, rel=1e-3, abs=1e-3)
    for eng in (vllm_tiny, hf_tiny):
        eng.drop_adapter("agree")


@pytest.mark.slow
def test_student_greedy_and_scores_agree(vllm_student, hf_student, student_adapter):
    g = SamplingParams(temperature=0.0, max_tokens=10)
    base_v, base_h = vllm_student.generate(STUDENT_PROMPTS, g), hf_student.generate(STUDENT_PROMPTS, g)
    assert _texts(base_v) == _texts(base_h)
    assert all(t.strip() for t in _texts(base_v))
    for eng in (vllm_student, hf_student):
        eng.load_adapter(AdapterRef("s1", str(student_adapter)))
    lora_v = vllm_student.generate(STUDENT_PROMPTS, g, adapter="s1")
    lora_h = hf_student.generate(STUDENT_PROMPTS, g, adapter="s1")
    assert _texts(lora_v) == _texts(lora_h)
    sv = vllm_student.score(STUDENT_PROMPTS, _texts(base_v), adapter="s1")
    sh = hf_student.score(STUDENT_PROMPTS, _texts(base_v), adapter="s1")
    for (a, n), (b, m) in zip(sv, sh):
        assert n == m and a == pytest.approx(b, rel=1e-2, abs=1e-2)
