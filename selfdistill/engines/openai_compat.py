"""The OpenAI-compatible engine: any server speaking /v1/chat/completions and /v1/completions
(a vLLM server fleet, a hosted teacher) over HTTP, with a concurrency limit, timeouts, retries with
exponential backoff and jitter, and a circuit breaker.

The API key comes from the environment variable the policy names, or from a file only its owner
can read; it goes into the Authorization header and nowhere else (not logs, not exceptions).
Adapters (`load_adapter`) and `score` need a vLLM server (dynamic LoRA loading, /tokenize, echo).
"""

from __future__ import annotations

import os
import random
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from selfdistill.config import OpenAIEndpoint
from selfdistill.engines.base import AdapterRef, Completion, Prompt, SamplingParams, TokenTopK, loaded_adapter
from selfdistill.errors import EngineError

RETRY_STATUS = {408, 409, 429} | set(range(500, 600))


def read_api_key(ep: OpenAIEndpoint) -> str | None:
    if ep.api_key_env:
        key = os.environ.get(ep.api_key_env)
        if not key:
            raise EngineError(f"environment variable {ep.api_key_env} (API key of {ep.base_url}) is not set: export it")
        return key
    if ep.api_key_file:
        p = Path(ep.api_key_file)
        try:
            mode = p.stat().st_mode
        except FileNotFoundError:
            raise EngineError(f"{p}: API key file does not exist") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise EngineError(f"{p}: API key file is open to other users (mode {stat.S_IMODE(mode):o}): run `chmod 600 {p}`")
        return p.read_text().strip()
    return None


class CircuitBreaker:
    """Opens after `failures` failed attempts in a row and refuses calls for `cooldown_s`; then lets
    one trial through (half-open): its success closes the circuit, its failure opens it again."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self._streak = 0
        self._opened_at: float | None = None
        self._lock = threading.Lock()

    def check(self, url: str) -> None:
        with self._lock:
            if self._opened_at is None:
                return
            left = self._opened_at + self.cooldown_s - self.clock()
            if left > 0:
                raise EngineError(
                    f"{url}: circuit open after {self._streak} failures in a row; no request for {left:.0f} s more (is the server up?)"
                )
            self._opened_at = None  # half-open: one failure re-opens it
            self._streak = self.failures - 1

    def record(self, ok: bool) -> None:
        with self._lock:
            if ok:
                # a success (even of a request sent before the circuit opened) proves the server
                # answers: close the circuit, so no "open after 0 failures" state can exist
                self._streak = 0
                self._opened_at = None
                return
            self._streak += 1
            if self._streak >= self.failures:
                self._opened_at = self.clock()


class OpenAIEngine:
    def __init__(self, endpoint: OpenAIEndpoint, *, sleep: Callable[[float], None] = time.sleep):
        import httpx

        self.ep = endpoint
        self.base = endpoint.base_url.rstrip("/")
        # vLLM serves /tokenize beside /v1, not under it
        self.root = self.base.removesuffix("/v1")
        self._key = read_api_key(endpoint)
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._http = httpx.Client(
            headers=headers,
            timeout=endpoint.timeout_s,
            limits=httpx.Limits(max_connections=endpoint.concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=endpoint.concurrency, thread_name_prefix="openai-engine")
        self.breaker = CircuitBreaker(endpoint.circuit_breaker_failures, endpoint.circuit_breaker_cooldown_s)
        self._sleep = sleep
        self._adapters: dict[str, str] = {}  # our name -> the served model name

    # -- HTTP -------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _post(self, url: str, body: dict, *, expect_json: bool = True):
        import httpx

        problem, retry_after = "", 0.0
        for attempt in range(self.ep.max_retries + 1):
            if attempt:
                # exponential backoff with "equal jitter": never less than half the step, so
                # many workers retrying at once spread out without hammering the server
                step = self.ep.backoff_s * 2 ** (attempt - 1)
                self._sleep(max(step / 2 + random.uniform(0, step / 2), retry_after))
            self.breaker.check(url)
            retry_after = 0.0
            try:
                r = self._http.post(url, json=body)
            except httpx.TimeoutException:
                problem = f"no answer within {self.ep.timeout_s:g} s"
            except httpx.TransportError as e:
                problem = f"connection failed ({type(e).__name__})"
            else:
                if r.status_code in RETRY_STATUS:
                    problem = f"HTTP {r.status_code}"
                    retry_after = _retry_after(r.headers.get("retry-after"))
                elif r.status_code >= 400:
                    self.breaker.record(True)  # the server is up; the request is wrong
                    hint = " (check the API key)" if r.status_code in (401, 403) else ""
                    raise EngineError(self._scrub(f"{url}: HTTP {r.status_code}{hint}: {r.text[:300]}"))
                elif not expect_json:
                    self.breaker.record(True)
                    return None
                else:
                    try:
                        data = r.json()
                    except ValueError:
                        problem = "the answer is not valid JSON"
                    else:
                        self.breaker.record(True)
                        return data
            self.breaker.record(False)
        raise EngineError(self._scrub(f"{url}: gave up after {self.ep.max_retries + 1} attempts, last: {problem}"))

    def _map(self, fn, items):
        return list(self._pool.map(fn, items))

    # -- the Engine interface ---------------------------------------------------------------

    def _model(self, adapter: str | None) -> str:
        if adapter is None:
            return self.ep.model
        return loaded_adapter(self._adapters, adapter)

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, adapter: str | None = None
    ) -> list[list[Completion]]:
        model = self._model(adapter)
        # per-choice token counts come from the logprobs when one request carries n choices
        want_lp = params.logprobs or params.n > 1
        return self._map(lambda p: self._one(p, params, model, want_lp), prompts)

    def _one(self, prompt: Prompt, params: SamplingParams, model: str, want_lp: bool) -> list[Completion]:
        body = {
            "model": model,
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        chat = not isinstance(prompt, str)
        if chat:
            body["messages"] = prompt
            if want_lp:
                body["logprobs"] = True
            url = f"{self.base}/chat/completions"
        else:
            body["prompt"] = prompt
            if want_lp:
                body["logprobs"] = 0
            url = f"{self.base}/completions"
        data = self._post(url, body)
        try:
            usage = data["usage"]
            out = []
            for ch in data["choices"]:
                if chat:
                    text = ch["message"]["content"] or ""
                    lps = [t["logprob"] for t in ch["logprobs"]["content"]] if want_lp else None
                else:
                    text = ch["text"]
                    lps = list(ch["logprobs"]["token_logprobs"]) if want_lp else None
                n_tok = len(lps) if lps is not None else usage["completion_tokens"]
                out.append(Completion(text, usage["prompt_tokens"], n_tok, ch["finish_reason"], lps if params.logprobs else None))
        except (KeyError, TypeError, IndexError) as e:
            raise EngineError(f"{url}: answer lacks {e} (is this an OpenAI-compatible server?)") from None
        return out

    def score(
        self, prompts: Sequence[Prompt], completions: Sequence[str], adapter: str | None = None
    ) -> list[tuple[float, int]]:
        model = self._model(adapter)

        def one(pc):
            lps = self._token_logprobs_one(pc[0], self._tokenize(pc[1], model), model)
            return float(sum(lps)), len(lps)

        return self._map(one, list(zip(prompts, completions)))

    def token_logprobs(
        self, prompts: Sequence[Prompt], token_ids: Sequence[Sequence[int]], adapter: str | None = None
    ) -> list[list[float]]:
        model = self._model(adapter)
        return self._map(lambda pt: self._token_logprobs_one(pt[0], list(pt[1]), model), list(zip(prompts, token_ids)))

    def tokenize(self, prompt: Prompt, adapter: str | None = None) -> list[int]:
        """The server's token ids of a prompt: chat messages through its own chat template (with the
        generation prompt), a string as raw text (vLLM's /tokenize)."""
        return self._tokenize(prompt, self._model(adapter))

    def _tokenize(self, prompt: Prompt, model: str) -> list[int]:
        tok = f"{self.root}/tokenize"
        if isinstance(prompt, str):
            return self._post(tok, {"model": model, "prompt": prompt, "add_special_tokens": False})["tokens"]
        return self._post(tok, {"model": model, "messages": prompt, "add_generation_prompt": True})["tokens"]

    def _token_logprobs_one(self, prompt: Prompt, tail: list[int], model: str) -> list[float]:
        return self._token_topk_one(prompt, tail, model, 0).logprobs

    def token_topk(
        self, prompts: Sequence[Prompt], token_ids: Sequence[Sequence[int]], k: int, adapter: str | None = None
    ) -> list[TokenTopK]:
        model = self._model(adapter)
        return self._map(lambda pt: self._token_topk_one(pt[0], list(pt[1]), model, k), list(zip(prompts, token_ids)))

    def _token_topk_one(self, prompt: Prompt, tail: list[int], model: str, k: int) -> TokenTopK:
        # The prompt goes through the server's own chat template (/tokenize), so the ids are the
        # ones generation would see; echo + logprobs then scores every prompt token, and with k > 0
        # lists each position's k most likely tokens, as ids (vLLM's return_tokens_as_token_ids).
        if not tail:
            return TokenTopK([], [], [])
        head = self._tokenize(prompt, model)
        ids = head + tail
        body = {"model": model, "prompt": ids, "echo": True, "logprobs": k, "max_tokens": 1, "temperature": 0.0}
        if k:
            body["return_tokens_as_token_ids"] = True
        data = self._post(f"{self.base}/completions", body)
        got = data["choices"][0]["logprobs"]
        lps = got["token_logprobs"][len(head) : len(ids)]
        if len(lps) != len(tail) or any(not isinstance(x, (int, float)) for x in lps):
            raise EngineError(f"{self.base}/completions echoed {len(lps)} log-probabilities for {len(tail)} tokens: "
                              "the server does not score prompt tokens (a vLLM server does, with echo and logprobs)")
        if not k:
            return TokenTopK([float(x) for x in lps], [], [])
        tops = (got.get("top_logprobs") or [])[len(head) : len(ids)]
        out_ids, out_lps = [], []
        try:
            for d in tops:
                pairs = sorted(((int(t.removeprefix("token_id:")), float(v)) for t, v in d.items()), key=lambda p: -p[1])[:k]
                out_ids.append([t for t, _ in pairs])
                out_lps.append([v for _, v in pairs])
        except (AttributeError, TypeError, ValueError):
            raise EngineError(f"{self.base}/completions gave top log-probabilities keyed by text, not token ids: top-k "
                              "distillation needs a vLLM server (it honours return_tokens_as_token_ids)") from None
        if len(out_ids) != len(tail) or any(len(x) < min(k, 1) for x in out_ids):
            raise EngineError(f"{self.base}/completions listed top log-probabilities for {len(out_ids)} of {len(tail)} tokens: "
                              "the server does not give prompt tokens' alternatives (a vLLM server does, with echo and logprobs)")
        return TokenTopK([float(x) for x in lps], out_ids, out_lps)

    def load_adapter(self, ref: AdapterRef) -> None:
        # The path is the server's: it is not checked here, the server refuses a bad one (4xx).
        self.drop_adapter(ref.name)
        self._post(f"{self.base}/load_lora_adapter", {"lora_name": ref.name, "lora_path": str(ref.path)}, expect_json=False)
        self._adapters[ref.name] = ref.name

    def drop_adapter(self, name: str) -> None:
        served = self._adapters.pop(name, None)
        if served is not None:
            self._post(f"{self.base}/unload_lora_adapter", {"lora_name": served}, expect_json=False)

    def release(self) -> None:
        """Nothing to free here: the server owns its memory."""

    def resume(self) -> None:
        """Nothing to bring back."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()


def _retry_after(value: str | None) -> float:
    """Seconds a 429/503 asks us to wait (only the seconds form; an HTTP date is rare here)."""
    try:
        return min(float(value), 60.0) if value else 0.0
    except ValueError:
        return 0.0
