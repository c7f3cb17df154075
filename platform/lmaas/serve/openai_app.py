"""The OpenAI-compatible inference app: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`.

Mounted by the Serve ingress; standalone for tests and one-machine setups:

    app = build_openai_app({"tiny-lm": CausalLMEngine("models/tiny-lm")})
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import lmaas
from lmaas.auth import Auth
from lmaas.ops.logs import REQUEST_ID, REQUEST_ID_HEADER, request_id_from
from lmaas.serve.auth import authenticate_async, get_auth
from lmaas.serve.engine import Engine
from lmaas.serve.errors import error_body, install_error_handlers
from lmaas.serve.openai_api import FIRST_TOKEN, OpenAIServing
from lmaas.serve.routers import openai as openai_router

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_UPLOAD_BYTES = 64 * 1024**3
UPLOAD_PATHS = re.compile(r"^/api/v1/(uploads/[^/]+/files/.+|models/[^/]+/versions)$")
"""Model file uploads (multipart, or one PUT per file): limited by `max_upload_bytes`, not `max_body_bytes`."""
FILES_PATH = "/v1/files"
FILES_MAX_BODY = 513 * 1024 * 1024
"""`POST /v1/files`: a file of up to 512 MB (`registry.files.MAX_FILE_BYTES`) and its multipart framing."""
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/files", "/healthz", "/readyz")
"""Route label values of request metrics; other paths count as "other" (a scanner cannot mint series)."""

access_log = logging.getLogger("lmaas.serve.access")


def build_openai_app(
    engines: dict[str, Engine],
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    auth: Auth | None = None,
    refs: dict[str, str] | None = None,
    metrics: Any = None,
    echo_request_id: bool = True,
    readiness: Any = None,
    adapters: Any = None,
) -> FastAPI:
    """A FastAPI app serving `engines` (keyed by the `model` name clients send) with OpenAI's API.

    Args:
        engines: one engine per served model name.
        max_body_bytes: larger request bodies are refused with 413 before they are parsed.
        max_upload_bytes: the same for model file uploads (`UPLOAD_PATHS`, where management routes are added).
        auth: require API keys, enforce scopes, tenants and quotas, meter usage (see `lmaas.serve.auth`);
            None: open to every caller (tests, one-machine setups behind something else).
        refs: served name -> registry reference, where they differ (which model a name's tenant owns,
            which version answered a response); a name not listed is taken as the reference itself.
        metrics: records each request (`lmaas.ops.metrics.GatewayMetrics` or any object with its methods); None: none.
        echo_request_id: return `X-Request-Id` (False behind Serve's proxy, which returns it itself).
        readiness: `async () -> (ready, {component: problem or "ok"})` behind `GET /readyz`; None: ready when up.
        adapters: `serve.adapters.AdapterRoutes`: a `model` no engine serves by name may be a LoRA adapter of one
            (resolved as the caller's tenant); None: only `engines`' names are served.
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
    app.state.adapters = adapters
    app.state.metrics = metrics  # the deployments API reads each deployment's recent traffic from it
    install_error_handlers(app)
    app.include_router(openai_router.router)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes)
    app.add_middleware(RequestTelemetry, metrics=metrics, echo_request_id=echo_request_id)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the gateway answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "Not ready: `checks` says which component does not answer."}})
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: 200 when every served model, the database and the artifact store answer; else 503.

        `checks` names each problem for an admin key (or with auth off). Anyone else, probes
        included, sees only `ok` / `not ok` for `database`, `storage` and `models` (all served models
        together): no model names, no store URI, nothing of any tenant's.
        """
        ready, checks = (True, {}) if readiness is None else await readiness()
        return await readiness_response(request, ready, checks)

    return app


async def readiness_response(request: Request, ready: bool, checks: dict[str, str]) -> JSONResponse:
    """`/readyz`'s answer: 200 or 503, with `checks` in full for an admin and `_redacted` for anyone else."""
    if not await _is_admin(request):
        checks = _redacted(checks)
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503)


async def _is_admin(request: Request) -> bool:
    """Whether the caller holds an admin key (no key, a bad one, or no database to ask: no)."""
    if get_auth(request) is not None and not request.headers.get("authorization"):
        return False  # a probe: no key, no lookup
    try:
        return (await authenticate_async(request)).is_admin  # auth off: the unrestricted caller, an admin
    except Exception:  # noqa: BLE001 - an unknown key or a database outage: the redacted answer
        return False


def _redacted(checks: dict[str, str]) -> dict[str, str]:
    """`/readyz` checks as a non-admin sees them: each component ok or not, served models as one."""
    out = {name: "ok" if value == "ok" else "not ok" for name, value in checks.items() if not name.startswith("model")}
    models = [value for name, value in checks.items() if name.startswith("model")]
    if models:
        out["models"] = "ok" if all(v == "ok" for v in models) else "not ok"
    return out


class _BodyTooLarge(Exception):
    """A streamed request body passed its limit (raised from `receive`, caught by `BodySizeLimit`)."""

    def __init__(self, more: bool) -> None:
        super().__init__("request body too large")
        self.more = more


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with an OpenAI-style 413 error.

    A declared Content-Length is checked at once; a chunked body is read up to the limit first.
    Model file uploads (`UPLOAD_PATHS`) stream through unbuffered, counted as they arrive: a
    declared length is held to `max_upload_bytes` at once, a chunked one (no Content-Length) the
    moment it passes it (the handler's read fails, the partial file is discarded, the answer is 413).
    """

    def __init__(self, app, max_bytes: int, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:  # noqa: ANN001 - an ASGI app
        self.app, self.max_bytes, self.max_upload_bytes = app, max_bytes, max_upload_bytes

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        files = scope["path"] == FILES_PATH
        upload = files or UPLOAD_PATHS.match(scope["path"]) is not None
        limit = min(self.max_upload_bytes, FILES_MAX_BODY) if files else self.max_upload_bytes if upload else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(receive, send, limit)
        if declared is not None:
            return await self.app(scope, receive, send)
        if upload:
            return await self._counted(scope, receive, send, limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._refuse(receive, send, limit, more=bool(message.get("more_body")))
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

    async def _counted(self, scope, receive, send, limit: int) -> None:  # noqa: ANN001
        """Stream a chunked upload to the app, answering 413 instead of the app once more than `limit` bytes arrived.

        Reading past the limit raises in the app (FastAPI turns a failed form parse into a 400, a
        route reading the stream fails with it); whatever the app answers after that is dropped.
        """
        received, started = 0, False
        tripped: _BodyTooLarge | None = None

        async def counting():  # noqa: ANN202
            nonlocal received, tripped
            if tripped is not None:
                raise tripped
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    tripped = _BodyTooLarge(bool(message.get("more_body")))
                    raise tripped
            return message

        async def tracking(message):  # noqa: ANN001, ANN202
            nonlocal started
            if tripped is not None and not started:
                return  # the app's answer to a body cut short: the 413 replaces it
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, tracking)
        except Exception:
            if tripped is None or started:
                raise
        if tripped is not None and not started:
            await self._refuse(receive, send, limit, more=tripped.more)

    async def _refuse(self, receive, send, limit: int, more: bool = True) -> None:  # noqa: ANN001
        # read the rest and discard it: a client still sending when the socket closes sees a reset, not the 413
        drained = 0
        while more and drained < 16 * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = json.dumps(
            error_body(f"request body is larger than {limit} bytes", "invalid_request_error", code="request_too_large")
        ).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class RequestTelemetry:
    """ASGI middleware: a request id per request (`X-Request-Id`, see `lmaas.ops.logs`), metrics, and one access log line.

    The route handlers leave `lmaas_model` / `lmaas_version` in the request state once they know
    which served model a request is for; a 429's tenant comes from the authenticated principal.
    A generation's time to first token runs from here to its first token reaching the gateway (`FIRST_TOKEN`).
    """

    def __init__(self, app, metrics: Any = None, echo_request_id: bool = True) -> None:  # noqa: ANN001 - an ASGI app
        self.app, self.metrics, self.echo = app, metrics, echo_request_id

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        sent = next((v.decode("latin-1") for k, v in scope["headers"] if k == REQUEST_ID_HEADER.encode()), None)
        request_id = request_id_from(sent)
        token = REQUEST_ID.set(request_id)
        first_token: list[float] = []
        first_token_var = FIRST_TOKEN.set(first_token)
        status = 500

        async def watch(message) -> None:  # noqa: ANN001
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.echo:
                    message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            REQUEST_ID.reset(token)
            FIRST_TOKEN.reset(first_token_var)
            self._record(scope, status, time.perf_counter() - started, request_id, first_token[0] - started if first_token else None)

    def _record(self, scope, status: int, seconds: float, request_id: str, ttft_s: float | None) -> None:  # noqa: ANN001
        state = scope.get("state") or {}
        model, version = state.get("lmaas_model", ""), state.get("lmaas_version", "")
        route = scope["path"] if scope["path"] in ROUTES else "other"
        principal = state.get("principal")
        tenant = getattr(principal, "tenant", None) or ""
        if self.metrics is not None and route not in ("/healthz", "/readyz"):
            self.metrics.request(model=model, version=version, route=route, status=status, seconds=seconds, ttft_s=ttft_s)
            if status == 429:
                self.metrics.quota_rejection(tenant or "unknown")
        if route not in ("/healthz", "/readyz"):
            access_log.info(
                "%s %s %d", scope["method"], scope["path"], status,
                extra={"request_id": request_id, "status": status, "duration_s": round(seconds, 4), "model": model, "tenant": tenant},
            )
