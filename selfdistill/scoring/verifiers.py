"""Programmatic verifiers: plain functions `(answer_text, task) -> VerifierResult`.

A result carries a score in [0, 1], `correct` (True only at full score: reasoning-gym gives partial
credit, e.g. 0.5 for "30" when the answer is "3", and a partial answer is a wrong answer) and
details for the record.

Names (a task's `verifier`, or the policy's `tasks.default_verifier`):

- `reasoning_gym`: rebuilds the dataset entry from `task.metadata["reasoning_gym"]` (dataset,
  config, seed, size, index; datasets are cached) and calls the dataset's own `score_answer`.
- `exact`: the extracted answer equals the reference, after stripping surrounding whitespace.
- `normalized`: equal after case-folding, dropping punctuation and collapsing whitespace.
- `numeric` or `numeric:<tol>`: the extracted number is within tol (default 1e-6, absolute or
  relative) of the reference.
- `regex:<pattern>`: the extracted answer fully matches the pattern (no reference needed).
- `code`: the answer is Python (the last ```python fence if any, else the whole text), run in the
  sandbox against `task.metadata["tests"]` (a string of asserts, or a list of them: the score is
  the share that pass).
- `chrf` or `chrf:<threshold>`, `rougeL` or `rougeL:<threshold>`: free-text answers (summaries,
  rewrites) against the reference answer by character n-gram F-score (chrF) or longest common
  word subsequence (ROUGE-L), scoring/overlap.py. The score is the metric in [0, 1] (partial
  credit); `correct` means it reached the threshold (default 0.5), the one exception to "correct
  only at full score". They read the `<answer>` tag's content if there is one, else the whole reply.
- `auto`: `reasoning_gym` for reasoning-gym tasks, else `normalized` when the task has a reference
  answer, else no verifier (None: judges only).

Extraction rule (every verifier but `code` compares the extracted answer, never the raw text):
1. the content of the last `<answer>...</answer>` tag, if there is one;
2. else, when the reference answer is a number, the last number in the text (the bundled student
   ignores format instructions and buries its result in prose);
3. else the last non-empty line.

`register_verifier(name, fn)` adds a verifier of one's own.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import string
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

from selfdistill.config import ScoringConfig
from selfdistill.errors import SelfdistillError
from selfdistill.records import Task


class VerifierError(SelfdistillError):
    """A verifier name is unknown, or a task lacks what its verifier needs."""

    exit_code = 2


@dataclass
class VerifierResult:
    score: float
    correct: bool
    details: dict[str, Any] = field(default_factory=dict)


VerifierFn = Callable[[str, Task], VerifierResult]


@dataclass
class Verifier:
    """A resolved verifier: its full name (recorded as the scorer) and its function."""

    name: str
    fn: VerifierFn

    def __call__(self, answer_text: str, task: Task) -> VerifierResult:
        return self.fn(answer_text, task)


# --------------------------------------------------------------------------------------------
# extraction

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_PUNCT = str.maketrans("", "", string.punctuation)


def _as_number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip().replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_answer(text: str, reference: str | None = None) -> str | None:
    """The answer part of a reply (see the module docstring); None when there is none."""
    tags = _TAG.findall(text)
    if tags:
        return tags[-1].strip()
    if reference is not None and _as_number(reference) is not None:
        numbers = _NUMBER.findall(text.replace(",", ""))
        return numbers[-1] if numbers else None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else None


def _need_answer(task: Task, name: str) -> str:
    if task.answer is None:
        raise VerifierError(f"task {task.id}: verifier '{name}' needs a reference answer; give the task an `answer` or another verifier")
    return task.answer


def _result(ok: bool, extracted: str | None, **details) -> VerifierResult:
    return VerifierResult(1.0 if ok else 0.0, ok, {"extracted": extracted, **details})


# --------------------------------------------------------------------------------------------
# verifiers


def verify_exact(answer_text: str, task: Task) -> VerifierResult:
    ref = _need_answer(task, "exact")
    got = extract_answer(answer_text, ref)
    return _result(got is not None and got == ref.strip(), got)


def _normalize(text: str) -> str:
    return " ".join(text.casefold().translate(_PUNCT).split())


def verify_normalized(answer_text: str, task: Task) -> VerifierResult:
    ref = _need_answer(task, "normalized")
    got = extract_answer(answer_text, ref)
    return _result(got is not None and _normalize(got) == _normalize(ref), got)


def _numeric(tol: float) -> VerifierFn:
    def verify_numeric(answer_text: str, task: Task) -> VerifierResult:
        ref = _need_answer(task, "numeric")
        want = _as_number(ref)
        if want is None:
            raise VerifierError(f"task {task.id}: verifier 'numeric' needs a numeric answer, got {ref!r}")
        got = extract_answer(answer_text, ref)
        value = _as_number(got)
        return _result(value is not None and math.isclose(value, want, rel_tol=tol, abs_tol=tol), got)

    return verify_numeric


def _regex(pattern: str) -> VerifierFn:
    rx = re.compile(pattern)

    def verify_regex(answer_text: str, task: Task) -> VerifierResult:
        got = extract_answer(answer_text, None)
        return _result(got is not None and rx.fullmatch(got) is not None, got)

    return verify_regex


@lru_cache(maxsize=64)
def _rg_dataset(name: str, config_json: str, seed: int, size: int):
    import reasoning_gym

    return reasoning_gym.create_dataset(name, seed=seed, size=size, **json.loads(config_json))


def rg_entry(task: Task) -> tuple[Any, dict]:
    """The reasoning-gym dataset and entry a task was drawn from, rebuilt from its metadata."""
    info = task.metadata.get("reasoning_gym")
    if not info:
        raise VerifierError(f"task {task.id}: verifier 'reasoning_gym' needs metadata.reasoning_gym (tasks from a reasoning_gym source carry it)")
    ds = _rg_dataset(info["dataset"], json.dumps(info["config"], sort_keys=True), info["seed"], info["size"])
    entry = ds[info["index"]]
    if entry["question"] != task.prompt:
        raise VerifierError(
            f"task {task.id}: reasoning-gym {info['dataset']} item {info['index']} no longer matches the stored question "
            "(another reasoning-gym version?); pin reasoning-gym to the version that drew the task"
        )
    return ds, entry


def verify_reasoning_gym(answer_text: str, task: Task) -> VerifierResult:
    ds, entry = rg_entry(task)
    got = extract_answer(answer_text, entry["answer"])
    score = float(ds.score_answer(got, entry))
    return VerifierResult(score, score >= 1.0, {"extracted": got})


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)

# The harness reads a one-time token from stdin before the answer runs and prints it with the
# test count at the end: an answer that exits early (sys.exit(0), os._exit(0)) or prints a fake
# summary cannot pass. (Code that inspects the interpreter's frames could still find the token:
# the sandbox bounds the damage, this only stops the cheap tricks.)
_HARNESS = """\
import sys
def _run():
    token = sys.stdin.readline().strip()
    sys.stdin.close()
    ns = {"__name__": "__main__"}
    exec(compile(%(answer)r, "<answer>", "exec"), ns)
    passed = 0
    for test in %(tests)r:
        try:
            exec(compile(test, "<test>", "exec"), ns)
            passed += 1
        except Exception:
            pass
    print(token, passed, %(total)d)
_run()
"""


def extract_code(answer_text: str) -> str:
    fences = _FENCE.findall(answer_text)
    return fences[-1] if fences else answer_text


CODE_SANDBOX_FIX = 'run the daemon as root, or set scoring.code_sandbox = "rlimits" to accept rlimits alone on a trusted machine'


def _code(scoring: ScoringConfig, hide: tuple[str, ...]) -> VerifierFn:
    def verify_code(answer_text: str, task: Task) -> VerifierResult:
        from selfdistill.scoring.sandbox import isolation_unavailable, run_python

        why = isolation_unavailable() if scoring.code_sandbox == "isolated" else None
        if why:  # the daemon refuses to start with code tasks then; this is the last line of defence
            raise VerifierError(f"code answers are not run: {why}; {CODE_SANDBOX_FIX}")
        tests = task.metadata.get("tests")
        if not tests:
            raise VerifierError(f"task {task.id}: verifier 'code' needs metadata.tests (a string of asserts or a list of them)")
        tests = [tests] if isinstance(tests, str) else list(tests)
        code = extract_code(answer_text)
        token = secrets.token_hex(16)
        program = _HARNESS % {"answer": code, "tests": tests, "total": len(tests)}
        res = run_python(program, stdin=token + "\n", timeout_s=scoring.code_timeout_s,
                         memory_mb=scoring.code_memory_mb, hide=list(hide))
        passed = 0
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == token:
                passed = int(parts[1])
        score = passed / len(tests) if res.returncode == 0 else 0.0
        return VerifierResult(score, score >= 1.0, {
            "passed": passed, "total": len(tests), "returncode": res.returncode, "timed_out": res.timed_out,
            "isolation": res.isolation, "stderr_tail": res.stderr[-500:],
        })

    return verify_code


_REGISTRY: dict[str, VerifierFn] = {
    "exact": verify_exact,
    "normalized": verify_normalized,
    "reasoning_gym": verify_reasoning_gym,
}
_PARAMETRIC = ("numeric", "regex", "code")


def register_verifier(name: str, fn: VerifierFn) -> None:
    """Make `fn` available under `name` (a task's `verifier` field or the policy default)."""
    if name in _REGISTRY or name.split(":")[0] in _PARAMETRIC or name == "auto" or ":" in name:
        raise VerifierError(f"verifier name '{name}' is taken or contains ':'; pick another name")
    _REGISTRY[name] = fn


_OVERLAP = ("chrf", "rougeL")


def _overlap(metric: str, threshold: float) -> VerifierFn:
    from selfdistill.scoring.overlap import chrf, rouge_l

    fn = chrf if metric == "chrf" else rouge_l

    def verify_overlap(answer_text: str, task: Task) -> VerifierResult:
        ref = _need_answer(task, metric)
        tags = _TAG.findall(answer_text)
        got = (tags[-1] if tags else answer_text).strip()
        score = fn(got, ref)
        return VerifierResult(score, score >= threshold, {"extracted": got[:200], metric: round(score, 4), "threshold": threshold})

    return verify_overlap


def get_verifier(name: str, scoring: ScoringConfig | None = None, hide: tuple[str, ...] = ()) -> Verifier:
    """The verifier called `name` (not 'auto': use resolve_verifier). `scoring` sets the code sandbox limits."""
    head, _, arg = name.partition(":")
    if name in _REGISTRY:
        return Verifier(name, _REGISTRY[name])
    if head == "numeric":
        try:
            tol = float(arg) if arg else 1e-6
        except ValueError:
            raise VerifierError(f"verifier '{name}': tolerance '{arg}' is not a number; write e.g. numeric:1e-6") from None
        return Verifier(name, _numeric(tol))
    if head == "regex":
        if not arg:
            raise VerifierError(f"verifier '{name}': write regex:<pattern>")
        try:
            return Verifier(name, _regex(arg))
        except re.error as e:
            raise VerifierError(f"verifier '{name}': bad pattern ({e}); fix the regular expression") from None
    if name == "code":
        return Verifier(name, _code(scoring or ScoringConfig(), tuple(str(h) for h in hide)))
    if head in _OVERLAP:
        try:
            threshold = float(arg) if arg else 0.5
        except ValueError:
            threshold = math.nan
        if not 0 < threshold <= 1:
            raise VerifierError(f"verifier '{name}': threshold '{arg}' is not a number in (0, 1]; write e.g. {head}:0.5")
        return Verifier(name, _overlap(head, threshold))
    known = sorted([*_REGISTRY, "numeric[:tol]", "regex:<pattern>", "code", "chrf[:threshold]", "rougeL[:threshold]", "auto"])
    raise VerifierError(f"unknown verifier '{name}'; known: {', '.join(known)}")


def resolve_verifier(
    task: Task, default: str = "auto", scoring: ScoringConfig | None = None, hide: tuple[str, ...] = ()
) -> Verifier | None:
    """The verifier for a task: its own `verifier`, else `default`; 'auto' as in the module docstring.

    None means the task has no programmatic verifier (only judges can score it). `hide` is passed
    to the code sandbox: directories (the state directory) its code must not see.
    """
    name = task.verifier or default
    if name == "auto":
        if "reasoning_gym" in task.metadata:
            name = "reasoning_gym"
        elif task.answer is not None:
            name = "normalized"
        else:
            return None
    return get_verifier(name, scoring, hide)


def verify(answer_text: str, task: Task, default: str = "auto", scoring: ScoringConfig | None = None) -> VerifierResult | None:
    """Score one answer with its task's verifier; None when the task has none."""
    v = resolve_verifier(task, default, scoring)
    return None if v is None else v(answer_text, task)
