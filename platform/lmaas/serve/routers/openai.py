"""OpenAI-compatible inference API under `/v1/`: a thin map from HTTP onto `OpenAIServing`.

Every route needs a key with the `inference` scope (`serve.auth.inference_access`); a model of
another tenant answers 404 exactly as a model that is not served, and each finished response is
metered (tokens, usage, response id -> model version) through `on_finish`.

A `model` that no deployment serves by name may be a LoRA adapter (`serve.adapters.AdapterRoutes`, resolved as the
caller's tenant): the request then runs on its base model's deployment with the adapter's weights, and is metered
and labelled as the adapter (its name and version).

Each response names the model version that produced it in `X-Lmaas-Model-Version` (with a canary,
the side that answered: `serve.canary` fills in `ROUTED`); a sticky canary split keeps a caller on one
side by the request's `user`, else the `X-Lmaas-User` header, else the API key (`CALLER`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from lmaas.auth import Principal
from lmaas.auth.quotas import UsageRecord
from lmaas.errors import LmaasError, NotFoundError
from lmaas.serve.auth import authenticate, get_auth, inference_access
from lmaas.serve.canary import CALLER, ROUTED, Routed
from lmaas.serve.openai_api import ANSWERED, DONE, OnFinish, OpenAIServing, error_event
from lmaas.serve.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from lmaas.serve.streams import ready_batches

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(inference_access)])
VERSION_HEADER = "X-Lmaas-Model-Version"


def _serving(request: Request) -> OpenAIServing:
    """The app's serving, or this request's (`_admit_model` adds the engine of an adapter the caller may use)."""
    return getattr(request.state, "openai", None) or request.app.state.openai


async def _adapter_serving(request: Request, principal: Principal, model: str) -> None:
    """When `model` is not served by name but names an adapter `principal`'s tenant may call, this request's serving gets its engine.

    Raises:
        NotFoundError: an adapter whose base no deployment here serves with adapters enabled.
    """
    routes = getattr(request.app.state, "adapters", None)
    if routes is None or model in request.app.state.openai.engines:
        return
    engine = await routes.resolve_async(model, principal.tenant_filter)
    if engine is not None:
        request.state.openai = request.app.state.openai.with_engine(model, engine)


def _registry_name(request: Request, model: str) -> str | None:
    from lmaas.registry import parse_ref

    try:
        return parse_ref(request.app.state.refs.get(model, model)).name
    except LmaasError:
        return None


def _visible(request: Request, principal: Principal, model: str) -> bool:
    auth = get_auth(request)
    if auth is None:
        return True
    name = _registry_name(request, model)
    return name is None or auth.visible_model(principal, name)


async def _admit_model(request: Request, model: str, user: str | None = None) -> OnFinish | None:
    """404 unless `model` is served and visible to the caller; returns the metering callback."""
    auth, principal = get_auth(request), authenticate(request)
    await _adapter_serving(request, principal, model)
    serving = _serving(request)
    ref = request.app.state.refs.get(model, model)
    ROUTED.set(Routed())
    ANSWERED.set(None)
    CALLER.set(user or request.headers.get("x-lmaas-user") or principal.key_id)
    if auth is None:
        if model in serving.engines:
            request.state.lmaas_model, request.state.lmaas_version = model, _pinned_version(ref)
        return None
    if model not in serving.engines or not await _visible_async(request, principal, model):
        served = await run_in_threadpool(lambda: sorted(n for n in serving.engines if _visible(request, principal, n)))
        raise NotFoundError(f"model {model!r} is not served here (served: {', '.join(served) or 'none'})", param="model")
    request.state.lmaas_model = model  # for request metrics (`RequestTelemetry`)
    request.state.lmaas_version = await _version_async(auth, ref)  # the stable side's (a canary answer: see VERSION_HEADER)
    routed = ROUTED.get()

    async def on_finish(response_id: str | None, prompt_tokens: int, completion_tokens: int) -> None:
        version = (ANSWERED.get() or await auth.version_of_async(routed.ref or ref)) if response_id else None
        await auth.usage.record(UsageRecord(principal, model, prompt_tokens, completion_tokens, response_id, version))

    return on_finish


# Each request asks the same few questions (may this key see the model, which version does its reference name);
# Auth caches the answers, so these answer from the cache on the event loop and go to a worker thread only on a
# miss: a thread hop per question cost more event-loop time than the rest of a one-text embedding request.


async def _visible_async(request: Request, principal: Principal, model: str) -> bool:
    auth = get_auth(request)
    name = _registry_name(request, model) if auth is not None else None
    if name is None:
        return True
    visible = auth.visible_model_cached(principal, name)
    return visible if visible is not None else await asyncio.to_thread(auth.visible_model, principal, name)


async def _version_async(auth, ref: str) -> str:  # noqa: ANN001 - an Auth
    hit, version = auth.version_of_cached(ref)
    if hit:
        return version or _pinned_version(ref)
    return await asyncio.to_thread(_version, auth, ref)


def _pinned_version(ref: str) -> str:
    from lmaas.registry import parse_ref

    try:
        version = parse_ref(ref).version
    except LmaasError:
        return ""
    return "" if version is None else f"{parse_ref(ref).name}:{version}"


def _version(auth, ref: str) -> str:  # noqa: ANN001 - an Auth
    """`name:version` the reference names now (cached in `auth`); "" when the registry cannot say."""
    try:
        return auth.version_of(ref) or _pinned_version(ref)
    except Exception:  # noqa: BLE001 - a label must not fail the request; metering reports a database outage
        return _pinned_version(ref)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The served models the caller may see, then the adapters it may call on them (`parent`: the served base)."""
    models = _serving(request).list_models()
    principal = authenticate(request)
    visible = await run_in_threadpool(lambda: [m for m in models.data if _visible(request, principal, m.id)])
    routes = getattr(request.app.state, "adapters", None)
    if routes is not None and routes.bases:
        served = {m.id for m in models.data}
        adapters = await run_in_threadpool(routes.listed, principal.tenant_filter)
        visible += [ModelCard(id=name, parent=base) for name, base in adapters if name not in served]
    return ModelList(data=visible)


@router.post("/completions", response_model=CompletionResponse)
async def create_completion(request: Request, response: Response, body: CompletionRequest):  # noqa: ANN201 - JSON or SSE
    on_finish = await _admit_model(request, body.model, body.user)
    result = await _serving(request).create_completion(body, on_finish=on_finish)
    return _respond(result, response, await _answered_version(request, body.model))


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(request: Request, response: Response, body: ChatCompletionRequest):  # noqa: ANN201 - JSON or SSE
    on_finish = await _admit_model(request, body.model, body.user)
    result = await _serving(request).create_chat_completion(body, on_finish=on_finish)
    return _respond(result, response, await _answered_version(request, body.model))


@router.post("/embeddings", response_model=EmbeddingResponse)
async def create_embedding(request: Request, response: Response, body: EmbeddingRequest) -> EmbeddingResponse:
    on_finish = await _admit_model(request, body.model, body.user)
    result = await _serving(request).create_embedding(body, on_finish=on_finish)
    response.headers[VERSION_HEADER] = await _answered_version(request, body.model)
    return result


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(request: Request, body: TokenizeRequest) -> TokenizeResponse:
    """vLLM's `/tokenize`: the token ids the model's tokenizer gives a prompt or a chat (not metered: nothing is generated)."""
    await _admit_model(request, body.model)
    return await _serving(request).tokenize(body)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
    await _admit_model(request, body.model)
    return await _serving(request).detokenize(body)


async def _answered_version(request: Request, model: str) -> str:
    """`name:version` that answered: as its replica said (`ANSWERED`), else what the reference (with a canary: its side's)
    names in the registry now; the reference itself when the registry cannot say."""
    answered = ANSWERED.get()
    if answered:
        return answered
    routed = ROUTED.get()
    ref = (routed.ref if routed is not None else None) or request.app.state.refs.get(model, model)
    auth = get_auth(request)
    version = await _version_async(auth, ref) if auth is not None else _pinned_version(ref)
    return version or ref


def _respond(result, response: Response, version: str):  # noqa: ANN001, ANN202
    if isinstance(result, (CompletionResponse, ChatCompletionResponse)):
        response.headers[VERSION_HEADER] = version
        return result
    headers = {"Cache-Control": "no-cache", VERSION_HEADER: version}
    return StreamingResponse(_sse(result), media_type="text/event-stream", headers=headers)


async def _sse(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    # a client that disconnects cancels this generator; closing `lines` aborts the request in the engine.
    # Lines that are ready together (several tokens from one replica message) go out in one write.
    try:
        async for batch in ready_batches(lines):
            yield "".join(batch)
    except Exception as exc:  # noqa: BLE001 - the status is already 200: report the error in the stream
        yield error_event(exc)
    finally:
        await lines.aclose()
    yield DONE
