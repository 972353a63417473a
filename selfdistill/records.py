"""Plain records passed between the parts of the cycle (tasks, scored candidates, pairs, SFT
examples), and the two rules every part must agree on: a task's key and its split.

Pure: standard library only.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

SPLITS = ("train", "heldout", "audit")


def normalize_prompt(prompt: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", prompt).split())


def task_key(prompt: str) -> str:
    """Stable key of a task: a hash of its normalised prompt text.

    Keyed by the question alone (not the source or the answer), so the same question drawn from
    two seeds or two sources is one task, and can never sit on both sides of the held-out wall.
    """
    return hashlib.sha256(normalize_prompt(prompt).encode("utf-8")).hexdigest()


def split_for(key: str, heldout_fraction: float, audit_fraction: float = 0.0) -> str:
    """Deterministic split by key: the first 8 hex digits as a fraction of 2**32."""
    u = int(key[:8], 16) / 2**32
    if u < heldout_fraction:
        return "heldout"
    if u < heldout_fraction + audit_fraction:
        return "audit"
    return "train"


@dataclass
class TaskIn:
    """A task as a source yields it, before it enters the store."""

    source: str  # e.g. "reasoning_gym:chain_sum", "jsonl:tasks.jsonl", "expansion:teacher"
    prompt: str
    answer: str | None = None
    verifier: str | None = None  # verifier name; None = the policy's default
    category: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return task_key(self.prompt)


@dataclass
class Task(TaskIn):
    """A task in the store."""

    id: int = 0
    split: str = "train"
    uses: int = 0
    attempts: int = 0
    successes: float = 0.0

    @property
    def pass_rate(self) -> float | None:
        return self.successes / self.attempts if self.attempts else None


@dataclass
class Candidate:
    """One scored answer of the student to a task."""

    task_id: int
    text: str
    score: float | None  # None: no usable score (unparseable verdict)
    correct: bool | None = None  # verifier verdict (full score only), None without a verifier
    source: str = "verifier"  # verifier, teacher, self
    generation_id: int | None = None
    tokens: int = 0


@dataclass
class PairRecord:
    task_id: int
    prompt: str
    chosen: str
    rejected: str
    margin: float
    weight: float
    source: str
    chosen_gen_id: int | None = None
    rejected_gen_id: int | None = None


@dataclass
class SftRecord:
    task_id: int
    prompt: str
    completion: str
    weight: float
    source: str  # verifier, top, teacher_label, teacher_revise
    generation_id: int | None = None


def to_json(obj: Any) -> str:
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return json.dumps(obj, sort_keys=True, default=str)


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The messages a task prompt is asked with; generation and training must use the same."""
    msgs = []
    if system_prompt:
        msgs.append({"role": "system", "content": system_prompt})
    msgs.append({"role": "user", "content": prompt})
    return msgs
