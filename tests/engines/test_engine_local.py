"""One suite run against both in-process engines (vLLM, transformers) on the tiny model."""

from __future__ import annotations

import math

import pytest
from topk_check import assert_topk_matches

from selfdistill.config import EngineConfig
from selfdistill.engines.base import AdapterRef, SamplingParams
from selfdistill.errors import EngineError, ModelError

CHAT = [[{"role": "user", "content": f"What is {i} + {i + 1}?"}] for i in range(4)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


def test_generate_n_samples_with_counts(tiny_engine):
    out = tiny_engine.generate(CHAT + ["plain text prompt"], SamplingParams(n=3, temperature=1.0, max_tokens=12))
    assert len(out) == 5 and all(len(cs) == 3 for cs in out)
    for cs in out:
        for c in cs:
            assert c.prompt_tokens > 0
            assert 1 <= c.completion_tokens <= 12
            assert c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "length") == (c.completion_tokens == 12)
            assert c.logprobs is None
    # sampled at T=1 the three samples of a prompt differ
    assert len({c.text for c in out[0]}) > 1
    # the chat template is applied: a chat prompt is longer than its bare content
    assert out[0][0].prompt_tokens > len(CHAT[0][0]["content"])


def test_stop_string_cuts_the_text(tiny_engine):
    full = tiny_engine.generate(CHAT[:1], GREEDY)[0][0].text
    stop = full[3:5]
    cut = tiny_engine.generate(CHAT[:1], SamplingParams(temperature=0.0, max_tokens=16, stop=(stop,)))[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_logprobs_match_score(tiny_engine):
    (c,), = tiny_engine.generate(CHAT[:1], SamplingParams(temperature=0.0, max_tokens=10, logprobs=True))
    assert len(c.logprobs) == c.completion_tokens == 10
    assert all(lp <= 0 for lp in c.logprobs)
    (total, n), = tiny_engine.score(CHAT[:1], [c.text])
    assert n == 10
    assert total == pytest.approx(sum(c.logprobs), abs=1e-3)


def test_score_orders_likely_above_unlikely(tiny_engine):
    greedy = tiny_engine.generate(CHAT[:2], GREEDY)
    texts = [cs[0].text for cs in greedy]
    likely = tiny_engine.score(CHAT[:2], texts)
    unlikely = tiny_engine.score(CHAT[:2], ["~" * len(t) for t in texts])
    for (lp, n), (ulp, un) in zip(likely, unlikely):
        assert n == un == 16
        assert math.isfinite(lp) and lp > ulp
    assert tiny_engine.score(CHAT[:1], [""]) == [(0.0, 0)]


def test_adapter_versions_switch_and_coexist(tiny_engine, adapters):
    base = tiny_engine.generate(CHAT, GREEDY)
    tiny_engine.load_adapter(AdapterRef("v1", str(adapters["a"])))
    with_a = tiny_engine.generate(CHAT, GREEDY, adapter="v1")
    tiny_engine.load_adapter(AdapterRef("v2", str(adapters["b"])))
    with_b = tiny_engine.generate(CHAT, GREEDY, adapter="v2")
    texts = lambda out: [cs[0].text for cs in out]  # noqa: E731
    assert texts(with_a) != texts(base)
    assert texts(with_b) != texts(with_a)
    # the base is still served beside the adapters, and v1 still gives what it gave
    assert texts(tiny_engine.generate(CHAT, GREEDY)) == texts(base)
    assert texts(tiny_engine.generate(CHAT, GREEDY, adapter="v1")) == texts(with_a)
    tiny_engine.drop_adapter("v1")
    tiny_engine.drop_adapter("v2")
    tiny_engine.drop_adapter("never-loaded")
    with pytest.raises(EngineError, match="'v1' is not loaded"):
        tiny_engine.generate(CHAT, GREEDY, adapter="v1")


def test_same_name_new_path_serves_new_weights(tiny_engine, adapters):
    # vLLM serves stale weights when an id is reused; the engine must hand out a fresh one
    tiny_engine.load_adapter(AdapterRef("cur", str(adapters["a"])))
    a = tiny_engine.generate(CHAT, GREEDY, adapter="cur")
    tiny_engine.load_adapter(AdapterRef("cur", str(adapters["b"])))
    b = tiny_engine.generate(CHAT, GREEDY, adapter="cur")
    tiny_engine.drop_adapter("cur")
    assert [cs[0].text for cs in a] != [cs[0].text for cs in b]


@pytest.mark.parametrize(
    "which,match",
    [
        ("half", "half-written adapter"),
        ("wrong", "made for base model"),
        ("wrong_shapes", "made for another base"),
        ("missing", "adapter directory does not exist"),
    ],
)
def test_bad_adapters_are_refused(tiny_engine, adapters, tmp_path, which, match):
    path = adapters[which] if which != "missing" else tmp_path / "nope"
    with pytest.raises(ModelError, match=match) as e:
        tiny_engine.load_adapter(AdapterRef("bad", str(path)))
    assert str(path) in str(e.value)
    # the engine still works after a refusal
    assert tiny_engine.generate(CHAT[:1], GREEDY)[0][0].completion_tokens == 16


def test_too_long_prompt(tiny_engine):
    with pytest.raises(EngineError, match="prompt 1 has 300 tokens, the engine's context is 256"):
        tiny_engine.generate(["ok", "x" * 300], GREEDY)
    with pytest.raises(EngineError, match="context is 256"):
        tiny_engine.score(["ok"], ["y" * 300])


def test_release_and_resume(tiny_engine, adapters):
    tiny_engine.load_adapter(AdapterRef("kept", str(adapters["a"])))
    before = tiny_engine.generate(CHAT, GREEDY, adapter="kept")
    tiny_engine.release()
    with pytest.raises(EngineError, match="released"):
        tiny_engine.generate(CHAT, GREEDY)
    tiny_engine.resume()
    # adapters loaded before the release come back with the engine
    assert tiny_engine.generate(CHAT, GREEDY, adapter="kept") == before
    tiny_engine.drop_adapter("kept")


def test_a_release_on_cpu_leaves_cuda_alone(hf_tiny):
    """Releasing and resuming checks the device memory only where this process used CUDA: on a
    machine without one it must not start CUDA (nor fail asking for figures it cannot have)."""
    import torch

    from selfdistill.engines.local import free_device_memory

    assert str(hf_tiny.device) == ("cuda" if torch.cuda.is_available() else "cpu")
    hf_tiny.release()
    hf_tiny.resume()
    if not torch.cuda.is_available():
        assert free_device_memory("transformers") is None and not torch.cuda.is_initialized()


def test_cuda_asked_for_without_a_gpu_is_refused_in_one_line(tiny_dir):
    import torch

    from selfdistill.engines.hf import TransformersEngine

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(EngineError, match=r"engine.device = 'cuda' but torch sees no CUDA device: install the CUDA build") as e:
        TransformersEngine(tiny_dir, EngineConfig(kind="transformers", device="cuda"), seed=0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", [pytest.param("vllm", marks=pytest.mark.vllm), "transformers"])
def test_bad_model_dirs(kind, tmp_path, engine_cache):
    from selfdistill.engines import make_engine

    cfg = EngineConfig(kind=kind)
    with pytest.raises(ModelError, match="model directory does not exist"):
        make_engine(cfg, tmp_path / "missing", lora_rank=8, cache_dir=engine_cache)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="not a model directory"):
        make_engine(cfg, tmp_path, lora_rank=8, cache_dir=engine_cache)


def test_sampled_tokens_and_logprobs_are_the_trainers_at_temperature_1(tiny_engine, tiny_dir):
    """What the policy gradient's sampler correction rests on: with logprobs asked, each answer
    carries its sampled token ids and each one's log-probability under the raw model (temperature 1,
    whatever temperature sampled), equal to the trainer's own recomputation from the same ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfdistill.engines.local import render
    from selfdistill.training.policy_gradient import Example, _answer_logps

    out = tiny_engine.generate(CHAT[:2], SamplingParams(n=2, temperature=0.7, max_tokens=10, logprobs=True))
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    for chat, cs in zip(CHAT[:2], out):
        p = render(tok, chat)
        for c in cs:
            assert len(c.token_ids) == len(c.logprobs) == c.completion_tokens
            assert tok.decode(c.token_ids, skip_special_tokens=True).startswith(c.text)
            with torch.no_grad():
                (lp,), _, _ = _answer_logps(model, [Example(p + c.token_ids, len(p), 1.0, None)])
            assert lp.tolist() == pytest.approx(c.logprobs, abs=2e-2)


def test_token_logprobs_of_given_ids_are_the_samplers_and_survive_a_warm_prefix_cache(tiny_engine, hf_tiny):
    """What a teacher's scoring of a student's sample rests on (on-policy distillation): the
    log-probability of each given token id after its prompt equals what sampling that token
    reported, also when the same prompts were just scored (vLLM caches prefixes; a reported bug
    gave wrong prompt log-probabilities at cached positions) and for ids nobody sampled."""
    out = tiny_engine.generate(CHAT[:3], SamplingParams(n=2, temperature=1.0, max_tokens=10, logprobs=True))
    prompts = [chat for chat, cs in zip(CHAT[:3], out) for _ in cs]
    ids = [c.token_ids for cs in out for c in cs]
    first = tiny_engine.token_logprobs(prompts, ids)
    again = tiny_engine.token_logprobs(prompts, ids)
    for lps, c in zip(first, [c for cs in out for c in cs]):
        assert len(lps) == len(c.token_ids)
        assert lps == pytest.approx(c.logprobs, abs=2e-2)
    assert all(a == pytest.approx(f, abs=1e-4) for a, f in zip(again, first, strict=True))
    (mixed,) = tiny_engine.token_logprobs(CHAT[:1], [ids[0][:3] + [ids[0][0]] * 2])
    assert mixed[:3] == pytest.approx(first[0][:3], abs=1e-4) and len(mixed) == 5 and all(x <= 0 for x in mixed)
    assert tiny_engine.token_logprobs(CHAT[:1], [[]]) == [[]]
    # the top-k lists of top-k distillation: one request gives the given tokens' figures and each
    # position's k best, checked against transformers' full distribution
    top = tiny_engine.token_topk(prompts, ids, 5)
    assert [t.logprobs for t in top] == [pytest.approx(f, abs=1e-4) for f in first]
    assert_topk_matches(top, hf_tiny.token_topk(prompts, ids, 10_000), ids, 5, tol=2e-2)
    assert tiny_engine.token_topk(CHAT[:1], [[]], 5)[0].ids == []
