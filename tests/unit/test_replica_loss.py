"""A model replica that dies mid-request: what the gateway retries, and what it cannot (no Ray cluster here).

The real kill is in tests/integration/test_failures.py; these pin the retry rules with fakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from lmaas.errors import InvalidInputError, ReplicaLostError
from lmaas.serve.engine import Engine, EngineStats, GenerationRequest, SamplingParams, TokenEvent
from lmaas.serve.openai_api import OpenAIServing
from lmaas.serve.protocol.openai import ChatCompletionRequest, CompletionRequest


class DyingEngine(Engine):
    """Yields `tokens` events; the first `deaths` calls lose their replica after `die_after` of them."""

    def __init__(self, deaths: int = 1, die_after: int = 2, tokens: int = 4) -> None:
        self.model_id, self.deaths, self.die_after, self.tokens, self.calls = "m", deaths, die_after, tokens, 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        self.calls += 1
        dies = self.calls <= self.deaths
        for i in range(self.tokens):
            if dies and i == self.die_after:
                raise ReplicaLostError("the replica serving this request stopped (ActorDiedError); retry the request")
            await asyncio.sleep(0)
            yield TokenEvent(request.request_id, i, f"t{i}", 3, i + 1, "length" if i == self.tokens - 1 else None)

    async def generate_chat(self, request_id: str, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        async for event in self.generate(GenerationRequest(request_id, "chat", params)):
            yield event

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0)


def test_a_non_streaming_completion_restarts_once_when_its_replica_dies_mid_way():
    engine = DyingEngine()
    response = asyncio.run(OpenAIServing({"m": engine}).create_completion(CompletionRequest(model="m", prompt="hi", max_tokens=4)))
    assert engine.calls == 2
    assert response.choices[0].text == "t0t1t2t3" and response.usage.completion_tokens == 4  # one whole generation


def test_a_non_streaming_chat_restarts_once_when_its_replica_dies_mid_way():
    engine = DyingEngine()
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    response = asyncio.run(OpenAIServing({"m": engine}).create_chat_completion(request))
    assert engine.calls == 2 and response.choices[0].message.content == "t0t1t2t3"


def test_a_second_loss_and_a_started_stream_end_with_the_error():
    async def complete(engine: Engine, stream: bool) -> object:
        result = await OpenAIServing({"m": engine}).create_completion(CompletionRequest(model="m", prompt="hi", max_tokens=4, stream=stream))
        return [line async for line in result] if stream else result

    with pytest.raises(ReplicaLostError):
        asyncio.run(complete(DyingEngine(deaths=2), stream=False))
    streaming = DyingEngine()
    with pytest.raises(ReplicaLostError):  # its client already has tokens: the router turns this into an error event
        asyncio.run(complete(streaming, stream=True))
    assert streaming.calls == 1


class FakeStream:
    """What `handle.options(stream=True).generate.remote(...)` returns: lists of events (one each here), or an error after `events`."""

    def __init__(self, events: list[TokenEvent], error: BaseException | None) -> None:
        self.events, self.error, self.cancelled = events, error, False

    def __aiter__(self) -> "FakeStream":
        return self

    async def __anext__(self) -> list[TokenEvent]:
        if self.events:
            return [self.events.pop(0)]
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """A deployment handle whose calls play `script`: one (events, error) per call, in order."""

    def __init__(self, script: list[tuple[int, BaseException | None]]) -> None:
        self.script, self.calls = list(script), 0

    def options(self, **_: object) -> "FakeHandle":
        return self

    @property
    def generate(self) -> "FakeHandle":
        return self

    @property
    def embed(self) -> "FakeHandle":
        return self

    def remote(self, *_: object) -> object:
        self.calls += 1
        tokens, error = self.script.pop(0)
        events = [TokenEvent("r", i, f"t{i}", 1, i + 1, "length" if i == tokens - 1 and error is None else None) for i in range(tokens)]
        return FakeStream(events, error)


def _died() -> BaseException:
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def test_the_deployment_engine_resends_a_generation_that_lost_its_replica_before_its_first_event():
    from lmaas.serve.replica import DeploymentEngine

    async def run(handle: FakeHandle) -> list[str]:
        engine = DeploymentEngine("m", handle)
        return [e.text async for e in engine.generate(GenerationRequest("r", "hi", SamplingParams(max_tokens=2)))]

    handle = FakeHandle([(0, _died()), (0, _died()), (2, None)])
    assert asyncio.run(run(handle)) == ["t0", "t1"] and handle.calls == 3
    with pytest.raises(ReplicaLostError):  # after 2 retries
        asyncio.run(run(FakeHandle([(0, _died())] * 3)))
    started = FakeHandle([(1, _died()), (2, None)])
    with pytest.raises(ReplicaLostError):  # an event was passed on: not resent here
        asyncio.run(run(started))
    assert started.calls == 1
    failing = FakeHandle([(0, InvalidInputError("bad prompt")), (2, None)])
    with pytest.raises(InvalidInputError):  # the request's own fault: never resent
        asyncio.run(run(failing))
    assert failing.calls == 1
