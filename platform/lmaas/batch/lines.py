"""One input line of a batch -> one output line, in OpenAI's batch formats; no Ray here.

Input, one request per line (the files API's `batch` purpose, `registry.files`):

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...], "max_tokens": 16}}

Output, one line per non-blank input line, in no particular order (match them by `custom_id`):

    {"id": "batch_req_...", "custom_id": "r1", "response": {"status_code": 200, "request_id": "chatcmpl-...", "body": {...}}, "error": null}

`body` is the JSON the online API (`/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`) answers that request
with. A request the API would refuse keeps OpenAI's shape too: `status_code` is the API's (400, 404, 500) and `body`
its error object, `{"error": {"message", "type", "param", "code"}}`. A line that is no request at all (not JSON, no
`custom_id`, an unknown `url`, ...) gets `"response": null` and `"error": {"code", "message", "param", "line"}`, with
its line number in the input; the other lines go on either way. A `custom_id` is echoed as given: one used twice in
a file is not caught here (that would take memory growing with the file; the files API refuses such an upload).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from lmaas.errors import InvalidInputError, LmaasError
from lmaas.registry.files import BATCH_URLS, MAX_LINE_BYTES, _BatchLines
from lmaas.serve.errors import error_body, error_response, validation_message
from lmaas.serve.openai_api import OpenAIServing
from lmaas.serve.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)

ROUTES: dict[str, tuple[type[BaseModel], str]] = {
    "/v1/completions": (CompletionRequest, "create_completion"),
    "/v1/chat/completions": (ChatCompletionRequest, "create_chat_completion"),
    "/v1/embeddings": (EmbeddingRequest, "create_embedding"),
}
"""Each batch `url`: its request model and the `OpenAIServing` method that answers it."""
assert set(ROUTES) == set(BATCH_URLS)
LINE_FIELDS = ("custom_id", "method", "url", "body")


# ---- lines of bytes ----


def split_lines(chunks: Iterable[bytes], max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[bytes | None, int]]:
    """The lines of a byte stream, as (content without its newline, bytes it took with its newline).

    A line longer than `max_line_bytes` comes as (None, its size), and no more than `max_line_bytes` of it is ever
    held, so a stream of any size passes in bounded memory. The last line needs no newline.
    """
    pending = bytearray()
    dropped = -1  # >= 0: bytes of an over-long line skipped so far
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if dropped >= 0:
                dropped += len(piece)
            else:
                pending += piece
                if len(pending) > max_line_bytes:
                    dropped, pending = len(pending), bytearray()
            if end < 0:
                break
            if dropped >= 0:
                yield None, dropped + 1
                dropped = -1
            else:
                yield bytes(pending), len(pending) + 1
                pending.clear()
            start = end + 1
    if dropped >= 0:
        yield None, dropped
    elif pending:
        yield bytes(pending), len(pending)


def is_blank(raw: bytes | None) -> bool:
    """Blank lines are skipped (as the files API does): they get no output line."""
    return raw is not None and not raw.strip()


def decode_line(raw: bytes | None, line: int, max_line_bytes: int = MAX_LINE_BYTES) -> tuple[str | None, str | None]:
    """(text, problem) of one raw line: its text, or why it has none (too long, not UTF-8)."""
    if raw is None:
        return None, f"line {line} is longer than {max_line_bytes:,} bytes"
    try:
        return raw.decode("utf-8").removesuffix("\r"), None
    except UnicodeDecodeError as exc:
        return None, f"line {line} is not UTF-8 text (bad byte at offset {exc.start})"


# ---- answers ----


@dataclass(frozen=True)
class Answer:
    """The output line of one input line, and what the driver counts of it."""

    json: str
    """The output line (no newline)."""
    ok: bool
    """Answered with status 200."""
    custom_id: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RequestLimiter:
    """Engine requests in flight in one actor, at most `limit` (a line's weight: its prompts times `n`).

    Keeps an engine's waiting queue (lmaas's engine refuses past 1,024) from overflowing when a block's lines carry
    many prompts or choices; a line heavier than `limit` runs alone.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, weight: int) -> AsyncIterator[None]:
        weight = min(max(1, weight), self.limit)
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + weight <= self.limit)
            self.used += weight
        try:
            yield
        finally:
            async with self._changed:
                self.used -= weight
                self._changed.notify_all()


async def answer_line(
    text: str | None, line: int, serving: OpenAIServing, models: tuple[str, ...], limiter: RequestLimiter, *, problem: str | None = None
) -> Answer:
    """Answer one input line as the online API would answer its request.

    Args:
        text: the line (None when `problem` says why there is none).
        line: its line number in the input (for error lines).
        serving: the endpoints' logic over this batch's engine.
        models: the names a body's `model` may give (the batch's reference first, which a body without one gets).
        limiter: this actor's engine requests in flight.
        problem: why the line could not be read (too long, not UTF-8).

    Returns:
        Its output line; never raises for anything a line holds (an engine failure is a 500 answer).
    """
    if problem is not None:
        return line_error(line, None, "invalid_line", problem)
    try:
        obj = json.loads(text or "")
    except ValueError as exc:
        return line_error(line, None, "invalid_json", f"line {line} is not valid JSON ({exc.msg})")
    if not isinstance(obj, dict):
        return line_error(line, None, "invalid_request", f"line {line} must be {_BatchLines.what}")
    custom_id = obj.get("custom_id") if isinstance(obj.get("custom_id"), str) else None
    wrong = _BatchLines().check(obj)  # the files API's own check of a batch line (a fresh one: ids are not tracked here)
    if wrong:
        field = wrong.split(" ", 1)[0]
        return line_error(line, custom_id, "invalid_request", f"line {line}: {wrong}", param=field if field in LINE_FIELDS else None)
    status, body = await _respond(obj["url"], obj["body"], serving, models, limiter)
    usage = (body.get("usage") or {}) if status == 200 else {}
    response = {"status_code": status, "request_id": body.get("id") or _new_id("req_"), "body": body}
    return Answer(_dump({"id": _new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": None}), status == 200,
                  custom_id, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def line_error(line: int, custom_id: str | None, code: str, message: str, *, param: str | None = None) -> Answer:
    """The output line of an input line that is no request."""
    error = {"code": code, "message": message, "param": param, "line": line}
    return Answer(_dump({"id": _new_id("batch_req_"), "custom_id": custom_id, "response": None, "error": error}), False, custom_id)


async def _respond(url: str, body: dict[str, Any], serving: OpenAIServing, models: tuple[str, ...], limiter: RequestLimiter) -> tuple[int, dict]:
    """(status, JSON body) the online API answers `body` on `url` with."""
    model_class, method = ROUTES[url]
    try:
        if body.get("model") is None:
            body = {**body, "model": models[0]}
        request = model_class.model_validate(body)
        if request.model not in models:
            raise InvalidInputError(f"model {request.model!r} is not this batch's model {models[0]!r}; a batch runs one model "
                                    "(leave model out of the body, or give the batch's)", param="model")
        if getattr(request, "stream", False):
            raise InvalidInputError("stream: a batch answers each request whole; leave stream out", param="stream")
        async with limiter.hold(_weight(request)):
            response = await getattr(serving, method)(request)
        return 200, response.model_dump(mode="json", by_alias=True)
    except ValidationError as exc:  # what the API's handler answers a body its schema refuses (serve.errors)
        message, param = validation_message(exc.errors())
        return 400, error_body(message, "invalid_request_error", param=param, code="invalid_input")
    except LmaasError as exc:
        refused = error_response(exc)
        return refused.status_code, json.loads(refused.body)
    except Exception as exc:  # noqa: BLE001 - an engine failure answers this line (500), the others go on
        return 500, error_body(f"generation failed: {type(exc).__name__}: {exc}", "internal_error")


def _weight(request: BaseModel) -> int:
    if isinstance(request, CompletionRequest):
        return len(request.prompts()) * request.n
    return getattr(request, "n", 1)


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _dump(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
