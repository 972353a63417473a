"""The engine interface: generate k samples for many prompts, and score given completions.

Every engine (vLLM offline, transformers, an OpenAI-compatible server) implements `Engine`.
An engine knows nothing about tasks, the store or training: it turns prompts into text.

A prompt is either a list of chat messages (`[{"role": "user", "content": "..."}]`), rendered
with the model's chat template, or a plain string, used as raw text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, Union, runtime_checkable

Message = dict[str, str]
Prompt = Union[str, list[Message]]


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False  # per-token log-probabilities of the sampled tokens

    def as_dict(self) -> dict:
        return {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "stop": list(self.stop),
            "seed": self.seed,
        }


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    logprobs: list[float] | None = None  # one per sampled token when asked for (temperature 1: the raw model)
    token_ids: list[int] | None = None  # the sampled tokens, given with logprobs where the engine knows them


@dataclass
class TokenTopK:
    """A teacher's view of given tokens after a prompt: the log-probability of each given token, and
    at each position the k most likely tokens with theirs (most likely first; the given token may
    or may not be among them)."""

    logprobs: list[float]  # one per given token
    ids: list[list[int]]  # [tokens][k]
    top: list[list[float]]  # [tokens][k]


@dataclass
class AdapterRef:
    """A LoRA adapter version: a name unique to this version, and its directory."""

    name: str
    path: str
    extra: dict = field(default_factory=dict)


def loaded_adapter(adapters: dict, name: str):
    """The engine's entry for adapter `name`, or an EngineError saying it was never loaded."""
    try:
        return adapters[name]
    except KeyError:
        from selfdistill.errors import EngineError

        raise EngineError(f"adapter {name!r} is not loaded: call load_adapter() first") from None


@runtime_checkable
class Engine(Protocol):
    """What every generation engine offers."""

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, adapter: str | None = None
    ) -> list[list[Completion]]:
        """k = params.n completions for each prompt, in prompt order; `adapter` names a loaded version."""
        ...

    def score(
        self, prompts: Sequence[Prompt], completions: Sequence[str], adapter: str | None = None
    ) -> list[tuple[float, int]]:
        """(sum of log-probabilities, number of tokens) of each completion given its prompt."""
        ...

    def token_logprobs(
        self, prompts: Sequence[Prompt], token_ids: Sequence[Sequence[int]], adapter: str | None = None
    ) -> list[list[float]]:
        """The log-probability (temperature 1) of each given token after its prompt: the ids are in
        this engine's vocabulary (a teacher scoring a student's sample must share its tokenizer)."""
        ...

    def token_topk(
        self, prompts: Sequence[Prompt], token_ids: Sequence[Sequence[int]], k: int, adapter: str | None = None
    ) -> list[TokenTopK]:
        """token_logprobs with, at each position, the k most likely tokens and their log-probabilities
        (temperature 1): what top-k forward KL and generalised JSD distillation learn from."""
        ...

    def load_adapter(self, ref: AdapterRef) -> None:
        """Make an adapter version available under `ref.name` without restarting the engine."""
        ...

    def drop_adapter(self, name: str) -> None:
        """Forget an adapter version (a no-op for one never loaded)."""
        ...

    def release(self) -> None:
        """Free the engine's memory (before a training round); `resume()` brings it back."""
        ...

    def resume(self) -> None:
        ...

    def close(self) -> None:
        ...
