"""The one place API errors are shaped: `LmaasError` and bad requests -> OpenAI-style JSON or a gRPC status.

Every HTTP error body is `{"error": {"message", "type", "param", "code"}}` with the exception's
4xx/5xx status, as OpenAI's API does, so clients need to handle one shape. The gRPC API sends the
same message with the status code that matches the HTTP status (`grpc_status`).

A lost database connection (the server restarting, the network gone) is a 503 with `Retry-After`
here too, whichever route hit it: the database layer raises SQLAlchemy's errors and
`db.unavailable` tells a connection failure from a bug. The engine's `pool_pre_ping` replaces dead
pooled connections, so requests succeed again once the database is back, without a restart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import logging

import grpc
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmaas import db
from lmaas.errors import AuthenticationError, LmaasError, RateLimitError

log = logging.getLogger("lmaas.serve")
RETRY_AFTER_S = 5
"""What a 503 tells clients to wait before trying again."""

_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI-style error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _code(exc: LmaasError) -> str:
    if exc.code:
        return exc.code
    # NotFoundError -> "not_found"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__.removesuffix("Error")).lower()


def validation_message(errors: Sequence[dict], skip: int = 0) -> tuple[str, str | None]:
    """(message, param) of the first pydantic validation error; `skip` drops leading `loc` parts ("body")."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first.get("loc", ())[skip:]) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an error: the code that matches its HTTP status, else INTERNAL."""
    if isinstance(exc, sa.exc.SQLAlchemyError):
        exc = db.unavailable(exc) or exc
    if isinstance(exc, LmaasError):
        return _GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message
    return grpc.StatusCode.INTERNAL, f"request failed: {type(exc).__name__}: {exc}"


def error_response(exc: LmaasError) -> JSONResponse:
    """The JSON response of a project error, with `Retry-After` on 429 and 503 and `WWW-Authenticate` on 401."""
    headers = {}
    if isinstance(exc, RateLimitError):
        headers["Retry-After"] = str(exc.retry_after)
    elif exc.status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    elif isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc.message, exc.type, param=exc.param, code=_code(exc)), status_code=exc.status, headers=headers)


ERROR_RESPONSES = {
    400: "Invalid input: `error.param` names the field.",
    401: "Missing, malformed, unknown, expired or revoked API key.",
    403: "The API key lacks the scope this route needs.",
    404: "No such resource (or another tenant's private one).",
    409: "The request conflicts with the current state (a name or upload that exists).",
    413: "The request body is larger than the gateway's limit.",
    429: "A rate limit or token quota is exhausted; see the `Retry-After` header.",
    503: "A dependency (the database) is unreachable; retry after the `Retry-After` header.",
}
"""Error answers every `/v1` and `/api/v1` route may give, all with the body of `ERROR_SCHEMA`."""

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "the request field at fault, if one is"},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}


def document_errors(app: FastAPI) -> None:
    """Describe the error answers in `app`'s OpenAPI document as they are sent.

    FastAPI documents a 422 with its own body for every route that takes input; these apps answer bad
    input with 400 and the OpenAI-style body instead, plus the auth, size and quota errors above.
    """
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ErrorResponse"] = ERROR_SCHEMA
        error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path, operations in schema.get("paths", {}).items():
            if not path.startswith(("/v1/", "/api/v1/")):
                continue
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status, description in ERROR_RESPONSES.items():
                    responses.setdefault(str(status), {"description": description, "content": error_ref})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    """Map project errors, database outages, request validation errors and HTTP errors to OpenAI-style JSON (and document them)."""
    document_errors(app)

    @app.exception_handler(LmaasError)
    async def _lmaas_error(_request: Request, exc: LmaasError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(sa.exc.SQLAlchemyError)
    async def _database_error(request: Request, exc: sa.exc.SQLAlchemyError) -> JSONResponse:
        down = db.unavailable(exc)
        if down is not None:
            log.warning("%s %s: %s", request.method, request.url.path, down.message)
            return error_response(down)
        log.error("%s %s: database error", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(f"database error: {type(exc).__name__}", "internal_error", code="database_error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors(), skip=1)
        return JSONResponse(error_body(message, "invalid_request_error", param=param, code="invalid_input"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_, code=str(exc.status_code)), status_code=exc.status_code)
