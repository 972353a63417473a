"""Multi-turn tasks: a JSONL line's `messages` is the task. It is checked line by line, carried as
one prompt string through the store and the training rows, asked as its own turns (the policy's
suffix on the last user turn, the policy's system prompt only where the conversation has none),
keyed and split as a whole conversation, and shown to judges as readable turns."""

import json

import pytest

from selfdistill.config import JsonlSource
from selfdistill.records import CONVERSATION_TAG, chat_messages, conversation, conversation_prompt, readable, split_for, task_key, with_suffix
from selfdistill.scoring.judges import pairwise_prompt, pointwise_prompt
from selfdistill.tasks.sources import load_source

TALK = [{"role": "user", "content": "I have 3 apples."},
        {"role": "assistant", "content": "Noted: 3 apples."},
        {"role": "user", "content": "I buy 2 more. How many now?"}]
SYSTEM_TALK = [{"role": "system", "content": "You count fruit."}, *TALK]

BAD = [
    ({"messages": TALK[:2]}, "must end with a user turn"),
    ({"messages": []}, "non-empty list"),
    ({"messages": "hello"}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot' is not one of"),
    ({"messages": [{"role": "user", "content": " "}]}, "messages[0]: `content` must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "a", "name": "x"}]}, "exactly `role` and `content`"),
    ({"messages": [TALK[0], TALK[0]]}, "messages[1] is a user turn, expected assistant"),
    ({"messages": [TALK[0], SYSTEM_TALK[0], TALK[2]]}, "messages[1] is a system turn, expected assistant"),
    ({"messages": TALK, "prompt": "q"}, "both `prompt` and `messages`"),
]


def test_conversation_lines_are_tasks_and_bad_ones_are_named_by_line(tmp_path):
    path = tmp_path / "talk.jsonl"
    rows = [{"messages": TALK, "answer": "5"}, {"prompt": "plain"}, {"messages": SYSTEM_TALK, "answer": "5"}] + [b for b, _ in BAD]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks, problems = load_source(JsonlSource(type="jsonl", path=path))
    assert [conversation(t.prompt) for t in tasks] == [TALK, None, SYSTEM_TALK]
    assert tasks[1].prompt == "plain" and tasks[0].answer == "5"
    assert len(problems) == len(BAD)
    for lineno, ((_, want), got) in enumerate(zip(BAD, problems), 4):
        assert got.startswith(f"{path}:{lineno}: ") and want in got, (want, got)


def test_a_conversation_is_asked_as_its_turns():
    prompt = conversation_prompt(TALK)
    assert prompt.startswith(CONVERSATION_TAG)
    assert chat_messages(prompt) == TALK
    assert chat_messages(prompt, "Be brief.") == [{"role": "system", "content": "Be brief."}, *TALK]
    assert chat_messages(conversation_prompt(SYSTEM_TALK), "Be brief.") == SYSTEM_TALK  # its own system turn wins
    asked = chat_messages(with_suffix(prompt, "\nAnswer with a number only."))
    assert asked[:2] == TALK[:2] and asked[2]["content"] == TALK[2]["content"] + "\nAnswer with a number only."
    # a plain prompt is what it always was
    assert with_suffix("q", "!") == "q!" and chat_messages("q", "s") == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match="end with a user turn"):
        conversation_prompt(TALK[:2])


def test_the_key_and_split_are_the_whole_conversations():
    other_history = [TALK[0] | {"content": "I have 4 apples."}, *TALK[1:]]
    keys = {task_key(conversation_prompt(t)) for t in (TALK, other_history, TALK[2:])}
    assert len(keys) == 3  # the same last turn after another history is another task
    assert task_key(conversation_prompt(TALK)) == task_key(conversation_prompt(json.loads(json.dumps(TALK))))
    assert split_for(task_key(conversation_prompt(TALK)), 0.5) in ("train", "heldout")


def test_judges_and_revisions_see_readable_turns():
    prompt = with_suffix(conversation_prompt(TALK), " Be exact.")
    shown = readable(prompt)
    assert shown == "User: I have 3 apples.\n\nAssistant: Noted: 3 apples.\n\nUser: I buy 2 more. How many now? Be exact."
    for judged in (pointwise_prompt(prompt, "5"), pairwise_prompt(prompt, "5", "6")):
        assert shown in judged and CONVERSATION_TAG not in judged
    assert readable("plain") == "plain"


def test_the_tokenizer_renders_every_turn(tiny_model_dir):
    """What generation and the training child render (chat_messages through the chat template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template(chat_messages(conversation_prompt(TALK), "Be brief."), tokenize=False, add_generation_prompt=True)
    at = [text.index(s) for s in ("Be brief.", TALK[0]["content"], TALK[1]["content"], TALK[2]["content"])]
    assert at == sorted(at) and CONVERSATION_TAG not in text


def test_a_dataset_directory_may_hold_conversations(tmp_path):
    from selfdistill.config import DatasetDirSource

    (tmp_path / "a.json").write_text(json.dumps([{"messages": TALK, "answer": "5", "topic": "fruit"},
                                                 {"messages": TALK[:2], "answer": "5"}, {"prompt": "plain", "answer": "1"}]))
    tasks, problems = load_source(DatasetDirSource(type="dataset_dir", path=tmp_path))
    assert [conversation(t.prompt) for t in tasks] == [TALK, None]
    assert tasks[0].metadata == {"topic": "fruit"}  # the turns are the prompt, not metadata
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'a.json'}[1]: ") and "end with a user turn" in problems[0]
