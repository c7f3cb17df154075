"""The OpenAI-compatible API's logic, without HTTP: requests in, response models or SSE lines out.

`OpenAIServing` holds one `Engine` per served model name; the router in `routers/openai.py` only
maps HTTP onto it. Streams are async iterators of `data: ...` lines ending with `data: [DONE]`;
closing one early (a client that disconnects) aborts the request in its engine.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from lmaas.errors import InvalidInputError, LmaasError, NotFoundError, ReplicaLostError
from lmaas.serve.errors import error_body
from lmaas.serve.engine import Engine, GenerationRequest, SamplingParams, TokenEvent, new_request_id
from lmaas.serve.protocol.openai import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    FunctionCall,
    FunctionCallDelta,
    ModelCard,
    ModelList,
    NamedToolChoice,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprobOut,
    ToolCall,
    ToolCallDelta,
    TopLogprobOut,
    Usage,
)

DONE = "data: [DONE]\n\n"
OnFinish = Callable[[str | None, int, int], Awaitable[None]]
"""Called once per finished request with (response id, prompt tokens, completion tokens): usage metering."""


class OpenAIServing:
    """The four OpenAI endpoints over a set of engines keyed by the `model` name clients send.

    An engine may run in this process (`CausalLMEngine`) or stand for a remote one: the Ray Serve
    ingress passes `DeploymentEngine`s that forward each call to a per-model deployment's handle.
    """

    def __init__(self, engines: dict[str, Engine]) -> None:
        self.engines = dict(engines)

    def with_engine(self, model: str, engine: Engine) -> "OpenAIServing":
        """This serving with one more engine, under `model`: for one request whose model is resolved per caller (an adapter)."""
        return OpenAIServing({**self.engines, model: engine})

    def engine(self, model: str) -> Engine:
        """Raises NotFoundError (404) naming the reference when no engine serves it."""
        if model not in self.engines:
            served = ", ".join(sorted(self.engines)) or "none"
            raise NotFoundError(f"model {model!r} is not served here (served: {served})", param="model")
        return self.engines[model]

    def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in sorted(self.engines)])

    # ---- completions ----

    async def start_completion(self, request: CompletionRequest) -> tuple[str, AsyncIterator[TokenEvent]]:
        """Check `request` and start generating: its id and its token events (HTTP and gRPC share this).

        With `n` > 1 the events of all choices interleave, each tagged with its `index`.

        Raises:
            NotFoundError, InvalidInputError: before the first token, so no stream has begun.
        """
        self.engine(request.model)  # 404 before anything starts
        request_id = new_request_id("cmpl")
        total = len(request.prompts()) * request.n
        streams = await _start_choices(lambda i: self._completion_choice(request, request_id, i), total)
        return request_id, _merge(streams)

    def _completion_choice(self, request: CompletionRequest, request_id: str, index: int) -> AsyncIterator[TokenEvent]:
        """Choice `index` of a completion: prompt `index // n`, sampled with seed + `index % n` (so each prompt of a
        batch answers as it would alone); also how `_collect_choices` runs a choice again from its first token."""
        params = _choice_params(_sampling(request, request.max_tokens, request.logprobs), index % request.n)
        prompt = request.prompts()[index // request.n]
        return self.engine(request.model).generate(GenerationRequest(_choice_id(request_id, index), prompt, params))

    async def _echoes(self, request: CompletionRequest) -> list[str]:
        """Each prompt's text, for `echo` (token-id prompts decoded by the model's tokenizer)."""
        if not request.echo:
            return [""] * len(request.prompts())
        engine = self.engine(request.model)
        return [p if isinstance(p, str) else await engine.detokenize(p) for p in request.prompts()]

    async def create_completion(self, request: CompletionRequest, *, on_finish: OnFinish | None = None) -> CompletionResponse | AsyncIterator[str]:
        """A full response, or (when `stream`) an iterator of SSE lines; errors before the first token raise.

        `on_finish` gets the token counts once the response is complete (a stream: at its end, also
        when the client leaves early).
        """
        echoes = await self._echoes(request)
        request_id, events = await self.start_completion(request)
        if request.stream:
            return self._completion_stream(request, request_id, events, on_finish, echoes)
        total = len(echoes) * request.n
        choices = await _collect_choices(events, total, lambda i: self._completion_choice(request, request_id, i))
        usage = _total_usage(choices, request.n)
        if on_finish is not None:
            await on_finish(request_id, usage.prompt_tokens, usage.completion_tokens)
        return CompletionResponse(id=request_id, model=request.model, usage=usage, choices=[
            CompletionChoice(index=i, text=echoes[i // request.n] + "".join(e.text for e in collected), finish_reason=collected[-1].finish_reason,
                             logprobs=_completion_logprobs(collected, request.logprobs is not None))
            for i, collected in enumerate(choices)
        ])

    async def _completion_stream(
        self, request: CompletionRequest, request_id: str, events: AsyncIterator[TokenEvent], on_finish: OnFinish | None,
        echoes: list[str],
    ) -> AsyncIterator[str]:
        offsets = [0] * (len(echoes) * request.n)
        lasts: dict[int, TokenEvent] = {}
        echoed: set[int] = set()
        async for event in _metered(request_id, events, on_finish, lasts, request.n):
            echo = "" if event.index in echoed else echoes[event.index // request.n]  # a choice's first chunk starts with its prompt
            echoed.add(event.index)
            logprobs = _completion_logprobs([event], request.logprobs is not None, offsets[event.index])
            offsets[event.index] += len(event.text)
            if not event.text and not echo and event.finish_reason is None and logprobs is None:
                continue
            choice = CompletionChoice(index=event.index, text=echo + event.text, finish_reason=event.finish_reason, logprobs=logprobs)
            yield _sse(CompletionResponse(id=request_id, model=request.model, choices=[choice]))
        if lasts and request.stream_options and request.stream_options.include_usage:
            yield _sse(CompletionResponse(id=request_id, model=request.model, choices=[], usage=_usage(lasts, request.n)))

    # ---- chat ----

    async def create_chat_completion(
        self, request: ChatCompletionRequest, *, on_finish: OnFinish | None = None
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """A full response, or (when `stream`) an iterator of SSE lines; errors before the first token raise.

        `tools` are rendered into the prompt by the model's chat template; `tool_choice` decides the reply's
        shape (see `ToolChoice`).
        """
        engine = self.engine(request.model)
        messages = [m.for_template() for m in request.messages]
        tools = request.tool_dicts()
        top = (request.top_logprobs or 0) if request.logprobs else None
        if request.top_logprobs and not request.logprobs:
            raise InvalidInputError("top_logprobs needs logprobs: true", param="top_logprobs")
        choice = ToolChoice.of(request)
        params = choice.sampling(_sampling(request, request.max_completion_tokens or request.max_tokens, top))
        request_id = new_request_id("chatcmpl")

        def start(i: int) -> AsyncIterator[TokenEvent]:
            return engine.generate_chat(_choice_id(request_id, i), messages, _choice_params(params, i), tools=tools)

        events = _merge(await _start_choices(start, request.n))
        if request.stream:
            return self._chat_stream(request, request_id, events, top is not None, on_finish, choice)
        choices = await _collect_choices(events, request.n, start)
        usage = _total_usage(choices, request.n)
        if on_finish is not None:
            await on_finish(request_id, usage.prompt_tokens, usage.completion_tokens)
        out = []
        for i, collected in enumerate(choices):
            message, finish = choice.reply("".join(e.text for e in collected), collected[-1].finish_reason)
            out.append(ChatChoice(index=i, message=message, finish_reason=finish, logprobs=_chat_logprobs(collected) if top is not None else None))
        return ChatCompletionResponse(id=request_id, model=request.model, usage=usage, choices=out)

    async def _chat_stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        events: AsyncIterator[TokenEvent],
        logprobs: bool,
        on_finish: OnFinish | None = None,
        tool_choice: ToolChoice | None = None,
    ) -> AsyncIterator[str]:
        tool_choice = tool_choice or ToolChoice("none")
        for i in range(request.n):
            role = ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
            yield _sse(ChatCompletionChunk(id=request_id, model=request.model, choices=[role]))
        lasts: dict[int, TokenEvent] = {}
        calls: dict[int, _StreamedCall] = {}
        async for event in _metered(request_id, events, on_finish, lasts, request.n):
            if not event.text and event.finish_reason is None and not logprobs:
                continue
            call = calls.setdefault(event.index, _StreamedCall())
            deltas, finish = tool_choice.stream(call, event.text, event.finish_reason)
            if deltas == [ChatDelta()] and finish is None and not logprobs:
                continue  # text held back ("required" sends its calls once the array is complete)
            for delta in deltas[:-1]:  # a call's first piece (id, name) goes ahead of its argument text
                yield _sse(ChatCompletionChunk(id=request_id, model=request.model, choices=[ChatChunkChoice(index=event.index, delta=delta)]))
            choice = ChatChunkChoice(
                index=event.index,
                delta=deltas[-1],
                finish_reason=finish,
                logprobs=_chat_logprobs([event]) if logprobs else None,
            )
            yield _sse(ChatCompletionChunk(id=request_id, model=request.model, choices=[choice]))
        if lasts and request.stream_options and request.stream_options.include_usage:
            yield _sse(ChatCompletionChunk(id=request_id, model=request.model, choices=[], usage=_usage(lasts, request.n)))

    # ---- tokens ----

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        engine = self.engine(request.model)
        prompt = request.prompt if request.prompt is not None else [m.for_template() for m in request.messages or []]
        tools = request.tool_dicts() if request.messages else None
        out = await engine.tokenize(prompt, add_special_tokens=request.add_special_tokens, add_generation_prompt=request.add_generation_prompt,
                                    token_strs=request.return_token_strs, tools=tools)
        return TokenizeResponse(count=len(out.ids), max_model_len=out.max_context, tokens=out.ids, token_strs=out.strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        return DetokenizeResponse(prompt=await self.engine(request.model).detokenize(request.tokens))

    # ---- embeddings ----

    async def create_embedding(self, request: EmbeddingRequest, *, on_finish: OnFinish | None = None) -> EmbeddingResponse:
        engine = self.engine(request.model)
        if request.dimensions is not None:
            raise InvalidInputError("dimensions is not supported by this model", param="dimensions")
        vectors, tokens = await engine.embed(request.input)
        if on_finish is not None:
            await on_finish(None, tokens, 0)
        data = [EmbeddingData(index=i, embedding=_encode_vector(v, request.encoding_format)) for i, v in enumerate(vectors)]
        return EmbeddingResponse(data=data, model=request.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
"""A call in free text, as lmaas's ChatML template (and Qwen2.5's, Qwen3's, Hermes') writes it: `<tool_call>{"name", "arguments"}</tool_call>`."""
TOOL_CALL_OPEN = "<tool_call>"


@dataclass(frozen=True)
class ToolChoice:
    """What a chat request's `tool_choice` makes of its reply, as vLLM's OpenAI server does (with the "hermes" tool-call parser for "auto").

    - "none" (the default without tools): any tools are rendered into the prompt; the reply is text.
    - named, `{"type": "function", "function": {"name": N}}`: structured output under N's `parameters`; the reply is
      one call of N whose `arguments` are the generated JSON text, `content` null, finish_reason the engine's ("stop").
    - "required": structured output of a JSON array of `{"name": <a tool's>, "parameters": <its arguments>}` (at
      least one; at most one when `parallel_tool_calls` is false); each element becomes a call; finish_reason
      "tool_calls" (the engine's when it stopped for another reason, e.g. "length").
    - "auto" (the default with tools): the model writes text or calls; the reply's calls are the
      `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks of its text (vLLM's "hermes" tool-call
      parser reads the same format: the one lmaas's default template and Qwen's and Hermes' templates teach),
      each naming one of the request's tools; `content` is the text before them (null when none), finish_reason
      "tool_calls". Text without such blocks, or with one that is not a valid call, is the reply's content as is.

    Named and "required" need structured output, which the vLLM engine has; lmaas's own engine refuses them with a
    400 naming `tool_choice`, as it does with `response_format` combined with either of them.
    """

    mode: str
    """"none", "auto", "named" or "required"."""
    name: str | None = None
    """The function a named choice calls."""
    schema: dict[str, Any] | None = None
    """The JSON Schema the generated text follows (named: the function's parameters; "required": the array's)."""
    tools: tuple[str, ...] = ()
    """The request's function names ("auto" takes calls of these only)."""

    @classmethod
    def of(cls, request: ChatCompletionRequest) -> "ToolChoice":
        """Raises InvalidInputError naming `tool_choice`: structured `response_format` with a call forced."""
        choice = request.tool_choice
        if choice == "auto":
            return cls("auto", tools=tuple(t.function.name for t in request.tools or []))
        if choice == "none":
            return cls("none")
        fmt = request.response_format
        if fmt is not None and fmt.type != "text":
            raise InvalidInputError(f"response_format {fmt.type} cannot be combined with a tool call forced by tool_choice; drop one of them",
                                    param="tool_choice")
        tools = request.tools or []
        if isinstance(choice, NamedToolChoice):
            tool = next(t for t in tools if t.function.name == choice.function.name)  # the request checked that it is there
            return cls("named", tool.function.name, tool.function.parameters)
        return cls("required", schema=required_tools_schema(request.tool_dicts() or [], request.parallel_tool_calls))

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """`params` with the structured output this choice needs (errors about it name `tool_choice`)."""
        if self.schema is None:
            return params
        return replace(params, json_schema=json.dumps(self.schema), json_object=False, structured_by="tool_choice")

    def reply(self, text: str, finish: str | None) -> tuple[ChatMessageOut, str | None]:
        """A whole choice's message and finish_reason from its generated text and the engine's finish_reason."""
        if self.mode == "none":
            return ChatMessageOut(content=text), finish
        if self.mode == "auto":
            content, calls = parse_text_tool_calls(text, self.tools)
            if not calls:
                return ChatMessageOut(content=text), finish
            return ChatMessageOut(content=content, tool_calls=calls), "tool_calls" if finish == "stop" else finish
        if self.mode == "named":
            calls = [ToolCall(id=new_tool_call_id(), function=FunctionCall(name=self.name, arguments=text))] if text.strip() else []
            return ChatMessageOut(content=None, tool_calls=calls), finish
        return ChatMessageOut(content=None, tool_calls=parse_tool_calls(text)), "tool_calls" if finish == "stop" else finish

    def stream(self, call: "_StreamedCall", text: str, finish: str | None) -> tuple[list[ChatDelta], str | None]:
        """The deltas of one stream event of a choice (the last one carries the event's logprobs) and its finish_reason.

        Named: the call's first delta (index, id, type, name, arguments "") once text arrives, then the argument text
        as it comes. "required": nothing until the array is complete, then every call whole, on the last event.
        """
        if self.mode == "none":
            return [ChatDelta(content=text) if text else ChatDelta()], finish
        if self.mode == "auto":
            return self._stream_auto(call, text, finish)
        if self.mode == "named":
            deltas = []
            if text and call.id is None:
                call.id = new_tool_call_id()
                deltas.append(ChatDelta(tool_calls=[ToolCallDelta(index=0, id=call.id, type="function",
                                                                  function=FunctionCallDelta(name=self.name, arguments=""))]))
            deltas.append(ChatDelta(tool_calls=[ToolCallDelta(index=0, function=FunctionCallDelta(arguments=text))]) if text else ChatDelta())
            return deltas, finish
        call.text += text
        if finish is None:
            return [ChatDelta()], None
        calls = parse_tool_calls(call.text)
        deltas = [ToolCallDelta(index=i, id=c.id, type="function", function=FunctionCallDelta(name=c.function.name, arguments=c.function.arguments))
                  for i, c in enumerate(calls)]
        return [ChatDelta(tool_calls=deltas or None)], "tool_calls" if finish == "stop" else finish


    def _stream_auto(self, call: "_StreamedCall", text: str, finish: str | None) -> tuple[list[ChatDelta], str | None]:
        """"auto": text goes out as it comes until a `<tool_call>` opens (a possible start of one is held back); from
        there the rest is held, and at the end it goes out as the calls it holds, or as text when it holds none."""
        call.text += text
        piece = ""
        if not call.holding:
            opened = call.text.find(TOOL_CALL_OPEN, call.sent)
            if opened >= 0:
                call.holding, ready = True, opened
            elif finish is not None:
                ready = len(call.text)
            else:
                ready = len(call.text) - _partial_open(call.text)
            piece, call.sent = call.text[call.sent : ready], max(call.sent, ready)
        if finish is None:
            return [ChatDelta(content=piece) if piece else ChatDelta()], None
        held = call.text[call.sent :]
        calls = parse_text_tool_calls(held, self.tools)[1] if held else []
        if not calls:
            return [ChatDelta(content=piece + held) if piece + held else ChatDelta()], finish
        deltas = [ToolCallDelta(index=i, id=c.id, type="function", function=FunctionCallDelta(name=c.function.name, arguments=c.function.arguments))
                  for i, c in enumerate(calls)]
        return [*([ChatDelta(content=piece)] if piece else []), ChatDelta(tool_calls=deltas)], "tool_calls" if finish == "stop" else finish


def _partial_open(text: str) -> int:
    """How many trailing characters of `text` could be the start of `<tool_call>` (held back until the next token says)."""
    for n in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-n:]):
            return n
    return 0


@dataclass
class _StreamedCall:
    """What a stream has sent of one choice's tool call(s)."""

    id: str | None = None
    text: str = ""
    sent: int = 0
    """("auto") characters of `text` sent as content."""
    holding: bool = False
    """("auto") a `<tool_call>` opened at `sent`: the rest waits for the end."""


def required_tools_schema(tools: list[dict[str, Any]], parallel_tool_calls: bool = True) -> dict[str, Any]:
    """The JSON Schema of tool_choice "required"'s output, as vLLM's `_get_json_schema_from_tools`: an array of at least
    one (at most one without parallel calls) `{"name": <one tool's name>, "parameters": <its parameters>}`, anyOf per tool.

    The tools' `$defs` move to the top of the schema (their `$ref`s point there); two tools defining one name differently
    is a 400 naming `tools`.
    """
    defs: dict[str, Any] = {}
    options = []
    for tool in tools:
        function = tool["function"]
        parameters = dict(function.get("parameters") or {"type": "object", "properties": {}})
        for name, schema in (parameters.pop("$defs", None) or {}).items():
            if defs.setdefault(name, schema) != schema:
                raise InvalidInputError(f"tools define $defs {name!r} twice, differently; give it one schema", param="tools")
        options.append({
            "properties": {"name": {"type": "string", "enum": [function["name"]]}, "parameters": parameters},
            "required": ["name", "parameters"],
        })
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": options}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The calls in tool_choice "required"'s output (a JSON array of `{"name", "parameters"}`); none when it is not
    one (generation cut short by max_tokens), as vLLM."""
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    return [
        ToolCall(id=new_tool_call_id(), function=FunctionCall(name=item["name"], arguments=json.dumps(item["parameters"], ensure_ascii=False)))
        for item in items
        if isinstance(item, dict) and isinstance(item.get("name"), str) and "parameters" in item
    ]


def parse_text_tool_calls(text: str, tools: tuple[str, ...]) -> tuple[str | None, list[ToolCall]]:
    """(the content before them, the calls) of the `<tool_call>` blocks in free text (tool_choice "auto"); no calls
    when there is no block or any block is not a JSON `{"name": <one of tools>, "arguments": {...}}`."""
    blocks = list(TOOL_CALL.finditer(text))
    calls = []
    for block in blocks:
        try:
            item = json.loads(block.group(1))
        except ValueError:
            return text, []
        arguments = item.get("arguments", item.get("parameters")) if isinstance(item, dict) else None
        if not isinstance(item, dict) or item.get("name") not in tools or not isinstance(arguments, dict):
            return text, []
        calls.append(ToolCall(id=new_tool_call_id(), function=FunctionCall(name=item["name"], arguments=json.dumps(arguments, ensure_ascii=False))))
    if not calls:
        return text, []
    return text[: blocks[0].start()].strip() or None, calls


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _sampling(request, max_tokens: int | None, logprobs: int | None) -> SamplingParams:  # noqa: ANN001 - either request type
    fmt = request.response_format
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        stop=tuple(request.stop or ()),
        seed=request.seed,
        logprobs=logprobs,
        ignore_eos=request.ignore_eos,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        json_schema=json.dumps(fmt.json_schema.schema_) if fmt is not None and fmt.type == "json_schema" else None,
        json_object=fmt is not None and fmt.type == "json_object",
    )
    params.check()
    return params


def _choice_id(request_id: str, index: int) -> str:
    """The engine request id of choice `index` (the response's own id for the first)."""
    return request_id if index == 0 else f"{request_id}-{index}"


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` samples with its own seed (seed + index), so a seeded request with n > 1 repeats, choice by choice."""
    return params if index == 0 or params.seed is None else replace(params, seed=params.seed + index)


ANSWERED: contextvars.ContextVar[str | None] = contextvars.ContextVar("lmaas_answered_version", default=None)
"""`name:version` that answers the current request (its first choice's first event, `TokenEvent.version`), once
its choices have started: the routers' version header and metering read it; None when the engine does not say."""
FIRST_TOKEN: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("lmaas_first_token", default=None)
"""A list the HTTP middleware hands each request (`RequestTelemetry`); the `time.perf_counter()` at which the
request's first token reached this process is appended to it (a list, so the stream's task sees the same one)."""


async def _start_choices(start: Callable[[int], AsyncIterator[TokenEvent]], n: int) -> list[AsyncIterator[TokenEvent]]:
    """Start `n` choices and wait for each one's first event, so bad input fails before any stream begins
    (and `ANSWERED` names the version that answers before the response's headers go out)."""
    streams = [start(i) for i in range(n)]
    firsts = await asyncio.gather(*(_first(s) for s in streams), return_exceptions=True)
    failed = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failed is not None:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        raise failed
    if firsts and firsts[0].version:
        ANSWERED.set(firsts[0].version)
    first_token = FIRST_TOKEN.get()
    if first_token is not None and not first_token:
        first_token.append(time.perf_counter())
    return [_chain(first, s) for first, s in zip(firsts, streams)]


async def _merge(streams: list[AsyncIterator[TokenEvent]]) -> AsyncIterator[TokenEvent]:
    """The events of every choice as they come, each tagged with its choice's `index` (token counts stay per choice)."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield event
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, events: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in events:
                queue.put_nowait((index, event))
            queue.put_nowait((index, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((index, exc))
        finally:
            await events.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    running = len(streams)
    try:
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield replace(item, index=index)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect_choices(
    events: AsyncIterator[TokenEvent], n: int, restart: Callable[[int], AsyncIterator[TokenEvent]]
) -> list[list[TokenEvent]]:
    """Every event of a non-streaming request, per choice. A choice whose replica was lost mid-way
    runs once more from its start on another replica; finished choices are kept."""
    choices: list[list[TokenEvent]] = [[] for _ in range(n)]
    try:
        async for event in events:
            choices[event.index].append(event)
    except ReplicaLostError:
        # the client has received nothing yet, so each unfinished choice it gets is one whole generation
        for i, collected in enumerate(choices):
            if not collected or collected[-1].finish_reason is None:
                retried = restart(i)
                try:
                    choices[i] = [e async for e in retried]
                finally:
                    await retried.aclose()
    finally:
        await events.aclose()
    return choices


def _total_usage(choices: list[list[TokenEvent]], n: int) -> Usage:
    """OpenAI's usage of a request with several choices: each prompt once, every choice's completion tokens."""
    return _usage({i: c[-1] for i, c in enumerate(choices) if c}, n)


async def _first(events: AsyncIterator[TokenEvent]) -> TokenEvent:
    """The first event, so validation errors raise before a stream (and its 200 status) begins."""
    try:
        return await events.__anext__()
    except BaseException:
        await events.aclose()
        raise


async def _chain(first: TokenEvent, events: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
    try:
        yield first
        if first.finish_reason is None:
            async for event in events:
                yield event
    finally:
        await events.aclose()


async def _metered(
    request_id: str, events: AsyncIterator[TokenEvent], on_finish: OnFinish | None, lasts: dict[int, TokenEvent] | None = None, n: int = 1
) -> AsyncIterator[TokenEvent]:
    """`events`, calling `on_finish` with the request's token counts (every choice's) when they end or are abandoned.

    `lasts` (choice index -> its latest event) is filled as events pass, for the caller's usage chunk;
    `n` is the choices per prompt (see `_usage`).
    """
    lasts = {} if lasts is None else lasts
    reported = False
    try:
        async for event in events:
            lasts[event.index] = event
            yield event
        if on_finish is not None and lasts:
            reported = True
            usage = _usage(lasts, n)
            await on_finish(request_id, usage.prompt_tokens, usage.completion_tokens)  # before [DONE]: usage is current once a client sees it
    finally:
        await events.aclose()
        if on_finish is not None and lasts and not reported:
            # the client left (or the engine failed) mid-stream: bill what was generated, without blocking the teardown
            usage = _usage(lasts, n)
            task = asyncio.ensure_future(on_finish(request_id, usage.prompt_tokens, usage.completion_tokens))
            _background.add(task)
            task.add_done_callback(_background.discard)


_background: set[asyncio.Future] = set()
"""Metering tasks of abandoned streams (a reference keeps them from being garbage-collected mid-run)."""


def _usage(lasts: dict[int, TokenEvent], n: int = 1) -> Usage:
    """The usage of a request from the last event of each of its choices (index -> event): every prompt's tokens
    once (choices `i*n .. i*n+n-1` share prompt `i`) and every choice's completion tokens."""
    prompt = sum({i // n: e.prompt_tokens for i, e in lasts.items()}.values())
    completion = sum(e.completion_tokens for e in lasts.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _completion_logprobs(events: list[TokenEvent], wanted: bool, offset: int = 0) -> CompletionLogprobs | None:
    if not wanted:
        return None
    out = CompletionLogprobs()
    for event in events:
        if event.token is None:
            continue
        out.tokens.append(event.token)
        out.token_logprobs.append(event.logprob)
        out.top_logprobs.append({t.token: t.logprob for t in event.top_logprobs})
        out.text_offset.append(offset)
        offset += len(event.text)
    return out


def _chat_logprobs(events: list[TokenEvent]) -> ChatLogprobs:
    content = [
        TokenLogprobOut(
            token=e.token,
            logprob=e.logprob,
            bytes=list(e.token.encode()),
            top_logprobs=[TopLogprobOut(token=t.token, logprob=t.logprob, bytes=list(t.token.encode())) for t in e.top_logprobs],
        )
        for e in events
        if e.token is not None
    ]
    return ChatLogprobs(content=content)


def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _sse(model) -> str:  # noqa: ANN001 - a pydantic model
    return f"data: {model.model_dump_json()}\n\n"


def error_event(exc: BaseException) -> str:
    """The SSE line that reports an error after a stream has begun (its status is already 200)."""
    if isinstance(exc, LmaasError):
        body = error_body(exc.message, exc.type, param=exc.param)
    else:
        body = error_body(f"generation failed: {exc}", "internal_error")
    return f"data: {json.dumps(body)}\n\n"
