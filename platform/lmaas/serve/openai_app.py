"""The OpenAI-compatible inference app: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`.

Mounted by the Serve ingress; standalone for tests and one-machine setups:

    app = build_openai_app({"tiny-lm": CausalLMEngine("models/tiny-lm")})
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import json

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import lmaas
from lmaas.auth import Auth
from lmaas.serve.engine import Engine
from lmaas.serve.errors import error_body, install_error_handlers
from lmaas.serve.openai_api import OpenAIServing
from lmaas.serve.routers import openai as openai_router

MAX_BODY_BYTES = 4 * 1024 * 1024


def build_openai_app(
    engines: dict[str, Engine],
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    auth: Auth | None = None,
    refs: dict[str, str] | None = None,
) -> FastAPI:
    """A FastAPI app serving `engines` (keyed by the `model` name clients send) with OpenAI's API.

    Args:
        engines: one engine per served model name.
        max_body_bytes: larger request bodies are refused with 413 before they are parsed.
        auth: require API keys, enforce scopes, tenants and quotas, meter usage (see `lmaas.serve.auth`);
            None: open to every caller (tests, one-machine setups behind something else).
        refs: served name -> registry reference, where they differ (which model a name's tenant owns,
            which version answered a response); a name not listed is taken as the reference itself.
    """
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        for engine in engines.values():
            await engine.close()

    app = FastAPI(title="lmaas inference API", version=lmaas.__version__, lifespan=lifespan)
    app.state.openai = OpenAIServing(engines)
    app.state.auth = auth
    app.state.refs = dict(refs or {})
    install_error_handlers(app)
    app.include_router(openai_router.router)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with an OpenAI-style 413 error.

    A declared Content-Length is checked at once; a chunked body is read up to the limit first.
    """

    def __init__(self, app, max_bytes: int) -> None:  # noqa: ANN001 - an ASGI app
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(receive, send)
        if declared is not None:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(receive, send, more=bool(message.get("more_body")))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():  # noqa: ANN202
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, receive, send, more: bool = True) -> None:  # noqa: ANN001
        # read the rest and discard it: a client still sending when the socket closes sees a reset, not the 413
        drained = 0
        while more and drained < 16 * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = json.dumps(
            error_body(f"request body is larger than {self.max_bytes} bytes", "invalid_request_error", code="request_too_large")
        ).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
