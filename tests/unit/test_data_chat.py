"""Fine-tuning examples (chat and prompt/completion): validation and the loss mask on what the model says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_helpers import stdlib_lines  # noqa: E402

from lmaas.data.chat import IGNORE, example_problem, tokenize_example  # noqa: E402
from lmaas.errors import InvalidInputError  # noqa: E402

CHAT = {"messages": [
    {"role": "system", "content": "Answer in Python."},
    {"role": "user", "content": "add two numbers"},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "and subtract?"},
    {"role": "assistant", "content": [{"type": "text", "text": "def sub(a, b):"}, {"type": "text", "text": " return a - b"}]},
]}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from lmaas.data.tokenizer import train_bpe

    return AutoTokenizer.from_pretrained(train_bpe(stdlib_lines(), 512).save(tmp_path_factory.mktemp("tok")))


def trained_text(tokenizer, ids, labels) -> list[str]:
    """The decoded runs of tokens that carry a label (what the loss trains on)."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([tokenizer.decode(current)] if current else [])


def test_a_conversation_trains_on_each_assistant_turn_through_its_end_of_turn_and_nothing_else(tokenizer):
    ids, labels = tokenize_example(tokenizer, CHAT)
    assert len(ids) == len(labels)
    assert trained_text(tokenizer, ids, labels) == [
        "def add(a, b):\n    return a + b<|im_end|>\n",
        "def sub(a, b): return a - b<|im_end|>\n",
    ]
    # the ids are exactly what the serving engines render for the same conversation
    from lmaas.models.chat import chat_token_ids

    plain = [{**m, "content": m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])} for m in CHAT["messages"]]
    assert ids == chat_token_ids(tokenizer, plain, add_generation_prompt=False)


def test_a_models_own_template_decides_what_the_assistant_turns_are(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    try:
        ids, labels = tokenize_example(tokenizer, {"messages": CHAT["messages"][1:3]})
        assert tokenizer.decode(ids).startswith("[user] add two numbers\n[assistant] ")
        # the prompt's last token (" ") merged with the answer's first (" def"): that token is the answer's
        assert trained_text(tokenizer, ids, labels) == [" def add(a, b):\n    return a + b\n"]
        # a template that renders a turn differently once others follow it cannot be masked: refused, not guessed
        tokenizer.chat_template = "{% for m in messages %}{% if loop.last %}LAST:{% endif %}{{ m['content'] }}\n{% endfor %}"
        with pytest.raises(InvalidInputError, match="renders the first turns of a conversation differently") as caught:
            tokenize_example(tokenizer, CHAT)
        assert caught.value.param == "messages"
    finally:
        tokenizer.chat_template = None


def test_prompt_and_completion_train_on_the_completion_and_a_closing_eos(tokenizer):
    ids, labels = tokenize_example(tokenizer, {"prompt": "def add(a, b):", "completion": " return a + b"})
    prompt = tokenizer.encode("def add(a, b):", add_special_tokens=False)
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert ids[-1] == tokenizer.eos_token_id and labels[len(prompt):] == ids[len(prompt):]
    assert tokenizer.decode(ids[len(prompt):-1]) == " return a + b"


@pytest.mark.parametrize("line, words", [
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": ["hi"]}, "messages[0] must be an object"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "at least one assistant message"),
    ({"prompt": "x"}, "completion must be a string"),
    ({"text": "x"}, 'each line needs "messages" (chat) or "prompt" and "completion"'),
])
def test_bad_examples_name_the_field(tokenizer, line, words):
    assert words in example_problem(line)
    with pytest.raises(InvalidInputError) as caught:
        tokenize_example(tokenizer, line)
    assert words in str(caught.value)


def test_a_chat_ingest_needs_the_models_tokenizer():
    from pydantic import ValidationError

    from lmaas.data.config import IngestConfig

    with pytest.raises(ValidationError, match="format chat needs tokenizer"):
        IngestConfig(name="c", sources=["x.jsonl"], format="chat")
    assert IngestConfig(name="c", sources=["x.jsonl"], format="chat", tokenizer="base/").tokenizer == "base/"
