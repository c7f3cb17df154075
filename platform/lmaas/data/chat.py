"""Chat and instruction examples for fine-tuning: the line format, and token ids with the loss masked to what the model says.

Two line formats, as OpenAI's fine-tuning files have them (one JSON object per JSONL line):

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"prompt": "def add(a, b):", "completion": " return a + b"}

A conversation is rendered with the model's chat template (`models.chat`, the same one the serving
engines use, ChatML when the tokenizer has none), and only the assistant turns are trained on: each
assistant message's tokens, through the template's end-of-turn marker, keep their ids as labels;
every other token's label is `IGNORE` (-100, which PyTorch's cross entropy skips, as transformers'
models do). A prompt/completion pair trains on the completion and a closing EOS token.

    ids, labels = tokenize_example(tokenizer, {"messages": [...]})
"""

from __future__ import annotations

from typing import Any

from lmaas.errors import InvalidInputError
from lmaas.models.chat import chat_token_ids

ROLES = ("system", "developer", "user", "assistant", "tool")
IGNORE = -100
"""The label of a token the loss skips (`torch.nn.functional.cross_entropy`'s default `ignore_index`)."""


def example_problem(obj: dict[str, Any]) -> str | None:
    """What is wrong with one fine-tuning example (a parsed JSONL line), in words naming the field; None when nothing is."""
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            return "messages must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                return f"messages[{i}] must be an object"
            if m.get("role") not in ROLES:
                return f"messages[{i}].role must be one of {', '.join(ROLES)}"
            content = m.get("content")
            if not (isinstance(content, str) or (content is None and m.get("tool_calls"))
                    or (isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content))):
                return f"messages[{i}].content must be a string (or a list of text parts)"
        if not any(m["role"] == "assistant" for m in messages):
            return "messages needs at least one assistant message (what the model learns to say)"
        return None
    if "prompt" in obj or "completion" in obj:
        for field in ("prompt", "completion"):
            if not isinstance(obj.get(field), str):
                return f"{field} must be a string"
        return None
    return 'each line needs "messages" (chat) or "prompt" and "completion"'


def tokenize_example(tokenizer: Any, obj: dict[str, Any], *, eos_id: int | None = None) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one example: labels are the ids where the model is trained to predict them, else `IGNORE`.

    Args:
        tokenizer: a transformers tokenizer (`AutoTokenizer.from_pretrained(model_dir)`).
        obj: a valid example (see `example_problem`).
        eos_id: closes a completion (default: the tokenizer's `eos_token_id`).

    Raises:
        InvalidInputError: an invalid example, or a chat template that renders the start of a
            conversation differently from the same turns inside the whole (the mask would be wrong).
    """
    problem = example_problem(obj)
    if problem:
        raise InvalidInputError(problem, param="messages" if "messages" in obj else "prompt")
    if "messages" not in obj:
        prompt = tokenizer.encode(obj["prompt"], add_special_tokens=False)
        completion = tokenizer.encode(obj["completion"], add_special_tokens=False)
        eos = tokenizer.eos_token_id if eos_id is None else eos_id
        completion += [eos] if eos is not None else []
        return prompt + completion, [IGNORE] * len(prompt) + completion
    messages = [_plain(m) for m in obj["messages"]]
    ids = chat_token_ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # the turn runs from the end of the conversation before it (with the assistant's header) to the end of it
        start = _aligned(chat_token_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else [], ids)
        end = _aligned(chat_token_ids(tokenizer, messages[: i + 1], add_generation_prompt=False), ids)
        if end <= start:
            raise _unaligned()
        labels[start:end] = ids[start:end]
    return ids, labels


def _aligned(part: list[int], ids: list[int]) -> int:
    """How many leading tokens `part` (the rendering of the first turns) shares with `ids` (the whole conversation's).

    All of them, or all but the last: BPE may merge the last token of a part with the text after it
    (`"[assistant] "` + `"def"` -> `" def"`); that token then counts with what follows. Anything less
    means the template renders early turns differently once later ones follow.
    """
    shared = 0
    for a, b in zip(part, ids):
        if a != b:
            break
        shared += 1
    if shared < len(part) - 1:
        raise _unaligned()
    return shared


def _unaligned() -> InvalidInputError:
    return InvalidInputError(
        "the model's chat template renders the first turns of a conversation differently from the same turns in the "
        "whole conversation, so the assistant turns cannot be told apart; use a template that renders turn by turn",
        param="messages",
    )


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    """A message as templates take it: content parts joined into one string."""
    content = message.get("content")
    if isinstance(content, list):
        message = {**message, "content": "".join(part["text"] for part in content)}
    return message
