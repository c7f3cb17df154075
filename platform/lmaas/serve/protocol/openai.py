"""Request and response schemas of the OpenAI-compatible inference API (`/v1/...`), in OpenAI's shapes.

Validation failures become 400 errors naming the field (see `lmaas.serve.errors`). Fields OpenAI has
that change the output and lmaas does not serve (`logit_bias`, the legacy `functions` / `function_call`)
are refused naming them; fields that only describe the caller (`user`, `metadata`, ...) are accepted.
`top_k` and `ignore_eos` are extensions (as in vLLM), sent with the `openai` client through `extra_body`.

Chat requests take OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, and conversations with
assistant `tool_calls` and `tool` messages; what each `tool_choice` does is `lmaas.serve.openai_api`'s
(`ToolChoice`). Checked here: a `tool_choice` needs `tools`, a named one must name a given tool, and each
tool's `parameters` must be a JSON Schema.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(BaseModel):
    include_usage: bool = False
    """Send one last chunk with `usage` before `[DONE]`."""


class JsonSchema(BaseModel):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema the output must satisfy.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON valid under a schema (structured output)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type json_schema needs a json_schema object")
        return self


class _SamplingFields(_Request):
    model: str = Field(min_length=1, description="A model reference: name, name:version or name@alias.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="Extension: sample among the k most likely tokens (0 or -1: all).")
    n: int = Field(1, ge=1, le=16, description="Choices to generate (each a request of its own in the engine; at most 16).")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="Extension: generate exactly max_tokens tokens.")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    user: str | None = None
    # fields OpenAI has that lmaas does not serve: refused (400 naming them) rather than ignored
    functions: list[Any] | None = None
    function_call: Any = None
    logit_bias: dict[str, float] | None = None

    @field_validator("functions", "function_call", "logit_bias")
    @classmethod
    def _unserved(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, [], {}, "none"):
            hint = "; send tools and tool_choice instead" if info.field_name in ("functions", "function_call") else ""
            raise ValueError(f"is not supported by lmaas{hint}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


MAX_PROMPTS = 64
"""Prompts one `/v1/completions` request may hold (each with `n` choices)."""


class CompletionRequest(_SamplingFields):
    prompt: Any = Field(description="A string, a list of token ids, or a list of either (a batch: choice i*n+j is prompt i's j-th).")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(False, description="Start each choice's text with its prompt.")
    tools: Any = None
    tool_choice: Any = None

    @field_validator("tools", "tool_choice")
    @classmethod
    def _chat_only(cls, value: Any) -> Any:
        if value not in (None, [], "none"):
            raise ValueError("is served on /v1/chat/completions, not on /v1/completions")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[int] | list[str | list[int]]:
        if _one_prompt(value):
            return value
        if isinstance(value, list) and value and all(_one_prompt(p) for p in value):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"prompt holds {len(value)} prompts; one request may hold at most {MAX_PROMPTS}")
            return value
        raise ValueError("prompt must be a non-empty string, a non-empty list of token ids, or a list of such prompts")

    @field_validator("echo")
    @classmethod
    def _echo(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("logprobs") is not None:
            raise ValueError("echo with logprobs (the prompt tokens' own logprobs) is not supported; drop one of them")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or the batch."""
        return [self.prompt] if _one_prompt(self.prompt) else list(self.prompt)


def _one_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class TextContent(BaseModel):
    type: Literal["text"]
    text: str


DEFAULT_TOOL_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
"""A function's `parameters` when a tool gives none: it takes no arguments."""


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="1-64 letters, digits, underscores or dashes.")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_TOOL_PARAMETERS),
                                       description="A JSON Schema of the arguments object.")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        from jsonschema import SchemaError, validators

        try:
            validators.validator_for(value).check_schema(value)
        except SchemaError as exc:
            raise ValueError(f"is not a JSON Schema: {exc.message}") from None
        return value


class Tool(BaseModel):
    """One function the model may call (OpenAI's `tools` entry)."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    """`tool_choice` `{"type": "function", "function": {"name": ...}}`: call this function."""

    class Function(BaseModel):
        name: str

    type: Literal["function"] = "function"
    function: Function


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """The arguments as JSON text (an object), as the model wrote them."""


class ToolCall(BaseModel):
    """A call of a tool in an assistant message (a request's history, or the reply)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContent] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant message's calls (its `content` may then be null)."""
    tool_call_id: str | None = Field(None, validate_default=True)
    """A `tool` message's answer to this call."""

    @field_validator("tool_calls")
    @classmethod
    def _calls(cls, value: list[ToolCall] | None, info: ValidationInfo) -> list[ToolCall] | None:
        if value and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        for call in value or []:
            try:
                json.loads(call.function.arguments)
            except ValueError:
                raise ValueError(f"function.arguments of call {call.id!r} must be JSON text") from None
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _answers(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not value:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: role and content, plus tool calls (arguments as objects, as
        transformers' templates expect them) and the answered call's id where the message has them."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class _ToolFields(BaseModel):
    tools: list[Tool] | None = None
    """`[]` is the same as no tools."""

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates read them (None when there are none)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


class ChatCompletionRequest(_SamplingFields, _ToolFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tool_choice: Any = Field(None, validate_default=True, description='"none", "auto", "required" or {"type": "function", "function": {"name": ...}}.')
    parallel_tool_calls: bool = True
    """With tool_choice "required": False allows one call only."""

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: Any, info: ValidationInfo) -> str | NamedToolChoice:
        tools = info.data.get("tools") or []
        if value is None:
            return "auto" if tools else "none"
        if isinstance(value, dict):
            named = NamedToolChoice.model_validate(value)  # a ValidationError here is a ValueError: 400 naming tool_choice
            if named.function.name not in {t.function.name for t in tools}:
                given = ", ".join(t.function.name for t in tools) or "none"
                raise ValueError(f"names function {named.function.name!r}, which is not in tools (given: {given})")
            return named
        if value not in ("none", "auto", "required"):
            raise ValueError(f'must be "none", "auto", "required" or {{"type": "function", "function": {{"name": ...}}}}, got {value!r}')
        if value != "none" and not tools:
            raise ValueError(f'{value!r} needs tools')
        return value


MAX_EMBEDDING_INPUTS = 2048
"""Strings one `/v1/embeddings` request may embed (OpenAI's limit); tokens are bounded by the engine."""


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    input: Any = Field(description="A string or a list of strings.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("input must be a non-empty string or a non-empty list of strings")
        if any(not t for t in texts):
            raise ValueError("input must not contain empty strings")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input holds {len(texts):,} strings; one request may hold at most {MAX_EMBEDDING_INPUTS:,} (as OpenAI's API)")
        return texts


class TokenizeRequest(_ToolFields, _Request):
    """vLLM's `/tokenize`: a prompt (as `/v1/completions` reads it) or chat messages (under the chat template)."""

    model: str = Field(min_length=1)
    prompt: str | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1, validate_default=True)
    tools: list[Tool] | None = None
    """With messages: the tools the chat template renders (as `/v1/chat/completions` would)."""
    add_special_tokens: bool = Field(False, description="Add the tokenizer's special tokens (lmaas's completions do not).")
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @field_validator("messages")
    @classmethod
    def _one_input(cls, value: list[ChatMessage] | None, info: ValidationInfo) -> list[ChatMessage] | None:
        if (value is None) == (info.data.get("prompt") is None):
            raise ValueError("send either prompt or messages")
        return value


class DetokenizeRequest(_Request):
    model: str = Field(min_length=1)
    tokens: list[int] = Field(min_length=1, max_length=1_000_000)


# ---- responses ----


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "lmaas"
    parent: str | None = None
    """A LoRA adapter's: the served base model it runs on (as vLLM lists its LoRA modules); None for a served model."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    """Null when the reply is tool calls."""
    tool_calls: list[ToolCall] = []


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class _WithoutNulls(BaseModel):
    # unset fields are left out, as OpenAI's stream does: its client merges deltas key by key, and a null `type` or `name`
    # would overwrite the call's
    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict[str, Any]:  # noqa: ANN401
        return {key: value for key, value in handler(self).items() if value is not None}


class FunctionCallDelta(_WithoutNulls):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_WithoutNulls):
    """A piece of tool call `index` in a stream: the first carries its id, type and name, the rest argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
