"""Task sources: turn a policy's `[[tasks.sources]]` entries into `TaskIn` records.

- `jsonl`: one JSON object per line with `prompt` or `messages` (one of the two: a conversation,
  `[{"role": "user", "content": ...}, ...]`, whose last user turn the student answers; an optional
  system turn first), `answer`, `verifier`, `category`, `metadata`, `group`. A bad line (not
  JSON, not an object, no prompt, a bad conversation, a wrong type, an unknown field) is reported
  as "FILE:LINE: what is wrong" in the `problems` list and skipped; the rest is read.
- `reasoning_gym`: `size` items of a procedural dataset. Each task keeps in
  `metadata["reasoning_gym"]` what rebuilds its entry (dataset, config, seed, size, index), so the
  `reasoning_gym` verifier can call the dataset's own `score_answer` later, and in
  `metadata["fields"]` the numbers of the entry's own metadata (the levels a difficulty
  curriculum reads). Unknown names fail with the closest known ones.
- `dataset_dir`: every *.jsonl, *.json (a list of objects) and *.parquet file of a directory
  (sorted by name), with configurable prompt and answer columns (or a `messages` column where the
  prompt column is absent); other columns go to metadata.
- `expansion`: yields nothing here; new tasks come from `selfdistill.tasks.expansion.expand_tasks`.

`TaskIn.source` is "<type>:<name>": "jsonl:PATH", "reasoning_gym:chain_sum", "dataset_dir:PATH".

Run by hand: `python -m selfdistill.tasks.sources POLICY.toml` prints how many tasks each source
yields and every problem found.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Iterator

from selfdistill.config import DatasetDirSource, ExpansionSource, JsonlSource, ReasoningGymSource
from selfdistill.errors import TaskSourceError
from selfdistill.records import TaskIn, conversation_prompt, jsonl_rows, prompt_problem

JSONL_FIELDS = {"prompt": str, "messages": list, "answer": (str, int, float), "verifier": str, "category": str, "metadata": dict, "group": (str, int)}


def source_name(cfg) -> str:
    """The `TaskIn.source` string of a source config."""
    if isinstance(cfg, ReasoningGymSource):
        return f"reasoning_gym:{cfg.dataset}"
    if isinstance(cfg, ExpansionSource):
        return f"expansion:{cfg.by}"
    return f"{cfg.type}:{cfg.path}"


def _resolve(path: Path, base_dir: Path | None) -> Path:
    return path if path.is_absolute() or base_dir is None else base_dir / path


def _answer(value: Any) -> str | None:
    # JSON numbers are accepted as answers; bool is an int subclass but never a sensible answer.
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    unknown = sorted(set(row) - set(JSONL_FIELDS))
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(JSONL_FIELDS)} (put extra data under metadata)"
    problem = prompt_problem(row, "a task")
    if problem:
        return problem
    for key, types in JSONL_FIELDS.items():
        if row.get(key) is not None and (not isinstance(row[key], types) or isinstance(row[key], bool)):
            return f"`{key}` must be {getattr(types, '__name__', 'a string or a number')}, got {type(row[key]).__name__}"
    return None


def _iter_jsonl(cfg: JsonlSource, base_dir: Path | None, problems: list[str]) -> Iterator[TaskIn]:
    path = _resolve(cfg.path, base_dir)
    if not path.is_file():
        raise TaskSourceError(f"{path}: task file does not exist; fix `path` of the jsonl source")
    name = source_name(cfg)
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, row in jsonl_rows(f, problems, f"{path}:"):
            problem = _row_problem(row)
            if problem:
                problems.append(f"{path}:{lineno}: {problem}")
                continue
            yield TaskIn(
                source=name, prompt=conversation_prompt(row["messages"]) if "messages" in row else row["prompt"],
                answer=_answer(row.get("answer")),
                verifier=row.get("verifier"), category=row.get("category") or "", metadata=row.get("metadata") or {},
                group=str(row["group"]) if row.get("group") is not None else None,
            )


def _iter_reasoning_gym(cfg: ReasoningGymSource) -> Iterator[TaskIn]:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if cfg.dataset not in DATASETS:
        close = difflib.get_close_matches(cfg.dataset, list(DATASETS), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"see reasoning_gym.factory.DATASETS ({len(DATASETS)} names)"
        raise TaskSourceError(f"reasoning-gym has no dataset '{cfg.dataset}'; {hint}")
    try:
        ds = reasoning_gym.create_dataset(cfg.dataset, seed=cfg.seed, size=cfg.size, **cfg.config)
    except Exception as e:  # the dataset's own config validation: surface it as a source error
        raise TaskSourceError(f"reasoning-gym '{cfg.dataset}' rejects config {cfg.config}: {e}; fix the source's `config`") from e
    from selfdistill.tasks.groups import reasoning_gym_group

    name = source_name(cfg)
    for index in range(cfg.size):
        entry = ds[index]
        yield TaskIn(
            source=name, prompt=entry["question"], answer=str(entry["answer"]), verifier=None, category=cfg.dataset,
            group=reasoning_gym_group(cfg.dataset, entry),
            metadata={"reasoning_gym": {"dataset": cfg.dataset, "config": cfg.config, "seed": cfg.seed,
                                        "size": cfg.size, "index": index},
                      "fields": _numeric_fields(entry)},
        )


def _numeric_fields(entry: dict) -> dict[str, float]:
    """The numbers of a reasoning-gym entry's metadata (chain_sum's num_terms, num_digits, ...): what a
    difficulty curriculum can read a task's level from (`tasks.curriculum.level_field`)."""
    from selfdistill.tasks.curriculum import is_number

    md = entry.get("metadata") or {}
    return {k: v for k, v in md.items() if is_number(v) and k != "source_index"}


def _dir_rows(path: Path, problems: list[str]) -> Iterator[tuple[str, dict]]:
    for file in sorted(path.iterdir()):
        if file.suffix == ".jsonl":
            with file.open(encoding="utf-8", errors="replace") as f:
                for lineno, row in jsonl_rows(f, problems, f"{file}:"):
                    yield f"{file}:{lineno}", row
        elif file.suffix == ".json":
            try:
                rows = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                problems.append(f"{file}:{e.lineno}: not JSON ({e.msg})")
                continue
            if not isinstance(rows, list):
                problems.append(f"{file}: expected a JSON list of objects, got {type(rows).__name__}")
                continue
            for i, row in enumerate(rows):
                yield f"{file}[{i}]", row
        elif file.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise TaskSourceError(f"{file}: reading parquet needs pyarrow; `pip install pyarrow` or convert to JSONL") from None
            for i, row in enumerate(pq.read_table(file).to_pylist()):
                yield f"{file}[{i}]", row


def _iter_dataset_dir(cfg: DatasetDirSource, base_dir: Path | None, problems: list[str]) -> Iterator[TaskIn]:
    path = _resolve(cfg.path, base_dir)
    if not path.is_dir():
        raise TaskSourceError(f"{path}: dataset directory does not exist; fix `path` of the dataset_dir source")
    name = source_name(cfg)
    for where, row in _dir_rows(path, problems):
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object, got {type(row).__name__}")
            continue
        prompt = row.get(cfg.prompt_field)
        took_messages = prompt is None and "messages" in row  # a conversation column, as in a JSONL task
        if took_messages:
            try:
                prompt = conversation_prompt(row["messages"])
            except ValueError as e:  # conversation_prompt checks it: what is wrong, one line
                problems.append(f"{where}: {e}")
                continue
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{where}: missing or empty `{cfg.prompt_field}` (set prompt_field to the prompt column, or give `messages`)")
            continue
        answer = row.get(cfg.answer_field) if cfg.answer_field else None
        used = (cfg.prompt_field, cfg.answer_field, "verifier", "category", "metadata") + (("messages",) if took_messages else ())
        rest = {k: v for k, v in row.items() if k not in used}
        yield TaskIn(
            source=name, prompt=prompt, answer=_answer(answer), verifier=row.get("verifier"),
            category=row.get("category") or "", metadata={**(row.get("metadata") or {}), **rest},
        )


def iter_source(cfg, base_dir: Path | None = None, problems: list[str] | None = None) -> Iterator[TaskIn]:
    """The tasks of one source config. Relative paths are taken from `base_dir` (the policy's
    directory). Bad rows are appended to `problems` (when given) and skipped; a missing file or an
    unknown dataset raises TaskSourceError."""
    problems = problems if problems is not None else []
    if isinstance(cfg, JsonlSource):
        return _iter_jsonl(cfg, base_dir, problems)
    if isinstance(cfg, ReasoningGymSource):
        return _iter_reasoning_gym(cfg)
    if isinstance(cfg, DatasetDirSource):
        return _iter_dataset_dir(cfg, base_dir, problems)
    if isinstance(cfg, ExpansionSource):
        return iter(())
    raise TypeError(f"not a task source config: {type(cfg).__name__}")


def load_source(cfg, base_dir: Path | None = None) -> tuple[list[TaskIn], list[str]]:
    """All tasks of a source, and the problems met reading it."""
    problems: list[str] = []
    tasks = list(iter_source(cfg, base_dir, problems))
    return tasks, problems


if __name__ == "__main__":
    import sys

    from selfdistill.config import load_policy

    policy_path = Path(sys.argv[1])
    policy = load_policy(policy_path)
    for src in policy.tasks.sources:
        tasks, probs = load_source(src, policy_path.parent)
        print(f"{source_name(src)}: {len(tasks)} tasks, {len(probs)} problems")
        for p in probs:
            print("  " + p)
