"""The OpenAI-compatible engine against real HTTP servers on loopback: a scripted stdlib server
that fails on demand, and (slow) a real vLLM CPU server with dynamic LoRA loading."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from fake_openai import FakeOpenAI
from topk_check import assert_topk_matches

from selfdistill.config import OpenAIEndpoint
from selfdistill.engines.base import AdapterRef, SamplingParams
from selfdistill.errors import EngineError

KEY = "sk-test-SECRET-4f1c9a"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def fake():
    srv = FakeOpenAI()
    yield srv
    srv.close()


@pytest.fixture
def make(fake, monkeypatch):
    monkeypatch.setenv("SD_TEST_KEY", KEY)
    made = []

    def _make(sleeps=None, **kw):
        from selfdistill.engines.openai_compat import OpenAIEngine

        opts = dict(base_url=fake.url, model="m", api_key_env="SD_TEST_KEY", timeout_s=1.0, max_retries=3,
                    backoff_s=0.01, circuit_breaker_failures=5, circuit_breaker_cooldown_s=30.0, concurrency=4)
        opts.update(kw)
        eng = OpenAIEngine(OpenAIEndpoint(**opts), **({"sleep": sleeps.append} if sleeps is not None else {}))
        made.append(eng)
        return eng

    yield _make
    for e in made:
        e.close()


def test_generate_chat_and_text(fake, make):
    eng = make()
    out = eng.generate([CHAT, "raw"], SamplingParams(n=3, temperature=0.7, max_tokens=5, stop=("x",)))
    assert [c.text for c in out[0]] == ["alpha", "alpha beta", "alpha beta gamma"]
    assert [c.completion_tokens for c in out[0]] == [1, 2, 3]
    assert out[0][0].prompt_tokens == 7 and out[0][0].finish_reason == "stop" and out[0][0].logprobs is None
    assert [c.completion_tokens for c in out[1]] == [1, 2, 3]
    chat_req = next(r for r in fake.requests if r["path"] == "/v1/chat/completions")
    assert chat_req["headers"]["Authorization"] == f"Bearer {KEY}"
    assert chat_req["body"]["messages"] == CHAT and chat_req["body"]["n"] == 3 and chat_req["body"]["stop"] == ["x"]
    assert {r["path"] for r in fake.requests} == {"/v1/chat/completions", "/v1/completions"}
    (c,), = eng.generate([CHAT], SamplingParams(logprobs=True))
    assert c.logprobs == [-0.5]


@pytest.mark.parametrize("top, error", [
    ([{"token_id:7": -0.1, "token_id:3": -2.0}] * 2, None),
    ([{"alpha": -0.1, "beta": -2.0}] * 2, "keyed by text, not token ids: top-k distillation needs a vLLM server"),
    ([None, None], "keyed by text"),
    ([{"token_id:7": -0.1}], "listed top log-probabilities for 1 of 2 tokens"),
])
def test_top_k_lists_are_read_as_token_ids_or_refused_in_one_line(make, monkeypatch, top, error):
    """What a server answers for echo + logprobs k: vLLM keys the alternatives by "token_id:N" when
    asked; another server's text keys (or no lists) cannot be mapped to the student's ids."""
    eng = make()
    sent = []
    monkeypatch.setattr(eng, "_tokenize", lambda prompt, model: [1, 2])
    monkeypatch.setattr(eng, "_post", lambda url, body: sent.append(body) or {"choices": [{"logprobs": {
        "token_logprobs": [None, -1.0, -0.1, -2.0], "top_logprobs": [None, None] + top}}]})
    if error is None:
        (got,) = eng.token_topk([CHAT], [[7, 3]], 2)
        assert (got.logprobs, got.ids, got.top) == ([-0.1, -2.0], [[7, 3], [7, 3]], [[-0.1, -2.0], [-0.1, -2.0]])
        assert sent[0]["return_tokens_as_token_ids"] is True and sent[0]["logprobs"] == 2 and sent[0]["echo"] is True
    else:
        with pytest.raises(EngineError, match=error):
            eng.token_topk([CHAT], [[7, 3]], 2)


@pytest.mark.parametrize("failures", [["503", "429"], ["garbage"], ["truncated"], ["close"], ["500", "502", "504"]])
def test_retries_until_success(fake, make, failures):
    sleeps: list[float] = []
    fake.script = list(failures)
    (cs,) = make(sleeps=sleeps).generate([CHAT], SamplingParams())
    assert cs[0].text == "alpha"
    assert len(fake.requests) == len(failures) + 1
    assert len(sleeps) == len(failures)


def test_backoff_grows_exponentially_with_jitter(fake, make):
    sleeps: list[float] = []
    fake.script = ["503"] * 3
    make(sleeps=sleeps, backoff_s=1.0).generate([CHAT], SamplingParams())
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0 and 2.0 <= sleeps[2] <= 4.0


def test_gives_up_after_retries(fake, make):
    fake.script = ["503"] * 10
    with pytest.raises(EngineError, match=r"chat/completions: gave up after 3 attempts, last: HTTP 503") as e:
        make(max_retries=2).generate([CHAT], SamplingParams())
    assert KEY not in str(e.value)


def test_timeout_then_retry(fake, make):
    fake.script = ["hang"]
    with pytest.raises(EngineError, match=r"no answer within 0.5 s"):
        make(timeout_s=0.5, max_retries=0).generate([CHAT], SamplingParams())
    fake.script = ["hang"]
    (cs,) = make(timeout_s=0.5, max_retries=1).generate([CHAT], SamplingParams())
    assert cs[0].text == "alpha"


def test_circuit_breaker_opens_and_recovers(fake, make):
    fake.script = ["503"] * 20
    eng = make(max_retries=10, circuit_breaker_failures=3, circuit_breaker_cooldown_s=0.3)
    with pytest.raises(EngineError, match="circuit open after 3 failures in a row"):
        eng.generate([CHAT], SamplingParams())
    assert len(fake.requests) == 3
    # while open, nothing reaches the server
    with pytest.raises(EngineError, match="circuit open"):
        eng.generate([CHAT], SamplingParams())
    assert len(fake.requests) == 3
    time.sleep(0.35)
    fake.script = []
    (cs,) = eng.generate([CHAT], SamplingParams())
    assert cs[0].text == "alpha" and len(fake.requests) == 4


@pytest.mark.parametrize("code,hint", [("400", ""), ("404", ""), ("401", "check the API key")])
def test_client_errors_fail_at_once_without_the_key(fake, make, code, hint):
    fake.script = [code]
    with pytest.raises(EngineError) as e:
        make().generate([CHAT], SamplingParams())
    msg = str(e.value)
    assert msg.startswith(f"{fake.url}/chat/completions: HTTP {code}") and hint in msg
    assert "scripted" in msg and KEY not in msg and "***" in msg
    assert len(fake.requests) == 1


def test_api_key_sources(fake, tmp_path, monkeypatch):
    from selfdistill.engines.openai_compat import OpenAIEngine

    monkeypatch.delenv("SD_MISSING_KEY", raising=False)
    with pytest.raises(EngineError, match="environment variable SD_MISSING_KEY .* is not set"):
        OpenAIEngine(OpenAIEndpoint(base_url=fake.url, model="m", api_key_env="SD_MISSING_KEY"))
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY + "\n")
    keyfile.chmod(0o644)
    with pytest.raises(EngineError, match=r"open to other users \(mode 644\): run `chmod 600") as e:
        OpenAIEngine(OpenAIEndpoint(base_url=fake.url, model="m", api_key_file=keyfile))
    assert KEY not in str(e.value)
    keyfile.chmod(0o600)
    eng = OpenAIEngine(OpenAIEndpoint(base_url=fake.url, model="m", api_key_file=keyfile))
    eng.generate([CHAT], SamplingParams())
    eng.close()
    assert fake.requests[-1]["headers"]["Authorization"] == f"Bearer {KEY}"


def test_adapter_load_and_use(fake, make):
    eng = make()
    eng.load_adapter(AdapterRef("round-3", "/srv/adapters/round-3"))
    eng.generate([CHAT], SamplingParams(), adapter="round-3")
    eng.drop_adapter("round-3")
    paths = [(r["path"], r["body"].get("lora_name") or r["body"].get("model")) for r in fake.requests]
    assert paths == [("/v1/load_lora_adapter", "round-3"), ("/v1/chat/completions", "round-3"), ("/v1/unload_lora_adapter", "round-3")]
    assert fake.requests[0]["body"]["lora_path"] == "/srv/adapters/round-3"
    with pytest.raises(EngineError, match="'round-3' is not loaded"):
        eng.generate([CHAT], SamplingParams(), adapter="round-3")


def test_score_needs_a_vllm_server(fake, make):
    fake.script = ["404"]
    with pytest.raises(EngineError, match=r"/tokenize: HTTP 404"):
        make().score([CHAT], ["x"])


# ------------------------------------------------------------------------------------------
# a real vLLM CPU server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(tiny_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_dir), "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--enable-lora", "--max-lora-rank", "8", "--served-model-name", "tiny",
           "--max-model-len", "256", "--dtype", "float32",
           # as in the offline engine: no LoRA on lm_head, whose wrapper breaks echo/prompt logprobs
           "--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"vLLM server did not answer within 180 s: {log.read_text()[-2000:]}")
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(30)


@pytest.mark.slow
@pytest.mark.vllm
def test_real_vllm_server(vllm_server, hf_tiny, adapters):
    import httpx

    from selfdistill.engines.openai_compat import OpenAIEngine

    eng = OpenAIEngine(OpenAIEndpoint(base_url=vllm_server, model="tiny", timeout_s=60, max_retries=1))
    prompts = [[{"role": "user", "content": q}] for q in ("hello", "2+2=?")] + ["raw text"]
    g = SamplingParams(temperature=0.0, max_tokens=12)
    texts = lambda out: [cs[0].text for cs in out]  # noqa: E731
    base = eng.generate(prompts, g)
    assert texts(base) == texts(hf_tiny.generate(prompts, g))
    assert all(cs[0].completion_tokens == 12 for cs in base)
    sampled = eng.generate(prompts[:1], SamplingParams(n=3, temperature=1.0, max_tokens=8, logprobs=True))[0]
    assert len(sampled) == 3 and all(len(c.logprobs) == c.completion_tokens for c in sampled)
    # an adapter written after the server started, loaded without a restart
    eng.load_adapter(AdapterRef("a-v1", str(adapters["a"])))
    hf_tiny.load_adapter(AdapterRef("a-v1", str(adapters["a"])))
    with_a = eng.generate(prompts, g, adapter="a-v1")
    assert texts(with_a) != texts(base)
    assert texts(with_a) == texts(hf_tiny.generate(prompts, g, adapter="a-v1"))
    scores = eng.score(prompts, texts(base), adapter="a-v1")
    for (a, n), (b, m) in zip(scores, hf_tiny.score(prompts, texts(base), adapter="a-v1")):
        assert n == m and a == pytest.approx(b, rel=1e-3, abs=1e-3)
    # a teacher server scoring given token ids (on-policy distillation): the offline reference's figures
    ids = [[5, 9, 12, 7], [30, 31]]
    for a, b in zip(eng.token_logprobs(prompts[:2], ids, adapter="a-v1"), hf_tiny.token_logprobs(prompts[:2], ids, adapter="a-v1")):
        assert len(a) == len(b) and a == pytest.approx(b, rel=1e-3, abs=1e-3)
    # and its top-k lists (echo + logprobs k, token ids by return_tokens_as_token_ids)
    assert_topk_matches(eng.token_topk(prompts[:2], ids, 6, adapter="a-v1"), hf_tiny.token_topk(prompts[:2], ids, 10_000, adapter="a-v1"),
                        ids, 6)
    hf_tiny.drop_adapter("a-v1")
    eng.drop_adapter("a-v1")
    served = [m["id"] for m in httpx.get(f"{vllm_server}/models").json()["data"]]
    assert "tiny" in served and "a-v1" not in served
    eng.close()
