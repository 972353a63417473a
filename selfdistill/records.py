"""Plain records passed between the parts of the cycle (tasks, scored candidates, pairs, SFT
examples, the typed rows of rounds), the names of a round's phases and decisions, and the two
rules every part must agree on: a task's key and its split.

Pure: standard library only.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

SPLITS = ("train", "heldout", "audit")

# A round moves through these phases in order; each is committed before the next starts.
PHASES = ("sample", "generate", "score", "pair", "train", "evaluate", "decide", "promote", "done")
# How a round ended. collect: data only, no training due; superseded: the incumbent changed
# (a rollback or forced promotion) while the round ran, so its candidate was not promoted.
DECISIONS = ("promote", "reject", "fail", "skip", "collect", "superseded")
DECIDED = ("promote", "reject", "fail", "skip", "superseded")  # what counts as a decided round


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
    group: str | None = None  # the same question in another form shares it (tasks.groups); None: its own

    @property
    def key(self) -> str:
        return task_key(self.prompt)

    @property
    def split_key(self) -> str:
        """What the split is decided on: the group where there is one, so a group never straddles the wall."""
        return task_key("group\x00" + self.group) if self.group else self.key


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
    # a pairwise judge's: the generation ids this answer beat in a match of its own (both orders
    # agreeing); None where the score is not a pairwise judge's. Its pairs are those matches only.
    beat: tuple[int, ...] | None = None


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
    id: int | None = None  # set once stored
    round_id: int | None = None


@dataclass
class SftRecord:
    task_id: int
    prompt: str
    completion: str
    weight: float
    source: str  # verifier, top, teacher_label, teacher_revise
    generation_id: int | None = None
    id: int | None = None  # set once stored
    round_id: int | None = None


@dataclass
class GroupSample:
    """One of a task's k answers sampled by the incumbent, with its reward for the policy gradient."""

    completion: str
    reward: float
    generation_id: int | None = None
    token_ids: list[int] | None = None  # as sampled, where the engine gave them
    logprobs: list[float] | None = None  # the sampler's log-probability of each token (temperature 1)


@dataclass
class GroupRecord:
    """A task's answers of one round: the group a group-relative advantage is computed over."""

    task_id: int
    prompt: str
    samples: list[GroupSample]
    weight: float = 1.0


@dataclass
class DistillRecord:
    """One answer the incumbent sampled this round, with the teacher's log-probability of each of
    its tokens (on-policy distillation): the per-token signal is teacher minus student."""

    generation_id: int
    prompt: str
    token_ids: list[int]
    logprobs: list[float] | None  # the sampler's, one per token (None: the engine gave none)
    teacher_logprobs: list[float]
    weight: float = 1.0
    topk_ids: list[list[int]] | None = None  # the teacher's k most likely tokens at each position (top-k objectives)
    topk_logprobs: list[list[float]] | None = None  # and their log-probabilities, [tokens][k]


@dataclass
class TrainingData:
    """What one training round may use: stored SFT examples and pairs of train-split tasks."""

    sft: list[SftRecord]
    pairs: list[PairRecord]


class _Row:
    """Typed rows also read by column name (`row["status"]`), as the report and the SQL-minded
    callers do."""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@dataclass
class Round(_Row):
    """A row of the rounds table, typed."""

    id: int
    phase: str
    status: str  # running, done, failed, skipped
    incumbent_id: str
    candidate_id: str | None = None
    decision: str | None = None
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    error: str | None = None
    started_at: float = 0.0
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.phase == "done" or self.status != "running"

    @property
    def decided(self) -> bool:
        return self.decision in DECIDED and self.status != "running"


@dataclass
class Checkpoint(_Row):
    """A row of the checkpoints table: 'base' or an adapter version."""

    id: str
    status: str  # base, candidate, promoted, rejected, failed, deleted
    parent_id: str | None = None
    round_id: int | None = None
    path: str | None = None
    is_current: int = 0
    training: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    created_at: float = 0.0
    promoted_at: float | None = None


@dataclass
class Evaluation(_Row):
    """A stored evaluation of a checkpoint on a suite (heldout, anchors, ...), with its items."""

    id: int
    checkpoint_id: str
    suite: str
    metrics: dict[str, Any] = field(default_factory=dict)
    round_id: int | None = None
    created_at: float = 0.0
    items: list[dict[str, Any]] = field(default_factory=list)


def to_json(obj: Any) -> str:
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return json.dumps(obj, sort_keys=True, default=str)


# A multi-turn task (a JSONL line's `messages`) is kept as one prompt string: this tag, then the
# conversation as compact JSON. Everything that carries a prompt (the store, pairs, SFT rows, the
# training child) carries the conversation unchanged; `chat_messages` turns it back into turns,
# and the task's key (dedup, split) is the whole conversation's.
CONVERSATION_TAG = "\u241e"  # SYMBOL FOR RECORD SEPARATOR: visible in SQL, never typed by a user
ROLES = ("system", "user", "assistant")


def jsonl_rows(lines: Iterable[str], problems: list[str], where: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line that is JSON; a line that is not JSON is
    added to `problems` as "{where}{line}: not JSON (...)" (`where` is "path:" or "line ") and skipped."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}{lineno}: not JSON ({e.msg} at column {e.colno})")


def conversation_problem(messages: Any) -> str | None:
    """What is wrong with a conversation, or None: a list of {role, content} turns, an optional
    system turn first, then user and assistant turns alternating, ending with a user turn."""
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list of {\"role\", \"content\"} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            return f"messages[{i}] must be an object with exactly `role` and `content`"
        if m["role"] not in ROLES:
            return f"messages[{i}]: role {m['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return f"messages[{i}]: `content` must be a non-empty string"
    first = 1 if messages[0]["role"] == "system" else 0
    for i in range(first, len(messages)):
        want = "user" if (i - first) % 2 == 0 else "assistant"
        if messages[i]["role"] != want:
            return f"messages[{i}] is a {messages[i]['role']} turn, expected {want} (an optional system turn first, then user and assistant alternating)"
    if messages[-1]["role"] != "user":
        return "the conversation must end with a user turn: that is the turn the student answers"
    return None


def prompt_problem(row: dict, what: str) -> str | None:
    """What is wrong with the `prompt` or `messages` of a JSONL row (a task, an anchor: `what`), or None."""
    if "messages" in row:
        if "prompt" in row:
            return f"both `prompt` and `messages`; {what} has one of the two"
        return conversation_problem(row["messages"])
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        return "missing or empty `prompt` (a non-empty string; or `messages`, a conversation)"
    return None


def conversation_prompt(messages: list[dict[str, str]]) -> str:
    """The prompt string that carries a conversation (checked first: see conversation_problem)."""
    problem = conversation_problem(messages)
    if problem:
        raise ValueError(problem)
    return CONVERSATION_TAG + json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def conversation(prompt: str) -> list[dict[str, str]] | None:
    """The turns a prompt string carries, or None for a plain one-turn prompt."""
    return json.loads(prompt[len(CONVERSATION_TAG):]) if prompt.startswith(CONVERSATION_TAG) else None


def with_suffix(prompt: str, suffix: str) -> str:
    """The prompt with the policy's prompt_suffix: appended to the last user turn of a conversation."""
    if not suffix:
        return prompt
    turns = conversation(prompt)
    if turns is None:
        return prompt + suffix
    return conversation_prompt(turns[:-1] + [{"role": "user", "content": turns[-1]["content"] + suffix}])


def readable(prompt: str) -> str:
    """A prompt as a judge, a teacher's revision request or a report shows it: a plain prompt as
    it is, a conversation as its turns, one "Role: text" paragraph each."""
    turns = conversation(prompt)
    if turns is None:
        return prompt
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The messages a task prompt is asked with; generation and training must use the same. A
    conversation's own system turn, where it has one, takes the place of the policy's."""
    turns = conversation(prompt)
    if turns is not None:
        if system_prompt and turns[0]["role"] != "system":
            return [{"role": "system", "content": system_prompt}, *turns]
        return turns
    msgs = []
    if system_prompt:
        msgs.append({"role": "system", "content": system_prompt})
    msgs.append({"role": "user", "content": prompt})
    return msgs


def usable_logprobs(lps, n: int) -> bool:
    """A teacher's figures for an answer of n tokens are one finite log-probability (at most 0,
    give or take rounding) per token."""
    return len(lps) == n and all(isinstance(x, (int, float)) and math.isfinite(x) and x <= 1e-4 for x in lps)


def usable_topk(ids, lps, n: int, k: int) -> bool:
    """A teacher's top-k lists for an answer of n tokens: at each position k distinct non-negative
    token ids with finite log-probabilities that sum, as probabilities, to at most 1 (give or take
    rounding)."""
    if len(ids) != n or len(lps) != n:
        return False
    for row, vals in zip(ids, lps):
        if len(row) < k or len(vals) < k or len(set(row[:k])) != k or any(not isinstance(t, int) or t < 0 for t in row[:k]):
            return False
        if not usable_logprobs(vals[:k], k) or sum(math.exp(v) for v in vals[:k]) > 1.001:
            return False
    return True
