"""Task sources: a JSONL file with bad lines, real reasoning-gym datasets, a dataset directory."""

import json

import pytest

from selfdistill.config import DatasetDirSource, ExpansionSource, JsonlSource, ReasoningGymSource
from selfdistill.errors import TaskSourceError
from selfdistill.tasks.sources import iter_source, load_source, source_name

GOOD = [
    {"prompt": "What is 2 + 2?", "answer": "4", "category": "math"},
    {"prompt": "Capital of France?", "answer": "Paris", "verifier": "normalized", "metadata": {"level": 1}},
    {"prompt": "Write anything."},
    {"prompt": "How many legs has a cat?", "answer": 4},
]
BAD = [
    ('{"prompt": "unterminated', "not JSON"),
    ('["a", "list"]', "expected a JSON object, got list"),
    ('{"answer": "4"}', "missing or empty `prompt`"),
    ('{"prompt": "   "}', "missing or empty `prompt`"),
    ('{"prompt": "q", "answer": ["4"]}', "`answer` must be a string or a number, got list"),
    ('{"prompt": "q", "answer": true}', "`answer` must be a string or a number, got bool"),
    ('{"prompt": "q", "metadata": "x"}', "`metadata` must be dict, got str"),
    ('{"prompt": "q", "id": 3}', "unknown field(s) id"),
]


def test_jsonl_bad_lines_reported_with_file_and_line(tmp_path):
    path = tmp_path / "tasks.jsonl"
    lines = []
    for i in range(max(len(GOOD), len(BAD))):
        if i < len(GOOD):
            lines.append(json.dumps(GOOD[i]))
        if i < len(BAD):
            lines.append(BAD[i][0])
        lines.append("")  # blank lines are fine
    path.write_text("\n".join(lines) + "\n")
    tasks, problems = load_source(JsonlSource(type="jsonl", path=path))
    assert [t.prompt for t in tasks] == [g["prompt"] for g in GOOD]
    assert tasks[0].answer == "4" and tasks[0].category == "math" and tasks[0].source == f"jsonl:{path}"
    assert tasks[1].verifier == "normalized" and tasks[1].metadata == {"level": 1}
    assert tasks[2].answer is None and tasks[3].answer == "4"
    assert len(problems) == len(BAD)
    for problem, (line, message) in zip(problems, BAD):
        lineno = lines.index(line) + 1
        assert problem.startswith(f"{path}:{lineno}: ") and message in problem, problem


def test_jsonl_relative_to_base_dir_and_missing(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"prompt": "x"}\n')
    assert len(load_source(JsonlSource(type="jsonl", path="t.jsonl"), tmp_path)[0]) == 1
    with pytest.raises(TaskSourceError, match="nope.jsonl: task file does not exist"):
        load_source(JsonlSource(type="jsonl", path="nope.jsonl"), tmp_path)


def test_reasoning_gym_source():
    cfg = ReasoningGymSource(type="reasoning_gym", dataset="chain_sum", seed=5, size=12,
                             config={"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1})
    tasks = list(iter_source(cfg))
    assert len(tasks) == 12 and len({t.key for t in tasks}) >= 6
    t = tasks[4]
    assert t.source == "reasoning_gym:chain_sum" and t.category == "chain_sum"
    assert t.metadata["reasoning_gym"] == {"dataset": "chain_sum", "config": cfg.config, "seed": 5, "size": 12, "index": 4}
    import reasoning_gym

    entry = reasoning_gym.create_dataset("chain_sum", seed=5, size=12, **cfg.config)[4]
    assert (t.prompt, t.answer) == (entry["question"], entry["answer"])
    # the entry's numbers, what a difficulty curriculum reads a level from
    assert t.metadata["fields"] == {"num_terms": entry["metadata"]["num_terms"], "num_digits": 1}
    assert {u.metadata["fields"]["num_terms"] for u in tasks} == {2, 3}
    assert [t.prompt for t in iter_source(cfg)] == [t.prompt for t in tasks]  # deterministic


@pytest.mark.parametrize("name,match", [
    ("chain_sums", "did you mean chain_sum"),
    ("basic_arithmatic", "did you mean basic_arithmetic"),
    ("zzzzqqqq", "reasoning-gym has no dataset 'zzzzqqqq'; see reasoning_gym.factory.DATASETS"),
])
def test_reasoning_gym_unknown_name(name, match):
    with pytest.raises(TaskSourceError, match=match):
        list(iter_source(ReasoningGymSource(type="reasoning_gym", dataset=name)))


def test_reasoning_gym_bad_config():
    with pytest.raises(TaskSourceError, match="reasoning-gym 'chain_sum' rejects config"):
        list(iter_source(ReasoningGymSource(type="reasoning_gym", dataset="chain_sum", config={"min_terms": 5, "max_terms": 2})))


def test_dataset_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"question": "q1", "solution": "1", "level": 2}\nnot json\n')
    (tmp_path / "b.json").write_text(json.dumps([{"question": "q2", "solution": "2"}, {"solution": "no question"}]))
    pq.write_table(pa.Table.from_pylist([{"question": "q3", "solution": "3", "tests": "assert True"}]), tmp_path / "c.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    cfg = DatasetDirSource(type="dataset_dir", path=tmp_path, prompt_field="question", answer_field="solution")
    tasks, problems = load_source(cfg)
    assert [(t.prompt, t.answer) for t in tasks] == [("q1", "1"), ("q2", "2"), ("q3", "3")]
    assert tasks[0].metadata == {"level": 2} and tasks[2].metadata == {"tests": "assert True"}
    assert tasks[0].source == f"dataset_dir:{tmp_path}"
    assert len(problems) == 2
    assert problems[0].startswith(f"{tmp_path / 'a.jsonl'}:2: not JSON")
    assert problems[1].startswith(f"{tmp_path / 'b.json'}[1]: missing or empty `question`")


def test_expansion_source_yields_nothing_here():
    cfg = ExpansionSource(type="expansion", by="teacher")
    assert list(iter_source(cfg)) == [] and source_name(cfg) == "expansion:teacher"
