"""Scored candidates -> ranked (chosen, rejected) pairs and SFT examples, and their TRL files.

- `build_pairs(candidates_by_task, prompts, cfg)` forms preference pairs per task with one of three
  strategies (`best_vs_worst`, `all_above_margin`, `verified_chosen`), drops near-identical sides
  and duplicate pairs, optionally keeps only length-matched pairs, caps pairs per task and weights
  each pair by the source of its signal (`cfg.weights`).
- `build_sft(candidates_by_task, prompts, cfg)` keeps verified-correct answers (rejection
  sampling) or the top-scored ones, deduplicated and capped.
- `candidate_from(...)` merges a verifier verdict and a judge score into one `Candidate`: the
  verifier outranks any judge, so no judge (fooled or not) can change a verifier-backed ranking.
- `export_jsonl` / `export_sft_jsonl` write TRL's conversational formats (prompt/chosen/rejected;
  messages), atomically.
- `build_groups(candidates_by_task, prompts, cfg, ...)` keeps each task's k answers with their
  rewards (the policy-gradient stage's groups), dropping answers without a usable reward and
  groups whose rewards are all equal (they carry no signal), and counts both.
- `similarity(a, b)` is the ROUGE-L F-measure over whitespace tokens; task expansion uses it too.

Scores are in [0, 1] (a judge's 1-10 is mapped by the caller: (s - 1) / 9; a pairwise judge's is
the answer's share of won matches, and its pairs are only matches the chosen side won). Candidates are only
compared with candidates scored by the same source: a verifier's 0.0 and a judge's 0.3 do not
share a scale. `prompts[task_id]` is the prompt exactly as the student was asked (suffix included).

Pure: standard library and selfdistill.records only.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

from selfdistill.config import PairsConfig, RLConfig
from selfdistill.records import Candidate, GroupRecord, GroupSample, PairRecord, SftRecord, chat_messages, normalize_prompt

# Which signal wins when a task has candidates scored by several: the verifier first, then the
# teacher, then the student's own judgment.
SOURCE_RANK = ("verifier", "teacher", "reward_model", "self")


def _tokens(text: str) -> list[str]:
    return text.lower().split()


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def similarity(a: str, b: str, at_least: float = 0.0) -> float:
    """ROUGE-L F1 of two texts over lower-cased whitespace tokens, in [0, 1].

    With `at_least`, returns 0.0 early when the bag-of-tokens overlap (an upper bound on the LCS)
    already shows the score cannot reach it: the quadratic LCS runs only on plausible duplicates.
    """
    ta, tb = _tokens(a), _tokens(b)
    if not ta or not tb:
        return 1.0 if ta == tb else 0.0
    overlap = sum((Counter(ta) & Counter(tb)).values())
    if 2 * overlap / (len(ta) + len(tb)) < at_least:
        return 0.0
    return 2 * _lcs(ta, tb) / (len(ta) + len(tb))


def _norm(text: str) -> str:
    return normalize_prompt(text)


def _weight(cfg: PairsConfig, source: str) -> float:
    if source not in cfg.weights:
        raise ValueError(f"pairs.weights has no weight for signal source '{source}': add `{source} = <weight>` to [pairs.weights]")
    return cfg.weights[source]


def candidate_from(
    task_id: int,
    text: str,
    *,
    verifier_score: float | None = None,
    verifier_correct: bool | None = None,
    judge_score: float | None = None,
    judge_source: str = "self",
    generation_id: int | None = None,
    tokens: int = 0,
    beat: tuple[int, ...] | None = None,
) -> Candidate:
    """One candidate from whatever signals exist; a verifier verdict always outranks a judge's."""
    if verifier_score is not None:
        return Candidate(task_id, text, verifier_score, verifier_correct, "verifier", generation_id, tokens)
    return Candidate(task_id, text, judge_score, None, judge_source, generation_id, tokens, beat)


def candidates_from_scores(scores: Iterable[dict], ignore_sources: set[str] = frozenset()) -> dict[int, list[Candidate]]:
    """One candidate per generation from all its stored score rows (`scorer` "verifier:NAME",
    "self:..." or "teacher:..."; `score`, `correct`, `generation_id`, `task_id`, `text`,
    `completion_tokens`), grouped by task. Rows of a source in `ignore_sources` (an unhealthy
    judge) count for nothing. `candidate_from` ranks the signals: a verifier's verdict outranks
    a judge's; among judges SOURCE_RANK decides (teacher, then a reward model, then the student's own)."""
    signals: dict[int, dict] = {}
    for s_ in scores:
        source = s_["scorer"].split(":")[0]
        if source in ignore_sources:
            continue
        sig = signals.setdefault(s_["generation_id"], {"row": s_})
        if source == "verifier":
            sig["verifier"] = (s_["score"], None if s_["correct"] is None else bool(s_["correct"]))
        elif s_["score"] is not None and ("judge" not in sig or _rank(source) < _rank(sig["judge"][1])):
            beat = (s_.get("details") or {}).get("beat") if s_["scorer"].endswith(":pairwise") else None
            sig["judge"] = (s_["score"], source, None if beat is None else tuple(beat))
    by_task: dict[int, list[Candidate]] = {}
    for gid, sig in signals.items():
        row = sig["row"]
        v_score, v_correct = sig.get("verifier", (None, None))
        j_score, j_source, beat = sig.get("judge", (None, "self", None))
        c = candidate_from(row["task_id"], row["text"], verifier_score=v_score, verifier_correct=v_correct,
                           judge_score=j_score, judge_source=j_source, generation_id=gid, tokens=row["completion_tokens"], beat=beat)
        by_task.setdefault(c.task_id, []).append(c)
    return by_task


def _rank(source: str) -> int:
    return SOURCE_RANK.index(source) if source in SOURCE_RANK else len(SOURCE_RANK)


def _usable(cands: list[Candidate], side=None) -> list[Candidate]:
    """Scored candidates of the strongest signal source present, exact duplicates removed (within
    each `side(candidate)` class, where given: the base's answer and the round's, alike in text,
    are both kept, since only one of them may be rejected)."""
    scored = [c for c in cands if c.score is not None]
    if not scored:
        return []
    ranked = sorted({c.source for c in scored}, key=_rank)
    best = [c for c in scored if c.source == ranked[0]]
    seen: set = set()
    out = []
    for c in best:
        text = _norm(c.text)
        key = (text, side(c)) if side else text
        if text and key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _length(c: Candidate) -> int:
    return c.tokens if c.tokens > 0 else max(1, len(c.text.split()))


def _pairs_for_task(cands: list[Candidate], cfg: PairsConfig, chosen_ids: set[int] | None = None,
                    rejected_ids: set[int] | None = None) -> list[tuple[Candidate, Candidate]]:
    ups = [c for c in cands if chosen_ids is None or c.generation_id in chosen_ids]
    downs = [c for c in cands if rejected_ids is None or c.generation_id in rejected_ids]
    options: list[tuple[Candidate, Candidate]] = []
    if not ups or not downs:
        return []
    if cfg.strategy == "verified_chosen":
        good = [c for c in ups if c.correct is True]
        bad = [c for c in downs if c.correct is False]
        options = [(g, b) for g in good for b in bad if g.score - b.score >= cfg.min_margin]
    elif cfg.strategy == "best_vs_worst":
        hi = max(c.score for c in ups)
        lo = min(c.score for c in downs)
        if hi - lo >= cfg.min_margin:
            options = [(g, b) for g in ups if g.score == hi for b in downs if b.score == lo and g is not b]
    else:  # all_above_margin
        options = [(g, b) for g in ups for b in downs if g.score - b.score >= cfg.min_margin and g is not b]
    if any(c.beat is not None for c in cands):
        # a pairwise judge's win shares come from separate matches: a pair is only a match the
        # chosen side won, never the winner of one match against the loser of another
        options = [(g, b) for g, b in options if b.generation_id in (g.beat or ())]
    if cfg.length_match:
        options = [
            (g, b) for g, b in options
            if max(_length(g), _length(b)) / min(_length(g), _length(b)) <= cfg.length_ratio_max
        ]
    options = [(g, b) for g, b in options if similarity(g.text, b.text, cfg.near_duplicate_threshold) < cfg.near_duplicate_threshold]
    # Largest margin first; among equals, the closest lengths (less length bias to learn).
    options.sort(key=lambda p: (-(p[0].score - p[1].score), abs(_length(p[0]) - _length(p[1]))))
    # First pass uses each answer at most once (more distinct evidence), second fills the cap.
    chosen: list[tuple[Candidate, Candidate]] = []
    used: set[int] = set()
    for g, b in options:
        if len(chosen) < cfg.max_pairs_per_task and id(g) not in used and id(b) not in used:
            chosen.append((g, b))
            used.update((id(g), id(b)))
    for g, b in options:
        if len(chosen) >= cfg.max_pairs_per_task:
            break
        if (g, b) not in chosen:
            chosen.append((g, b))
    return chosen


def build_pairs(
    candidates_by_task: dict[int, list[Candidate]], prompts: dict[int, str], cfg: PairsConfig,
    chosen_ids: set[int] | None = None, rejected_ids: set[int] | None = None,
) -> list[PairRecord]:
    """Preference pairs from the scored answers of each task (see the module docstring).

    `chosen_ids` / `rejected_ids` (generation ids), where given, are the only answers that may be a
    chosen / rejected side: anchored rejection (pairs.rejected_from = "base") chooses among the
    round's own answers and rejects among the base's. An answer in both sets may be either side
    (the base is the incumbent), never both of one pair."""
    out: list[PairRecord] = []
    seen: set[tuple[str, str, str]] = set()
    def side(c: Candidate) -> tuple[bool, bool]:
        return (chosen_ids is None or c.generation_id in chosen_ids, rejected_ids is None or c.generation_id in rejected_ids)

    anchored = chosen_ids is not None or rejected_ids is not None
    for task_id in sorted(candidates_by_task):
        cands = _usable(candidates_by_task[task_id], side if anchored else None)
        if len(cands) < 2:
            continue
        prompt = prompts[task_id]
        for g, b in _pairs_for_task(cands, cfg, chosen_ids, rejected_ids):
            key = (_norm(prompt), _norm(g.text), _norm(b.text))
            if key in seen:
                continue
            seen.add(key)
            out.append(PairRecord(
                task_id=task_id, prompt=prompt, chosen=g.text, rejected=b.text,
                margin=g.score - b.score, weight=_weight(cfg, g.source), source=g.source,
                chosen_gen_id=g.generation_id, rejected_gen_id=b.generation_id,
            ))
    return out


def build_sft(
    candidates_by_task: dict[int, list[Candidate]], prompts: dict[int, str], cfg: PairsConfig
) -> list[SftRecord]:
    """SFT examples: verified-correct answers (`sft_from="verified"`) or each task's top-scored."""
    if cfg.sft_from == "none" or cfg.max_sft_per_task == 0:
        return []
    out: list[SftRecord] = []
    for task_id in sorted(candidates_by_task):
        cands = _usable(candidates_by_task[task_id])
        if cfg.sft_from == "verified":
            keep = [c for c in cands if c.correct is True]
            tag = "verifier"
        else:
            if not cands:
                continue
            top = max(c.score for c in cands)
            keep = [c for c in cands if c.score == top and top > 0]
            tag = "top"
        # Shorter correct answers first: the student should learn to answer, not to ramble.
        keep.sort(key=lambda c: (-c.score, _length(c)))
        picked: list[Candidate] = []
        for c in keep:
            if len(picked) >= cfg.max_sft_per_task:
                break
            if all(similarity(c.text, p.text, cfg.near_duplicate_threshold) < cfg.near_duplicate_threshold for p in picked):
                picked.append(c)
        for c in picked:
            out.append(SftRecord(task_id=task_id, prompt=prompts[task_id], completion=c.text,
                                 weight=_weight(cfg, c.source), source=tag, generation_id=c.generation_id))
    return out


def _write_jsonl_atomic(rows: Iterable[dict], path: str | os.PathLike[str]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def export_jsonl(pairs: list[PairRecord], path: str | os.PathLike[str], system_prompt: str | None = None) -> int:
    """TRL conversational preference rows: {"prompt": [messages], "chosen": [...], "rejected": [...]}."""
    return _write_jsonl_atomic(
        ({
            "prompt": chat_messages(p.prompt, system_prompt),
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        } for p in pairs),
        path,
    )


def export_sft_jsonl(examples: list[SftRecord], path: str | os.PathLike[str], system_prompt: str | None = None) -> int:
    """TRL conversational language-modeling rows: {"messages": [system?, user, assistant]}."""
    return _write_jsonl_atomic(
        ({"messages": chat_messages(e.prompt, system_prompt) + [{"role": "assistant", "content": e.completion}]}
         for e in examples),
        path,
    )


def sample_reward(c: Candidate, cfg: RLConfig, finish_reason: str | None, max_tokens: int) -> float | None:
    """A candidate's reward for the policy gradient, or None where it has no usable number.

    The verifier's score (partial credit) or its 1/0 verdict per `cfg.reward`; a judge's score where
    the task has no verifier (candidates of unhealthy judges never get here); minus the named
    shaping terms: `length_penalty` times the answer's share of `max_tokens`, `truncation_penalty`
    for an answer cut at the limit."""
    import math

    if c.source == "verifier" and cfg.reward == "correct":
        if c.correct is None:
            return None
        r = 1.0 if c.correct else 0.0
    else:
        if not isinstance(c.score, (int, float)) or isinstance(c.score, bool) or not math.isfinite(c.score):
            return None
        r = float(c.score)
    r -= cfg.length_penalty * min(1.0, c.tokens / max(1, max_tokens))
    if finish_reason == "length":
        r -= cfg.truncation_penalty
    return r


def build_groups(by_task: dict[int, list[Candidate]], prompts: dict[int, str], cfg: RLConfig, *,
                 finish_reasons: dict[int, str | None] | None = None, max_tokens: int = 128,
                 logprobs: dict[int, tuple[list[int], list[float]]] | None = None) -> tuple[list[GroupRecord], dict[str, int]]:
    """Groups of each task's answers with their rewards, and the counts of what was left out.

    Only the strongest signal source present in a task ranks it (a verifier outranks any judge), as
    for pairs. Exact duplicates stay: they are k draws of one policy and count as often as drawn.
    Counts: `groups` kept, `flat_groups` (every reward equal: no advantage), `dropped_samples` (no
    usable reward), `samples` kept, `with_logprobs` (samples with stored sampling log-probabilities)."""
    finish_reasons = finish_reasons or {}
    logprobs = logprobs or {}
    counts = {"groups": 0, "flat_groups": 0, "dropped_samples": 0, "samples": 0, "with_logprobs": 0}
    out: list[GroupRecord] = []
    for tid in sorted(by_task):
        cands = by_task[tid]
        sources = {c.source for c in cands if c.score is not None}
        if not sources:
            counts["dropped_samples"] += len(cands)
            continue
        top = min(sources, key=_rank)
        samples = []
        for c in sorted(cands, key=lambda c: c.generation_id or 0):
            r = sample_reward(c, cfg, finish_reasons.get(c.generation_id), max_tokens) if c.source == top else None
            if r is None:
                counts["dropped_samples"] += 1
                continue
            ids, lps = logprobs.get(c.generation_id, (None, None))
            samples.append(GroupSample(c.text, r, c.generation_id, ids, lps))
        if len(samples) < 2 or max(s.reward for s in samples) - min(s.reward for s in samples) < 1e-9:
            counts["flat_groups"] += 1
            continue
        out.append(GroupRecord(tid, prompts[tid], samples))
        counts["groups"] += 1
        counts["samples"] += len(samples)
        counts["with_logprobs"] += sum(1 for s in samples if s.logprobs is not None)
    return out, counts
