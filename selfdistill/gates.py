"""The promotion gate: metrics of a candidate and of the incumbent on the same held-out items in,
promote or reject out, with every reason and every number behind it.

`decide(candidate, incumbent, cfg)` applies the rules of a policy's `[gates]` table:

- accuracy: gain >= min_gain, and the paired test (exact one-sided McNemar, or a paired
  bootstrap, or none) significant at alpha;
- categories: when items carry two or more categories, none with at least min_category_items
  items loses more than max_category_regression;
- forgetting guard: the mean per-token NLL of the base model's answers to the anchor prompts
  rises by at most max_anchor_nll_increase, measured from the base (so drift cannot creep in a
  little per round) or, when no base figure is given, from the incumbent;
- sanity: share of empty answers, mean 4-gram repetition and the change of mean answer length;
- pairwise judging: the candidate's win rate, when it was measured.

`gate_can_pass(policy)` runs the rules on the best outcome a policy allows and reports the
settings under which no candidate could ever be promoted (`selfdistill check` prints them).

Pure: standard library and selfdistill.stats only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping

from selfdistill import stats

# A fixed seed: the same metrics must always give the same decision.
BOOTSTRAP_SEED = 0
REPORT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class SanityStats:
    """Degeneration signs of a set of answers."""

    empty_fraction: float  # share of answers that are empty after stripping whitespace
    repetition: float  # mean over answers of the share of word 4-grams that repeat an earlier one
    mean_length: float  # mean completion length in tokens


@dataclass
class EvalMetrics:
    """One checkpoint's evaluation, as the gate sees it.

    `correct` and `categories` are keyed by task id; candidate and incumbent must hold the same
    ids. `anchor_nll` is None when the policy has no anchor prompts; `win_rate` (the candidate's
    pairwise win rate against the incumbent) is None when pairwise judging is off.
    """

    correct: Mapping[Hashable, bool]
    sanity: SanityStats
    categories: Mapping[Hashable, str] = field(default_factory=dict)  # a missing id is category ""
    anchor_nll: float | None = None
    win_rate: float | None = None
    win_rate_problem: str | None = None  # why the judge behind win_rate is not trusted: the rule then fails
    unverified: int = 0  # held-out items no verifier can check (not in `correct`; the pairwise judge measures them)

    @property
    def accuracy(self) -> float:
        return sum(map(bool, self.correct.values())) / len(self.correct)


@dataclass
class GateDecision:
    promote: bool
    reasons: list[str]  # rejected: every failed rule; promoted: every rule that was checked
    numbers: dict[str, Any]  # JSON-ready: every figure the rules used


def decide(
    candidate: EvalMetrics,
    incumbent: EvalMetrics,
    cfg,
    *,
    base_anchor_nll: float | None = None,
) -> GateDecision:
    """Promote `candidate` over `incumbent` under the GateConfig `cfg`?"""
    ids = sorted(candidate.correct, key=str)
    if set(ids) != set(incumbent.correct):
        only_c = len(set(candidate.correct) - set(incumbent.correct))
        only_i = len(set(incumbent.correct) - set(candidate.correct))
        raise ValueError(
            f"candidate and incumbent were evaluated on different items ({only_c} only in the "
            f"candidate, {only_i} only in the incumbent): evaluate both on the same held-out tasks"
        )
    if not ids and not candidate.unverified:
        raise ValueError("no held-out items were evaluated: the gate needs at least one")
    passed: list[str] = []
    failed: list[str] = []

    def rule(ok: bool, text: str) -> None:
        (passed if ok else failed).append(text)

    numbers: dict[str, Any] = {"n": len(ids), "unverified": candidate.unverified}
    if ids:
        numbers.update(_accuracy_rules(candidate, incumbent, ids, cfg, rule))
    else:
        # every held-out item lacks a verifier: only the pairwise judge can say which model is better
        numbers.update(accuracy_candidate=None, accuracy_incumbent=None, gain=None, test=cfg.test, p_value=None, categories={})
        if candidate.win_rate is None:
            rule(False, f"none of the {candidate.unverified} held-out items has a verifier and no pairwise judge measured the "
                 "candidate: set evaluation.pairwise_judge (with a healthy judge), or give held-out tasks an answer or a verifier")
        else:
            rule(True, f"accuracy not measured: none of the {candidate.unverified} held-out items has a verifier "
                 "(the pairwise win rate decides)")

    # forgetting guard
    numbers["anchor_nll_candidate"] = candidate.anchor_nll
    numbers["anchor_nll_reference"] = None
    numbers["anchor_nll_increase"] = None
    if candidate.anchor_nll is not None:
        ref_name = "base" if base_anchor_nll is not None else "incumbent"
        ref = base_anchor_nll if base_anchor_nll is not None else incumbent.anchor_nll
        if ref is None:
            raise ValueError("the candidate has an anchor NLL but the incumbent has none: measure both, or pass base_anchor_nll")
        increase = candidate.anchor_nll - ref
        numbers.update(anchor_nll_reference=ref, anchor_nll_reference_of=ref_name, anchor_nll_increase=increase)
        ok = increase <= cfg.max_anchor_nll_increase
        rule(ok, f"anchor NLL {ref:.4f} ({ref_name}) -> {candidate.anchor_nll:.4f} ({increase:+.4f}) "
             f"{'<=' if ok else '>'} max_anchor_nll_increase {cfg.max_anchor_nll_increase:g}")

    # sanity
    cs, is_ = candidate.sanity, incumbent.sanity
    # An incumbent that answers (almost) nothing must not make every candidate look like a blowup.
    ratio = max(cs.mean_length, 1.0) / max(is_.mean_length, 1.0)
    numbers["sanity_candidate"] = vars(cs).copy()
    numbers["sanity_incumbent"] = vars(is_).copy()
    numbers["length_ratio"] = ratio
    rule(cs.empty_fraction <= cfg.max_empty_fraction,
         f"empty answers {cs.empty_fraction:.4f} {'<=' if cs.empty_fraction <= cfg.max_empty_fraction else '>'} "
         f"max_empty_fraction {cfg.max_empty_fraction:g}")
    rule(cs.repetition <= cfg.max_repetition,
         f"4-gram repetition {cs.repetition:.4f} {'<=' if cs.repetition <= cfg.max_repetition else '>'} "
         f"max_repetition {cfg.max_repetition:g}")
    ok = 1 / cfg.max_length_ratio <= ratio <= cfg.max_length_ratio
    rule(ok, f"mean length {is_.mean_length:.1f} -> {cs.mean_length:.1f} tokens (x{ratio:.3f}) "
         f"{'within' if ok else 'outside'} max_length_ratio {cfg.max_length_ratio:g}")

    # pairwise judging
    numbers["win_rate"] = candidate.win_rate
    if candidate.win_rate is not None and candidate.win_rate_problem:
        rule(False, f"pairwise win rate {candidate.win_rate:.4f} not trusted: {candidate.win_rate_problem}")
    elif candidate.win_rate is not None:
        ok = candidate.win_rate >= cfg.min_win_rate
        rule(ok, f"pairwise win rate {candidate.win_rate:.4f} {'>=' if ok else '<'} min_win_rate {cfg.min_win_rate:g}")

    promote = not failed
    return GateDecision(promote=promote, reasons=passed if promote else failed, numbers=numbers)


def _accuracy_rules(candidate: EvalMetrics, incumbent: EvalMetrics, ids: list, cfg, rule: Callable[[bool, str], None]) -> dict[str, Any]:
    """The accuracy gain, significance and per-category rules on the verified held-out items."""
    cand = [bool(candidate.correct[t]) for t in ids]
    inc = [bool(incumbent.correct[t]) for t in ids]
    n = len(ids)
    wins, losses = stats.discordant(cand, inc)
    gain = (wins - losses) / n
    _, ci_low, ci_high, boot_p = stats.paired_bootstrap(
        cand, inc, samples=cfg.bootstrap_samples, seed=BOOTSTRAP_SEED, confidence=REPORT_CONFIDENCE
    )
    p_value = {"mcnemar": stats.mcnemar_one_sided(wins, losses), "bootstrap": boot_p, "none": None}[cfg.test]
    numbers: dict[str, Any] = {
        "accuracy_candidate": sum(cand) / n,
        "accuracy_incumbent": sum(inc) / n,
        "ci_candidate": list(stats.wilson_interval(sum(cand), n, REPORT_CONFIDENCE)),
        "ci_incumbent": list(stats.wilson_interval(sum(inc), n, REPORT_CONFIDENCE)),
        "gain": gain,
        "gain_ci": [ci_low, ci_high],
        "wins": wins,
        "losses": losses,
        "test": cfg.test,
        "p_value": p_value,
    }
    rule(gain >= cfg.min_gain, f"accuracy gain {gain:+.4f} (95% CI {ci_low:+.4f}..{ci_high:+.4f}, "
         f"{numbers['accuracy_incumbent']:.4f} -> {numbers['accuracy_candidate']:.4f} on {n} items) "
         f"{'>=' if gain >= cfg.min_gain else '<'} min_gain {cfg.min_gain:+.4f}")
    if p_value is not None:
        rule(p_value <= cfg.alpha, f"{cfg.test} p = {p_value:.4g} ({wins} wins, {losses} losses) "
             f"{'<=' if p_value <= cfg.alpha else '>'} alpha {cfg.alpha:g}")
    by_cat: dict[str, list[int]] = {}
    for k, t in enumerate(ids):
        by_cat.setdefault(candidate.categories.get(t, ""), []).append(k)
    cat_numbers = {}
    for cat, idx in sorted(by_cat.items()):
        c_acc = sum(cand[k] for k in idx) / len(idx)
        i_acc = sum(inc[k] for k in idx) / len(idx)
        # One category is the whole item set, which the gain rule already judged.
        checked = len(by_cat) > 1 and len(idx) >= cfg.min_category_items
        cat_numbers[cat] = {"n": len(idx), "candidate": c_acc, "incumbent": i_acc,
                            "delta": c_acc - i_acc, "checked": checked}
        if checked:
            ok = c_acc - i_acc >= -cfg.max_category_regression
            rule(ok, f"category {cat or '(none)'!r} {i_acc:.4f} -> {c_acc:.4f} ({c_acc - i_acc:+.4f} on "
                 f"{len(idx)} items) {'within' if ok else 'regresses more than'} "
                 f"max_category_regression {cfg.max_category_regression:g}")
    numbers["categories"] = cat_numbers
    return numbers


def gate_can_pass(policy) -> list[str]:
    """Problems of a policy under which no candidate can ever be promoted (empty: it can).

    The rules are run on the best outcome possible: a candidate right on every held-out item
    where the incumbent is wrong on every one, with perfect sanity, no drift and a full pairwise
    win. Whatever still fails, fails for every candidate.
    """
    n = policy.evaluation.heldout_items
    sane = SanityStats(empty_fraction=0.0, repetition=0.0, mean_length=1.0)
    measured_win = 1.0 if policy.evaluation.pairwise_judge != "none" else None
    anchors = 0.0 if policy.evaluation.anchor_prompts else None
    best = EvalMetrics(correct={k: True for k in range(n)}, sanity=sane, anchor_nll=anchors, win_rate=measured_win)
    worst = EvalMetrics(correct={k: False for k in range(n)}, sanity=sane, anchor_nll=anchors)
    decision = decide(best, worst, policy.gates)
    if decision.promote:
        return []
    return [
        f"gates can never pass, even for a candidate right on all {n} held-out items "
        f"(evaluation.heldout_items) where the incumbent is wrong on all: {reason}"
        for reason in decision.reasons
    ]
