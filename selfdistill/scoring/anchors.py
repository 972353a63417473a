"""Anchor files: labelled answers a judge is measured on, for tasks that have no verifier.

A judge is trusted only after it agrees with a reference. Where a task has a verifier, the
round's verifier-scored answers are that reference; where none has, the user supplies one: a
JSONL file named by `scoring.self_judge.anchors` or `scoring.teacher_judge.anchors`, each line
one labelled item:

    {"prompt": "...", "answer": "...", "verdict": true}                    is this answer good?
    {"prompt": "...", "answer": "...", "score": 0.8}                       graded, 0-1 (>= 0.5 is good)
    {"prompt": "...", "answer_a": "...", "answer_b": "...", "preference": "a"}   which is better?

`messages` (a conversation whose last turn is the user's) may stand for `prompt`, as in task
files; `note` is free text kept for the reader. A pointwise judge is measured on the verdict
items; a pairwise judge on the preference items and on every good-versus-bad pair of verdict
items that share a prompt. Unknown fields, missing or ill-typed labels and duplicate items are
refused with their file and line (`AnchorFileError`, the first few problems and a count).

Pure: standard library only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfdistill.errors import PolicyError
from selfdistill.records import conversation_prompt, jsonl_rows, normalize_prompt, prompt_problem

POINT_FIELDS = {"answer", "verdict", "score"}
PAIR_FIELDS = {"answer_a", "answer_b", "preference"}
FIELDS = {"prompt", "messages", "note"} | POINT_FIELDS | PAIR_FIELDS
SHOWN_PROBLEMS = 5  # an anchor file with thousands of problems names this many and counts the rest


class AnchorFileError(PolicyError):
    """An anchor file cannot be read or has bad lines (every problem kept in `problems`)."""


@dataclass(frozen=True)
class PointAnchor:
    prompt: str  # a task prompt string (a conversation encoded as records.conversation_prompt does)
    answer: str
    good: bool


@dataclass(frozen=True)
class PairAnchor:
    prompt: str
    better: str
    worse: str


@dataclass
class Anchors:
    path: str
    sha256: str
    points: list[PointAnchor] = field(default_factory=list)
    pairs: list[PairAnchor] = field(default_factory=list)

    def pairwise_items(self) -> list[PairAnchor]:
        """The preference items, then each good-versus-bad pair of verdict items on one prompt."""
        by_prompt: dict[str, tuple[list[str], list[str]]] = {}
        for p in self.points:
            by_prompt.setdefault(p.prompt, ([], []))[0 if p.good else 1].append(p.answer)
        derived = [PairAnchor(prompt, g, b) for prompt, (good, bad) in by_prompt.items() for g in good for b in bad]
        return self.pairs + derived

    def provenance(self) -> dict[str, Any]:
        return {"file": self.path, "sha256": self.sha256, "verdicts": len(self.points), "preferences": len(self.pairs)}


def stored_anchors(rows: list[dict[str, Any]]) -> Anchors | None:
    """The teacher's labels kept in the store (store.teacher_anchors) as anchors; None when there are none."""
    if not rows:
        return None
    labels = [[r["kind"], r["prompt"], r["answer"], r["good"], r["answer_b"]] for r in rows]
    out = Anchors("store: teacher_anchors", hashlib.sha256(json.dumps(labels).encode()).hexdigest())
    for r in rows:
        if r["kind"] == "verdict":
            out.points.append(PointAnchor(r["prompt"], r["answer"], bool(r["good"])))
        else:
            out.pairs.append(PairAnchor(r["prompt"], r["answer"], r["answer_b"]))
    return out


def _line_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    unknown = sorted(set(row) - FIELDS)
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(FIELDS))}"
    problem = prompt_problem(row, "an anchor")
    if problem:
        return problem
    if "note" in row and not isinstance(row["note"], str):
        return "`note` must be a string"
    point, pair = POINT_FIELDS & set(row), PAIR_FIELDS & set(row)
    if point and pair:
        return f"mixes a verdict item ({', '.join(sorted(point))}) with a preference item ({', '.join(sorted(pair))}): one kind a line"
    if pair:
        missing = sorted(PAIR_FIELDS - pair)
        if missing:
            return f"a preference item needs answer_a, answer_b and preference; missing {', '.join(missing)}"
        if not all(isinstance(row[k], str) for k in ("answer_a", "answer_b")):
            return "`answer_a` and `answer_b` must be strings"
        if row["answer_a"].strip() == row["answer_b"].strip():
            return "`answer_a` and `answer_b` are the same answer: a preference between them measures nothing"
        if row["preference"] not in ("a", "b"):
            return f"`preference` must be \"a\" or \"b\", got {json.dumps(row['preference'])}"
        return None
    if "answer" not in row:
        return "no label: give `answer` with `verdict` (true/false) or `score` (0-1), or `answer_a`, `answer_b` and `preference`"
    if not isinstance(row["answer"], str):
        return f"`answer` must be a string, got {type(row['answer']).__name__}"
    if ("verdict" in row) == ("score" in row):
        return "a verdict item needs exactly one of `verdict` (true/false) and `score` (0-1)"
    if "verdict" in row and not isinstance(row["verdict"], bool):
        return f"`verdict` must be true or false, got {json.dumps(row['verdict'])}"
    if "score" in row:
        s = row["score"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 1:
            return f"`score` must be a number from 0 to 1, got {json.dumps(s)}"
    return None


def summary(path: Path | str, problems: list[str]) -> str:
    """One line for many problems: the first few and how many more."""
    shown = "; ".join(problems[:SHOWN_PROBLEMS])
    more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
    return f"{path}: {len(problems)} problem(s) in the anchor file: {shown}{more}"


def load_anchors(path: Path | str) -> Anchors:
    """Read and check an anchor file; AnchorFileError names every bad line (see the module docstring)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise AnchorFileError(f"{p}: anchor file does not exist; fix the judge's `anchors` path or remove the key") from None
    except OSError as e:
        raise AnchorFileError(f"{p}: cannot read the anchor file ({e.strerror})") from None
    out = Anchors(path=str(p), sha256=hashlib.sha256(raw).hexdigest())
    problems: list[str] = []
    seen: dict[tuple, int] = {}
    for lineno, row in jsonl_rows(raw.decode("utf-8", errors="replace").splitlines(), problems, "line "):
        problem = _line_problem(row)
        if problem:
            problems.append(f"line {lineno}: {problem}")
            continue
        prompt = conversation_prompt(row["messages"]) if "messages" in row else row["prompt"]
        if "answer" in row:
            key: tuple = ("point", normalize_prompt(prompt), row["answer"].strip())
            item: PointAnchor | PairAnchor = PointAnchor(prompt, row["answer"],
                                                         row["verdict"] if "verdict" in row else row["score"] >= 0.5)
        else:
            a, b = row["answer_a"], row["answer_b"]
            key = ("pair", normalize_prompt(prompt), frozenset((a.strip(), b.strip())))
            item = PairAnchor(prompt, *((a, b) if row["preference"] == "a" else (b, a)))
        if key in seen:
            problems.append(f"line {lineno}: the same item as line {seen[key]} (an anchor counts once)")
            continue
        seen[key] = lineno
        (out.points if isinstance(item, PointAnchor) else out.pairs).append(item)
    if not problems and not (out.points or out.pairs):
        problems.append("no anchors: the file has no items")
    if problems:
        raise AnchorFileError(summary(p, problems), [f"{p}: {x}" for x in problems])
    return out


def check_policy_anchors(policy, where: str) -> None:
    """Read each enabled judge's anchor file and check that its mode can use it; PolicyError
    (prefixed by `where`, the policy file) otherwise. `selfdistill check`, every command that
    loads a policy (the daemon's start among them) and a reload call it."""
    for who, judge in (("self_judge", policy.scoring.self_judge), ("teacher_judge", policy.scoring.teacher_judge)):
        if not judge.enabled or judge.anchors is None:
            continue
        key = f"{where}: scoring.{who}.anchors"
        try:
            anchors = load_anchors(judge.anchors)  # read again at each check: an edited file is picked up then
        except PolicyError as e:
            raise PolicyError(f"{key}: {e}", e.problems) from None
        if judge.mode == "pointwise" and not anchors.points:
            raise PolicyError(f"{key}: {judge.anchors} has no verdict items, and a pointwise judge is measured on verdicts: "
                              "add lines with `answer` and `verdict` (or `score`), or set mode = 'pairwise'")
        if judge.mode == "pairwise" and not anchors.pairwise_items():
            raise PolicyError(f"{key}: {judge.anchors} has no preference item and no good and bad verdicts on one prompt, and a "
                              "pairwise judge is measured on those: add `answer_a`/`answer_b`/`preference` lines, or set mode = 'pointwise'")
