"""Chat templates: how a conversation becomes a model's token ids, the same way when serving and when training.

A model's own template (`chat_template` in its `tokenizer_config.json`) is used where it has one;
otherwise ChatML (`DEFAULT_CHAT_TEMPLATE`, the format of Qwen and of lmaas's trained models), which
also renders OpenAI tool definitions and calls the way Qwen2.5's template does.
"""

from __future__ import annotations

from typing import Any

from lmaas.errors import InvalidInputError

DEFAULT_CHAT_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'"
    " + 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '"
    " + '<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n'"
    " + '</tool_call><|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant' }}{% if message['content'] %}{{ '\n' + message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] %}"
    "{% set call = call['function'] if call['function'] is defined else call %}"
    "{{ '\n<tool_call>\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' + (call['arguments'] | tojson) + '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or loop.previtem['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% if loop.last or loop.nextitem['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_token_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
    """The prompt token ids of a conversation under the tokenizer's chat template (ChatML when it has none).

    `tools` (OpenAI's tool definitions) go to the template as transformers passes them (`tools=`).

    Raises:
        InvalidInputError: tools for a model whose chat template does not render them (naming `tools`).
    """
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    if tools and "tools" not in template:
        raise InvalidInputError("this model's chat template does not render tools; send the request without tools", param="tools")
    ids = tokenizer.apply_chat_template(
        messages, tools=tools or None, chat_template=template, add_generation_prompt=add_generation_prompt,
        tokenize=True, return_dict=False,
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
