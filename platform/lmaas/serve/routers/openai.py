"""OpenAI-compatible inference API under `/v1/`: a thin map from HTTP onto `OpenAIServing`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lmaas.serve.openai_api import DONE, OpenAIServing, error_event
from lmaas.serve.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelList,
)

router = APIRouter(prefix="/v1", tags=["openai"])


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.openai


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return _serving(request).list_models()


@router.post("/completions", response_model=CompletionResponse)
async def create_completion(request: Request, body: CompletionRequest):  # noqa: ANN201 - JSON or SSE
    return _respond(await _serving(request).create_completion(body))


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(request: Request, body: ChatCompletionRequest):  # noqa: ANN201 - JSON or SSE
    return _respond(await _serving(request).create_chat_completion(body))


@router.post("/embeddings", response_model=EmbeddingResponse)
async def create_embedding(request: Request, body: EmbeddingRequest) -> EmbeddingResponse:
    return await _serving(request).create_embedding(body)


def _respond(result):  # noqa: ANN001, ANN202
    if isinstance(result, (CompletionResponse, ChatCompletionResponse)):
        return result
    return StreamingResponse(_sse(result), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _sse(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    # a client that disconnects cancels this generator; closing `lines` aborts the request in the engine
    try:
        async for line in lines:
            yield line
    except Exception as exc:  # noqa: BLE001 - the status is already 200: report the error in the stream
        yield error_event(exc)
    finally:
        await lines.aclose()
    yield DONE
