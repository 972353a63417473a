"""Evaluation of one checkpoint through an Engine: held-out accuracy, the forgetting guard and
sanity statistics, in the form the gate (`selfdistill.gates.decide`) consumes.

- `evaluate_heldout` answers held-out tasks greedily (temperature 0, one answer each), so the
  candidate and the incumbent answer the same items deterministically and can be compared item
  by item.
- `anchor_references` asks the base model (no adapter) for its greedy answers to the anchor
  prompts, once; `anchor_nll` measures how likely a checkpoint still finds those answers (mean
  per-token negative log-likelihood). A candidate that forgot general language makes the base's
  own answers unlikely.
- `sanity_stats` measures degeneration: empty answers, repeated 4-grams, length.

Knows nothing of the store: callers record `EvalResult.items` and `EvalResult.metrics`.
Imports no heavy library itself; the engine it is given does the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from selfdistill import stats
from selfdistill.engines.base import Engine, Prompt, SamplingParams
from selfdistill.errors import EngineError
from selfdistill.gates import EvalMetrics, SanityStats
from selfdistill.records import Evaluation, Task

# (answer text, task) -> (score, correct); (None, None) for a task no verifier can check (a pairwise judge measures those)
Verify = Callable[[str, Task], tuple[float | None, bool | None]]
PromptBuilder = Callable[[Task], Prompt]


@dataclass
class EvalItem:
    task_id: int
    correct: bool | None  # None: the task has no verifier (its answer is kept for the pairwise judge)
    score: float | None
    text: str
    tokens: int


@dataclass
class EvalResult:
    items: list[EvalItem]
    categories: dict[int, str]  # task id -> category
    metrics: dict[str, Any]  # JSON-ready: accuracy, ci_low, ci_high, n, per_category, sanity stats

    def to_metrics(self, anchor_nll: float | None = None, win_rate: float | None = None) -> EvalMetrics:
        """The gate's view of this evaluation."""
        return EvalMetrics(
            correct={it.task_id: it.correct for it in self.items if it.correct is not None},
            unverified=sum(it.correct is None for it in self.items),
            categories=dict(self.categories),
            sanity=SanityStats(
                empty_fraction=self.metrics["empty_fraction"],
                repetition=self.metrics["repetition"],
                mean_length=self.metrics["mean_length"],
            ),
            anchor_nll=anchor_nll,
            win_rate=win_rate,
        )


def greedy(max_tokens: int) -> SamplingParams:
    # No per-request seed: greedy decoding needs none, and vLLM's CPU build crashes on them.
    return SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)


def evaluate_heldout(
    engine: Engine,
    adapter: str | None,
    tasks: Sequence[Task],
    verify: Verify,
    prompt_builder: PromptBuilder,
    max_tokens: int,
    known: dict[int, EvalItem] | None = None,
) -> EvalResult:
    """Answer every task greedily with `adapter` (None: the base) and verify each answer; a task in
    `known` (this checkpoint's stored answer to it) is not asked again: greedy decoding in a batch of
    other prompts need not give the same text twice, and a paired test needs one answer per item."""
    if not tasks:
        raise ValueError("no held-out tasks to evaluate: the store holds none (raise tasks.heldout_fraction)")
    known = known or {}
    ask = [t for t in tasks if t.id not in known]
    outs = engine.generate([prompt_builder(t) for t in ask], greedy(max_tokens), adapter=adapter) if ask else []
    fresh = {}
    for task, (comp,) in zip(ask, outs):
        score, correct = verify(comp.text, task)
        fresh[task.id] = EvalItem(task.id, None if correct is None else bool(correct), None if score is None else float(score),
                                  comp.text, comp.completion_tokens)
    items = [known.get(t.id) or fresh[t.id] for t in tasks]
    categories = {t.id: t.category for t in tasks}
    return EvalResult(items=items, categories=categories, metrics=_metrics(items, categories))


def gate_input(heldout: Evaluation, anchors: Evaluation | None, categories: dict[int, str]) -> EvalMetrics:
    """The one builder of the gate's view of a checkpoint, from its stored held-out evaluation
    (`metrics` and `items` as `evaluate_heldout` made them) and anchor evaluation."""
    m = heldout.metrics
    return EvalMetrics(
        correct={it["task_id"]: bool(it["correct"]) for it in heldout.items if it["correct"] is not None},
        unverified=sum(it["correct"] is None for it in heldout.items),
        sanity=SanityStats(empty_fraction=m["empty_fraction"], repetition=m["repetition"], mean_length=m["mean_length"]),
        categories=categories,
        anchor_nll=anchors.metrics["nll"] if anchors else None,
    )


def _metrics(items: list[EvalItem], categories: dict[int, str]) -> dict[str, Any]:
    def acc(group: list[EvalItem]) -> dict[str, Any]:
        """Accuracy over the verified items (None where none is); `unverified` counts the rest."""
        checked = [it for it in group if it.correct is not None]
        out: dict[str, Any] = {"n": len(checked), "accuracy": None, "ci_low": None, "ci_high": None}
        if checked:
            k = sum(bool(it.correct) for it in checked)
            lo, hi = stats.wilson_interval(k, len(checked))
            out.update(accuracy=k / len(checked), ci_low=lo, ci_high=hi)
        if len(checked) < len(group):
            out["unverified"] = len(group) - len(checked)
        return out

    by_cat: dict[str, list[EvalItem]] = {}
    for it in items:
        by_cat.setdefault(categories[it.task_id], []).append(it)
    sanity = sanity_stats([it.text for it in items], [it.tokens for it in items])
    return {
        **acc(items),
        "per_category": {c: acc(g) for c, g in sorted(by_cat.items())},
        "empty_fraction": sanity.empty_fraction,
        "repetition": sanity.repetition,
        "mean_length": sanity.mean_length,
    }


def repetition(text: str) -> float:
    """Share of the word 4-grams of `text` that repeat an earlier one (0 for fewer than 4 words)."""
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def sanity_stats(texts: Sequence[str], tokens: Sequence[int]) -> SanityStats:
    """Empty share, mean 4-gram repetition and mean length (in tokens) of a set of answers."""
    n = len(texts)
    return SanityStats(
        empty_fraction=sum(1 for t in texts if not t.strip()) / n,
        repetition=sum(repetition(t) for t in texts) / n,
        mean_length=sum(tokens) / n,
    )


def anchor_references(engine: Engine, anchor_prompts: Sequence[Prompt], max_tokens: int) -> list[str]:
    """The base model's greedy answers to the anchor prompts (compute once, store, reuse)."""
    outs = engine.generate(list(anchor_prompts), greedy(max_tokens), adapter=None)
    refs = [c.text for (c,) in outs]
    # Whitespace still has tokens to score; only answers with no text at all leave nothing.
    if not any(refs):
        raise EngineError(
            f"the base model answered all {len(refs)} anchor prompts with nothing, so the forgetting "
            "guard has nothing to measure: change evaluation.anchor_prompts or raise evaluation.anchor_max_tokens"
        )
    return refs


def anchor_nll(engine: Engine, adapter: str | None, anchor_prompts: Sequence[Prompt], references: Sequence[str]) -> float:
    """Mean per-token NLL of the base's reference answers under `adapter` (None: the base).

    Token-weighted over all anchors, so a long answer counts for its length, as it does in
    training.
    """
    scored = engine.score(list(anchor_prompts), list(references), adapter=adapter)
    n = sum(k for _, k in scored)
    if n == 0:
        raise EngineError("the anchor references have no tokens: recompute them with anchor_references()")
    return -sum(lp for lp, _ in scored) / n
