"""OpenAI tools on chat: the request schema, the ChatML template's tool rendering, and the reply shapes per `tool_choice`."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_helpers import stdlib_lines  # noqa: E402

from lmaas.errors import InvalidInputError
from lmaas.serve.engine import Engine, EngineStats, GenerationRequest, SamplingParams, TokenEvent
from lmaas.models.chat import DEFAULT_CHAT_TEMPLATE, chat_token_ids
from lmaas.serve.errors import validation_message
from lmaas.serve.openai_api import OpenAIServing, ToolChoice, parse_tool_calls, required_tools_schema
from lmaas.serve.protocol.openai import ChatCompletionChunk, ChatCompletionRequest, ChatMessage, TokenizeRequest

# lmaas's ChatML template before it rendered tools: conversations without tools must still render to exactly this
CHATML_BEFORE_TOOLS = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["paris", "rome"]}, "days": {"type": "integer"}},
                   "required": ["city"]},
}}
CLOCK = {"type": "function", "function": {"name": "now"}}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from lmaas.data.tokenizer import train_bpe

    return AutoTokenizer.from_pretrained(train_bpe(stdlib_lines(), 512).save(tmp_path_factory.mktemp("tok")))


def render(tokenizer, messages, template=DEFAULT_CHAT_TEMPLATE, tools=None, add_generation_prompt=True) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?\n"}],
    [{"role": "developer", "content": ""}, {"role": "assistant", "content": "x <|im_end|> y"}],
])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_without_tools_the_template_renders_byte_for_byte_what_it_did_before(tokenizer, messages, add_generation_prompt):
    before = render(tokenizer, messages, CHATML_BEFORE_TOOLS, add_generation_prompt=add_generation_prompt)
    assert render(tokenizer, messages, add_generation_prompt=add_generation_prompt) == before
    assert render(tokenizer, messages, tools=[], add_generation_prompt=add_generation_prompt) == before
    assert chat_token_ids(tokenizer, messages, add_generation_prompt) == tokenizer.encode(before, add_special_tokens=False)


def test_the_template_renders_tools_calls_and_tool_responses(tokenizer):
    request = ChatCompletionRequest(model="m", tools=[WEATHER, CLOCK], tool_choice="none", messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
    ])
    text = render(tokenizer, [m.for_template() for m in request.messages], tools=request.tool_dicts())
    system, user, assistant, tool, prompt = text.split("<|im_end|>\n")
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and text.count("Be brief.") == 1
    tools_listed = system[system.index("<tools>\n") + 8 : system.index("\n</tools>")].split("\n")
    assert [json.loads(t) for t in tools_listed] == [WEATHER, {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
    assert "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>" in system
    assert user == "<|im_start|>user\nWeather in Paris?"
    assert assistant == ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call>'
                         '\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    assert tool == "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
    assert prompt == "<|im_start|>assistant\n"
    ids = chat_token_ids(tokenizer, [m.for_template() for m in request.messages], tools=request.tool_dicts())
    assert ids == tokenizer.encode(text, add_special_tokens=False)


def test_a_chat_template_without_tools_refuses_them_naming_tools(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = CHATML_BEFORE_TOOLS
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidInputError) as err:
        chat_token_ids(tokenizer, messages, tools=[WEATHER])
    assert err.value.param == "tools"
    assert chat_token_ids(tokenizer, messages) == chat_token_ids(tokenizer, messages, tools=[])


def test_required_schema_is_an_array_of_calls_of_the_given_tools():
    from jsonschema import Draft202012Validator

    tools = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=[WEATHER, CLOCK]).tool_dicts()
    schema = required_tools_schema(tools)
    Draft202012Validator.check_schema(schema)
    valid = Draft202012Validator(schema)
    assert schema["minItems"] == 1 and "maxItems" not in schema
    assert [o["properties"]["name"]["enum"] for o in schema["items"]["anyOf"]] == [["get_weather"], ["now"]]
    assert valid.is_valid([{"name": "get_weather", "parameters": {"city": "rome"}}, {"name": "now", "parameters": {}}])
    for wrong in ([], [{"name": "get_weather", "parameters": {"city": "oslo"}}], [{"name": "other", "parameters": {}}],
                  [{"name": "get_weather"}]):
        assert not valid.is_valid(wrong), wrong
    one = required_tools_schema(tools, parallel_tool_calls=False)
    assert one["maxItems"] == 1 and not Draft202012Validator(one).is_valid([{"name": "now", "parameters": {}}] * 2)

    shared = {"$defs": {"C": {"type": "string"}}, "type": "object", "properties": {"c": {"$ref": "#/$defs/C"}}}
    with_defs = required_tools_schema([{"function": {"name": "a", "parameters": shared}}])
    assert with_defs["$defs"] == {"C": {"type": "string"}} and "$defs" not in with_defs["items"]["anyOf"][0]["properties"]["parameters"]
    assert Draft202012Validator(with_defs).is_valid([{"name": "a", "parameters": {"c": "x"}}])
    assert not Draft202012Validator(with_defs).is_valid([{"name": "a", "parameters": {"c": 1}}])
    other = {**shared, "$defs": {"C": {"type": "integer"}}}
    with pytest.raises(InvalidInputError) as err:
        required_tools_schema([{"function": {"name": "a", "parameters": shared}}, {"function": {"name": "b", "parameters": other}}])
    assert err.value.param == "tools"


def test_parse_tool_calls_reads_the_required_array_and_nothing_else():
    calls = parse_tool_calls('[{"name": "get_weather", "parameters": {"city": "paris"}}, {"name": "now", "parameters": {}}]')
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "paris"}), ("now", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert parse_tool_calls('[{"name": "now", "param') == [] and parse_tool_calls('{"name": "now"}') == []


def _param(body: dict, model=ChatCompletionRequest) -> str | None:
    with pytest.raises(ValidationError) as err:
        model.model_validate(body)
    return validation_message(err.value.errors())[1]


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]},
     "messages.0.tool_calls"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0.tool_calls"),
])
def test_bad_tool_requests_name_the_field(extra, param):
    assert _param({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}) == param


def test_tool_choice_defaults_and_where_tools_are_taken():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest(**base).tool_choice == "none"
    assert ChatCompletionRequest(**base, tools=[WEATHER]).tool_choice == "auto"
    assert ChatCompletionRequest(**base, tools=[]).tool_dicts() is None
    assert TokenizeRequest(model="m", messages=base["messages"], tools=[WEATHER]).tool_dicts()[0]["function"]["name"] == "get_weather"
    from lmaas.serve.protocol.openai import CompletionRequest

    assert _param({"model": "m", "prompt": "x", "tools": [WEATHER]}, CompletionRequest) == "tools"
    assert ChatMessage(role="assistant", tool_calls=[{"id": "c", "function": {"name": "f", "arguments": "{}"}}]).content is None


def test_structured_response_format_with_a_forced_call_is_a_400_naming_tool_choice():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}
    auto = ToolChoice.of(ChatCompletionRequest(**base))  # the default with tools
    assert (auto.mode, auto.tools) == ("auto", ("get_weather",)) and auto.sampling(SamplingParams()) == SamplingParams()
    fmt = {"type": "json_object"}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(InvalidInputError) as err:
            ToolChoice.of(ChatCompletionRequest(**base, tool_choice=choice, response_format=fmt))
        assert err.value.param == "tool_choice"
    named = ToolChoice.of(ChatCompletionRequest(**base, tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    params = named.sampling(SamplingParams())
    assert json.loads(params.json_schema) == WEATHER["function"]["parameters"] and params.structured_by == "tool_choice"
    with pytest.raises(InvalidInputError) as err:
        params.refuse_unsupported("lmaas")
    assert err.value.param == "tool_choice"
    assert ToolChoice.of(ChatCompletionRequest(**base, tool_choice="none")).sampling(SamplingParams()) == SamplingParams()


class ScriptedEngine(Engine):
    """Answers every chat with `text`, one character a token; records the tools and params it was called with."""

    def __init__(self, text: str) -> None:
        self.model_id, self.text, self.calls = "m", text, []

    async def generate_chat(self, request_id: str, messages: list[dict], params: SamplingParams, tools=None) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        self.calls.append((tools, params))
        for i, ch in enumerate(self.text):
            await asyncio.sleep(0)
            yield TokenEvent(request_id, i, ch, 7, i + 1, "stop" if i == len(self.text) - 1 else None)

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        raise AssertionError("chat only")

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0)


def _chat(engine: Engine, **body):
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, CLOCK], **body)

    async def run():
        out = await OpenAIServing({"m": engine}).create_chat_completion(request)
        if not request.stream:
            return out
        return [ChatCompletionChunk.model_validate_json(line[6:]) for line in [x async for x in out] if line != "data: [DONE]\n\n"]

    return asyncio.run(run())


def test_a_named_tool_choice_replies_with_one_call_whose_arguments_are_the_text():
    engine = ScriptedEngine('{"city": "rome"}')
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = _chat(engine, tool_choice=named)
    message = out.choices[0].message
    assert message.content is None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert (call.type, call.function.name, call.function.arguments) == ("function", "get_weather", '{"city": "rome"}')
    assert call.id.startswith("call_") and out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens == len(engine.text)
    tools, params = engine.calls[0]
    assert [t["function"]["name"] for t in tools] == ["get_weather", "now"] and params.structured_by == "tool_choice"

    chunks = _chat(engine, tool_choice=named, stream=True)
    pieces = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first = pieces[0][0]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function", "get_weather", "")
    assert first.id.startswith("call_") and all(p[0].id is None and p[0].function.name is None for p in pieces[1:])
    assert "".join(p[0].function.arguments for p in pieces) == engine.text
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("choice, text", [
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "rome"}'),
    ("required", '[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "rome"}}]'),
])
def test_the_openai_clients_stream_helper_assembles_the_tool_call_chunks(choice, text):
    openai = pytest.importorskip("openai")
    from openai.lib.streaming.chat import ChatCompletionStreamState

    strict = [{**t, "function": {**t["function"], "strict": True}} for t in (WEATHER, CLOCK)]  # the helper parses strict tools' arguments
    state = ChatCompletionStreamState(input_tools=strict)
    for chunk in _chat(ScriptedEngine(text), tool_choice=choice, stream=True):
        state.handle_chunk(openai.types.chat.ChatCompletionChunk.model_validate(chunk.model_dump()))
    final = state.get_final_completion().choices[0]
    calls = [(c.function.name, c.function.parsed_arguments) for c in final.message.tool_calls]
    if choice == "required":
        assert calls == [("now", {}), ("get_weather", {"city": "rome"})] and final.finish_reason == "tool_calls"
    else:
        assert calls == [("get_weather", {"city": "rome"})] and final.finish_reason == "stop"
    assert all(c.id.startswith("call_") and c.type == "function" for c in final.message.tool_calls)


def test_required_replies_with_the_parsed_calls_and_finish_reason_tool_calls():
    engine = ScriptedEngine('[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "paris"}}]')
    out = _chat(engine, tool_choice="required", n=2)
    for choice in out.choices:
        assert choice.message.content is None and choice.finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [("now", {}), ("get_weather", {"city": "paris"})]
    assert json.loads(engine.calls[0][1].json_schema) == required_tools_schema([WEATHER, CLOCK])

    chunks = _chat(engine, tool_choice="required", stream=True)
    with_calls = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(with_calls) == 1 and with_calls[0].choices[0].finish_reason == "tool_calls"
    calls = with_calls[0].choices[0].delta.tool_calls
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [(0, "now", {}), (1, "get_weather", {"city": "paris"})]
    assert len(chunks) == 2  # the role, then the calls: no empty chunk per held-back token


def test_tool_choice_none_is_text():
    engine = ScriptedEngine("plain words")
    out = _chat(engine, tool_choice="none")
    assert out.choices[0].message.content == "plain words" and out.choices[0].message.tool_calls == []
    assert engine.calls[0][0] is not None and engine.calls[0][1].json_schema is None  # rendered, not enforced


CALL_TEXT = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "rome"}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'


def test_auto_replies_with_the_calls_in_the_text_and_the_text_before_them():
    out = _chat(ScriptedEngine(CALL_TEXT))  # tool_choice "auto", the default with tools
    message = out.choices[0].message
    assert message.content == "Let me look." and out.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [("get_weather", {"city": "rome"}), ("now", {})]
    assert all(c.id.startswith("call_") for c in message.tool_calls)
    engine = ScriptedEngine('<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    assert _chat(engine, tool_choice="auto").choices[0].message.content is None
    assert engine.calls[0][1].json_schema is None  # free text: nothing is enforced


@pytest.mark.parametrize("text", [
    "no calls here, just <tool a while",
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # not JSON
    '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',  # not one of the request's tools
    '<tool_call>{"name": "now", "arguments": "soon"}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "now", "arguments": {}}',  # cut short before it closed
])
def test_auto_text_that_holds_no_valid_call_is_the_content_as_it_is(text):
    out = _chat(ScriptedEngine(text))
    assert out.choices[0].message.content == text and out.choices[0].message.tool_calls == []
    assert out.choices[0].finish_reason == "stop"
    chunks = _chat(ScriptedEngine(text), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_auto_streams_text_as_it_comes_then_the_calls_whole():
    chunks = _chat(ScriptedEngine(CALL_TEXT), stream=True)
    contents = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert "".join(contents) == "Let me look.\n" and len(contents) > 3  # token by token, not at the end
    with_calls = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(with_calls) == 1 and with_calls[0].choices[0].finish_reason == "tool_calls"
    calls = with_calls[0].choices[0].delta.tool_calls
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [(0, "get_weather", {"city": "rome"}), (1, "now", {})]

    openai = pytest.importorskip("openai")
    from openai.lib.streaming.chat import ChatCompletionStreamState

    state = ChatCompletionStreamState(input_tools=[{**t, "function": {**t["function"], "strict": True}} for t in (WEATHER, CLOCK)])
    for chunk in chunks:
        state.handle_chunk(openai.types.chat.ChatCompletionChunk.model_validate(chunk.model_dump()))
    final = state.get_final_completion().choices[0]
    assert final.message.content == "Let me look.\n" and final.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.parsed_arguments) for c in final.message.tool_calls] == [("get_weather", {"city": "rome"}), ("now", {})]
