"""The gRPC inference API (`protocol/lmaas.proto`, service `lmaas.v1.Inference`): a thin map onto `OpenAIServing`.

The proto messages become the HTTP API's pydantic requests, so both transports share validation,
engines and error messages; errors become gRPC status codes (`errors.grpc_status`). No Ray here: the
Serve ingress (`ingress.OpenAIIngress`) has methods named like the RPCs that call these, and
Serve's gRPC proxy routes `/lmaas.v1.Inference/<Method>` to them.

    import grpc
    from lmaas.serve.protocol import lmaas_pb2 as pb, lmaas_pb2_grpc as pb_grpc

    stub = pb_grpc.InferenceStub(grpc.insecure_channel("127.0.0.1:9000"))
    for chunk in stub.Complete(pb.CompletionRequest(model="tiny-lm", prompt="def f(", max_tokens=16)):
        print(chunk.text, end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn, Protocol

import grpc
from pydantic import BaseModel, ValidationError

from lmaas.errors import InvalidInputError
from lmaas.serve.engine import TokenEvent
from lmaas.serve.errors import grpc_status, validation_message
from lmaas.serve.openai_api import ANSWERED, OpenAIServing
from lmaas.serve.protocol import lmaas_pb2 as pb
from lmaas.serve.protocol.openai import CompletionRequest, EmbeddingRequest


class StatusContext(Protocol):
    """What the servicer needs of a gRPC context (`grpc.ServicerContext`, Serve's `RayServegRPCContext`)."""

    def set_code(self, code: grpc.StatusCode) -> None: ...
    def set_details(self, details: str) -> None: ...


class GrpcServing:
    """`lmaas.v1.Inference` over the engines of an `OpenAIServing`.

    On an error each method sets the context's status code and message, then raises: Serve's proxy
    sends that status (a plain `grpc.aio` server keeps the code but rewrites the message).
    """

    def __init__(self, serving: OpenAIServing, *, auth: Any = None, refs: dict[str, str] | None = None) -> None:
        self.serving, self.auth, self.refs = serving, auth, dict(refs or {})

    # ---- API keys: the same rules as the HTTP API (`authorization: Bearer <key>` metadata) ----

    def _principal(self, context: StatusContext | None) -> Any:
        from lmaas.auth import INFERENCE
        from lmaas.errors import PermissionDeniedError

        metadata = dict(getattr(context, "invocation_metadata", lambda: [])() or []) if context is not None else {}
        principal = self.auth.authenticate(metadata.get("authorization"))
        if not principal.has(INFERENCE):
            raise PermissionDeniedError(f"this API key lacks the {INFERENCE!r} scope", param="authorization")
        return principal

    def _visible(self, principal: Any, model: str) -> bool:
        from lmaas.registry import parse_ref

        try:
            name = parse_ref(self.refs.get(model, model)).name
        except Exception:  # noqa: BLE001 - not a registry reference: not a registry model
            return True
        return self.auth.visible_model(principal, name)

    async def _admit(self, context: StatusContext | None, model: str) -> Any:
        """Authenticate, check the scope, the model's visibility (404) and the rate limits (429); returns the metering callback."""
        ANSWERED.set(None)  # filled in once the request's choices start (see `openai_api.ANSWERED`)
        if self.auth is None:
            return None
        from starlette.concurrency import run_in_threadpool

        from lmaas.errors import NotFoundError

        principal = await run_in_threadpool(self._principal, context)
        if model not in self.serving.engines or not await run_in_threadpool(self._visible, principal, model):
            raise NotFoundError(f"model {model!r} is not served here", param="model")
        await run_in_threadpool(self.auth.quotas.admit, principal)
        ref, auth = self.refs.get(model, model), self.auth

        async def on_finish(response_id: str | None, prompt_tokens: int, completion_tokens: int) -> None:
            from lmaas.auth.quotas import UsageRecord

            version = (ANSWERED.get() or await auth.version_of_async(ref)) if response_id else None  # as the HTTP routes
            await auth.usage.record(UsageRecord(principal, model, prompt_tokens, completion_tokens, response_id, version))

        return on_finish

    # ---- the RPCs ----

    async def list_models(self, request: pb.ListModelsRequest, context: StatusContext) -> pb.ListModelsResponse:
        from starlette.concurrency import run_in_threadpool

        try:
            cards = self.serving.list_models().data
            if self.auth is not None:
                principal = await run_in_threadpool(self._principal, context)
                cards = [c for c in cards if await run_in_threadpool(self._visible, principal, c.id)]
        except Exception as exc:
            _fail(context, exc)
        return pb.ListModelsResponse(models=[pb.Model(id=c.id, owned_by=c.owned_by) for c in cards])

    async def complete(self, request: pb.CompletionRequest, context: StatusContext) -> AsyncIterator[pb.CompletionChunk]:
        try:
            parsed = _parse(CompletionRequest, completion_fields(request))
            on_finish = await self._admit(context, parsed.model)
            request_id, events = await self.serving.start_completion(parsed)
        except Exception as exc:
            _fail(context, exc)
        last = None
        try:
            async for event in events:
                last = event
                yield completion_chunk(request_id, parsed.model, event, parsed.logprobs is not None)
        except Exception as exc:
            _fail(context, exc)
        finally:
            await events.aclose()  # a client that leaves mid-stream: the model's engine frees the slot now
            if on_finish is not None and last is not None:
                await on_finish(request_id, last.prompt_tokens, last.completion_tokens)

    async def embed(self, request: pb.EmbeddingRequest, context: StatusContext) -> pb.EmbeddingResponse:
        try:
            parsed = _parse(EmbeddingRequest, {"model": request.model, "input": list(request.input)})
            on_finish = await self._admit(context, parsed.model)
            out = await self.serving.create_embedding(parsed, on_finish=on_finish)
        except Exception as exc:
            _fail(context, exc)
        return pb.EmbeddingResponse(
            model=out.model,
            data=[pb.Embedding(index=d.index, embedding=d.embedding) for d in out.data],
            usage=pb.Usage(prompt_tokens=out.usage.prompt_tokens, total_tokens=out.usage.total_tokens),
        )


def completion_fields(request: pb.CompletionRequest) -> dict[str, Any]:
    """The `CompletionRequest` fields a proto request sets (unset optional fields keep the HTTP API's defaults)."""
    if request.prompt and request.prompt_token_ids:
        raise InvalidInputError("set prompt or prompt_token_ids, not both", param="prompt")
    fields: dict[str, Any] = {
        "model": request.model,
        "prompt": request.prompt or list(request.prompt_token_ids),
        "top_k": request.top_k,
        "stop": list(request.stop),
        "ignore_eos": request.ignore_eos,
        "stream": True,
    }
    for name in ("max_tokens", "temperature", "top_p", "seed", "logprobs"):
        if request.HasField(name):
            fields[name] = getattr(request, name)
    return fields


def completion_chunk(request_id: str, model: str, event: TokenEvent, logprobs: bool) -> pb.CompletionChunk:
    chunk = pb.CompletionChunk(id=request_id, model=model, text=event.text, finish_reason=event.finish_reason or "")
    if event.token_id is not None:
        chunk.token_id = event.token_id
    if event.finish_reason is not None:
        chunk.usage.CopyFrom(
            pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens, total_tokens=event.prompt_tokens + event.completion_tokens)
        )
    if logprobs and event.token is not None:
        chunk.token = event.token
        if event.logprob is not None:
            chunk.logprob = event.logprob
        chunk.top_logprobs.extend(pb.TopLogprob(token=t.token, token_id=t.token_id, logprob=t.logprob) for t in event.top_logprobs)
    return chunk


def _parse(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    """Validate like the HTTP API does; a bad field raises InvalidInputError naming it."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise InvalidInputError(message, param=param) from None


def _fail(context: StatusContext | None, exc: BaseException) -> NoReturn:
    if context is not None:  # None: called through a deployment handle, not the gRPC proxy
        code, message = grpc_status(exc)
        context.set_code(code)
        context.set_details(message)
    raise exc
