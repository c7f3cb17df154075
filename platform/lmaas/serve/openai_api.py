"""The OpenAI-compatible API's logic, without HTTP: requests in, response models or SSE lines out.

`OpenAIServing` holds one `Engine` per served model name; the router in `routers/openai.py` only
maps HTTP onto it. Streams are async iterators of `data: ...` lines ending with `data: [DONE]`;
closing one early (a client that disconnects) aborts the request in its engine.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

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
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    TokenLogprobOut,
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

        Raises:
            NotFoundError, InvalidInputError: before the first token, so no stream has begun.
        """
        engine = self.engine(request.model)
        if request.echo:
            raise InvalidInputError("echo is not supported", param="echo")
        params = _sampling(request, request.max_tokens, request.logprobs)
        gen = GenerationRequest(new_request_id("cmpl"), request.prompt, params)
        events = engine.generate(gen)
        first = await _first(events)
        return gen.request_id, _chain(first, events)

    def _restart_completion(self, request: CompletionRequest, request_id: str) -> AsyncIterator[TokenEvent]:
        """The request's events once more, from its first token (see `_collect`)."""
        params = _sampling(request, request.max_tokens, request.logprobs)
        return self.engine(request.model).generate(GenerationRequest(request_id, request.prompt, params))

    async def create_completion(self, request: CompletionRequest, *, on_finish: OnFinish | None = None) -> CompletionResponse | AsyncIterator[str]:
        """A full response, or (when `stream`) an iterator of SSE lines; errors before the first token raise.

        `on_finish` gets the token counts once the response is complete (a stream: at its end, also
        when the client leaves early).
        """
        request_id, events = await self.start_completion(request)
        if request.stream:
            return self._completion_stream(request, request_id, events, on_finish)
        collected = await _collect(events, lambda: self._restart_completion(request, request_id))
        text = "".join(e.text for e in collected)
        last = collected[-1]
        if on_finish is not None:
            await on_finish(request_id, last.prompt_tokens, last.completion_tokens)
        choice = CompletionChoice(text=text, finish_reason=last.finish_reason, logprobs=_completion_logprobs(collected, request.logprobs is not None))
        return CompletionResponse(id=request_id, model=request.model, choices=[choice], usage=_usage(last))

    async def _completion_stream(
        self, request: CompletionRequest, request_id: str, events: AsyncIterator[TokenEvent], on_finish: OnFinish | None
    ) -> AsyncIterator[str]:
        offset = 0
        async for event in _metered(request_id, events, on_finish):
            logprobs = _completion_logprobs([event], request.logprobs is not None, offset)
            offset += len(event.text)
            if not event.text and event.finish_reason is None and logprobs is None:
                continue
            choice = CompletionChoice(text=event.text, finish_reason=event.finish_reason, logprobs=logprobs)
            yield _sse(CompletionResponse(id=request_id, model=request.model, choices=[choice]))
            if event.finish_reason is not None and request.stream_options and request.stream_options.include_usage:
                yield _sse(CompletionResponse(id=request_id, model=request.model, choices=[], usage=_usage(event)))

    # ---- chat ----

    async def create_chat_completion(
        self, request: ChatCompletionRequest, *, on_finish: OnFinish | None = None
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        engine = self.engine(request.model)
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        top = (request.top_logprobs or 0) if request.logprobs else None
        if request.top_logprobs and not request.logprobs:
            raise InvalidInputError("top_logprobs needs logprobs: true", param="top_logprobs")
        params = _sampling(request, request.max_completion_tokens or request.max_tokens, top)
        request_id = new_request_id("chatcmpl")
        events = engine.generate_chat(request_id, messages, params)
        first = await _first(events)
        if request.stream:
            return self._chat_stream(request, request_id, first, events, top is not None, on_finish)
        collected = await _collect(_chain(first, events), lambda: engine.generate_chat(request_id, messages, params))
        last = collected[-1]
        if on_finish is not None:
            await on_finish(request_id, last.prompt_tokens, last.completion_tokens)
        choice = ChatChoice(
            message=ChatMessageOut(content="".join(e.text for e in collected)),
            finish_reason=last.finish_reason,
            logprobs=_chat_logprobs(collected) if top is not None else None,
        )
        return ChatCompletionResponse(id=request_id, model=request.model, choices=[choice], usage=_usage(last))

    async def _chat_stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        first: TokenEvent,
        events: AsyncIterator[TokenEvent],
        logprobs: bool,
        on_finish: OnFinish | None = None,
    ) -> AsyncIterator[str]:
        yield _sse(ChatCompletionChunk(id=request_id, model=request.model, choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))]))
        async for event in _metered(request_id, _chain(first, events), on_finish):
            if not event.text and event.finish_reason is None and not logprobs:
                continue
            choice = ChatChunkChoice(
                delta=ChatDelta(content=event.text or None) if event.text else ChatDelta(),
                finish_reason=event.finish_reason,
                logprobs=_chat_logprobs([event]) if logprobs else None,
            )
            yield _sse(ChatCompletionChunk(id=request_id, model=request.model, choices=[choice]))
            if event.finish_reason is not None and request.stream_options and request.stream_options.include_usage:
                yield _sse(ChatCompletionChunk(id=request_id, model=request.model, choices=[], usage=_usage(event)))

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


def _sampling(request, max_tokens: int | None, logprobs: int | None) -> SamplingParams:  # noqa: ANN001 - either request type
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        stop=tuple(request.stop or ()),
        seed=request.seed,
        n=request.n,
        logprobs=logprobs,
        ignore_eos=request.ignore_eos,
    )
    params.check()
    return params


async def _first(events: AsyncIterator[TokenEvent]) -> TokenEvent:
    """The first event, so validation errors raise before a stream (and its 200 status) begins."""
    try:
        return await events.__anext__()
    except BaseException:
        await events.aclose()
        raise


async def _collect(events: AsyncIterator[TokenEvent], restart: Callable[[], AsyncIterator[TokenEvent]]) -> list[TokenEvent]:
    """Every event of a non-streaming request. When the replica generating it is lost mid-way
    (`ReplicaLostError`), the request runs once more from the start on another replica: its client
    has received nothing yet, so the answer it gets is one whole generation."""
    try:
        return [e async for e in events]
    except ReplicaLostError:
        pass
    retried = restart()
    try:
        return [e async for e in retried]
    finally:
        await retried.aclose()


async def _chain(first: TokenEvent, events: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
    try:
        yield first
        if first.finish_reason is None:
            async for event in events:
                yield event
    finally:
        await events.aclose()


async def _metered(request_id: str, events: AsyncIterator[TokenEvent], on_finish: OnFinish | None) -> AsyncIterator[TokenEvent]:
    """`events`, calling `on_finish` with the last event's token counts when they end (or are abandoned)."""
    last, reported = None, False
    try:
        async for event in events:
            last = event
            yield event
        if on_finish is not None and last is not None:
            reported = True
            await on_finish(request_id, last.prompt_tokens, last.completion_tokens)  # before [DONE]: usage is current once a client sees it
    finally:
        await events.aclose()
        if on_finish is not None and last is not None and not reported:
            # the client left (or the engine failed) mid-stream: bill what was generated, without blocking the teardown
            task = asyncio.ensure_future(on_finish(request_id, last.prompt_tokens, last.completion_tokens))
            _background.add(task)
            task.add_done_callback(_background.discard)


_background: set[asyncio.Future] = set()
"""Metering tasks of abandoned streams (a reference keeps them from being garbage-collected mid-run)."""


def _usage(event: TokenEvent) -> Usage:
    return Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens, total_tokens=event.prompt_tokens + event.completion_tokens)


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
