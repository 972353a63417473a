"""Self-instruct expansion: a model (the teacher, or the student itself) writes new tasks in the
style of seed tasks, and only the ones that survive strict checks are kept.

`expand_tasks(engine, seeds, cfg, known_prompts, rng)` asks `cfg.per_round` times, each time
showing `cfg.examples_per_prompt` seed tasks drawn at random, for one new task in this format:

    ### Task
    <the new task>
    ### Answer
    <its answer>

A reply is kept only if it parses exactly (one Task section, one Answer section when the seeds
have answers, nothing before), has a prompt within length bounds and mostly made of words, does not
leak its answer into the prompt or carry format debris, and is no closer than `cfg.max_similarity`
(ROUGE-L, `selfdistill.pairs.similarity`) to any known or already accepted prompt. Every rejection
is counted by reason in the result, so a bad teacher shows up as numbers rather than silence.

New tasks come out with source "expansion:<by>". Their answers are the writer's claim, not a
verified fact: the verifier is the seeds' shared one when it only needs a reference answer
("exact", "normalized", "numeric..."), else "normalized" when there is an answer.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from selfdistill.config import ExpansionSource
from selfdistill.engines.base import Engine, SamplingParams
from selfdistill.pairs import similarity
from selfdistill.records import TaskIn, chat_messages, normalize_prompt, readable

MIN_PROMPT_CHARS = 12
MAX_PROMPT_CHARS = 2000
MAX_ANSWER_CHARS = 500
MIN_WORDY_SHARE = 0.7  # letters, digits, spaces and common punctuation, of all characters
REFERENCE_VERIFIERS = ("exact", "normalized")

INSTRUCTION = """Here are examples of tasks, each with its answer:

{examples}

Write one new task of the same kind, different from every example, and its correct answer. \
Reply in exactly this format and write nothing else:
### Task
<the new task>
### Answer
<its answer>"""

_REPLY = re.compile(r"### Task\n(?P<task>.+?)\n### Answer\n(?P<answer>.+)", re.DOTALL)
_REPLY_NO_ANSWER = re.compile(r"### Task\n(?P<task>.+)", re.DOTALL)
_DEBRIS = re.compile(r"###|<answer>|</answer>|<\|im_(start|end)\|>", re.IGNORECASE)
_WORDY = re.compile(r"[\w\s.,;:!?'\"()+\-*/=%$<>\[\]]")


@dataclass
class ExpansionResult:
    tasks: list[TaskIn]
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    asked: int = 0


def _example(t: TaskIn) -> str:
    return f"### Task\n{readable(t.prompt).strip()}\n### Answer\n{(t.answer or '').strip()}"


def build_request(examples: Sequence[TaskIn]) -> str:
    return INSTRUCTION.format(examples="\n\n".join(_example(t) for t in examples))


def parse_reply(text: str, want_answer: bool) -> tuple[str, str | None] | str:
    """(prompt, answer) from a reply in the exact format, or the reason it is rejected."""
    text = text.strip()
    m = (_REPLY if want_answer else _REPLY_NO_ANSWER).fullmatch(text)
    if not m:
        return "format"
    prompt = m.group("task").strip()
    answer = m.group("answer").strip() if want_answer else None
    if want_answer and not answer:
        return "format"
    if _DEBRIS.search(prompt) or (answer and _DEBRIS.search(answer)):
        return "debris"
    if not MIN_PROMPT_CHARS <= len(prompt) <= MAX_PROMPT_CHARS or (answer and len(answer) > MAX_ANSWER_CHARS):
        return "length"
    if len(_WORDY.findall(prompt)) / len(prompt) < MIN_WORDY_SHARE or not re.search(r"[A-Za-z]{2,}", prompt):
        return "junk"
    # A short answer like "5" legitimately appears in many questions; a longer one written into
    # its own question is a giveaway, not a task.
    if answer and len(answer) >= 3 and normalize_prompt(answer).lower() in normalize_prompt(prompt).lower():
        return "answer_leak"
    return prompt, answer


def _verifier_for(seeds: Sequence[TaskIn], has_answer: bool) -> str | None:
    names = {s.verifier for s in seeds}
    if len(names) == 1:
        (name,) = names
        if name in REFERENCE_VERIFIERS or (name or "").startswith("numeric"):
            return name
    return "normalized" if has_answer else None


def expand_tasks(
    engine: Engine,
    seeds: Sequence[TaskIn],
    cfg: ExpansionSource,
    known_prompts: Iterable[str],
    rng: random.Random,
    params: SamplingParams | None = None,
    adapter: str | None = None,
    system_prompt: str | None = None,
) -> ExpansionResult:
    """New tasks written by `engine` from `seeds` (see the module docstring)."""
    if not seeds:
        return ExpansionResult([], Counter({"no_seeds": 1}), 0)
    params = params or SamplingParams(n=1, temperature=1.0, max_tokens=256)
    want_answer = all(s.answer is not None for s in seeds)
    k = min(cfg.examples_per_prompt, len(seeds))
    shown = [rng.sample(list(seeds), k) for _ in range(cfg.per_round)]
    outs = engine.generate([chat_messages(build_request(ex), system_prompt) for ex in shown], params, adapter=adapter)
    known = [normalize_prompt(p) for p in known_prompts] + [normalize_prompt(s.prompt) for s in seeds]
    known_exact = set(known)
    result = ExpansionResult([], Counter(), len(shown))
    for examples, comps in zip(shown, outs):
        for comp in comps:
            parsed = parse_reply(comp.text, want_answer)
            if isinstance(parsed, str):
                result.rejected[parsed] += 1
                continue
            prompt, answer = parsed
            norm = normalize_prompt(prompt)
            if norm in known_exact:
                result.rejected["duplicate"] += 1
                continue
            if any(similarity(norm, k_, cfg.max_similarity) >= cfg.max_similarity for k_ in known):
                result.rejected["near_duplicate"] += 1
                continue
            known_exact.add(norm)
            known.append(norm)
            categories = {s.category for s in examples}
            result.tasks.append(TaskIn(
                source=f"expansion:{cfg.by}", prompt=prompt, answer=answer,
                verifier=_verifier_for(examples, answer is not None),
                category=categories.pop() if len(categories) == 1 else "",
                metadata={"expanded_from": [s.key for s in examples], "by": cfg.by},
            ))
    return result
