"""Auth on the HTTP apps: FastAPI dependencies over `lmaas.auth.Auth` (kept on `app.state.auth`).

Every /v1 and /api/v1 route depends on one of these; `/healthz` and `/openapi.json` do not. With
`app.state.auth = None` (an app built without auth) every caller is `Principal.unrestricted()`.

- 401 (`invalid_api_key`): no key, a malformed header, or an unknown, expired or revoked key;
- 403 (`insufficient_scope`): a valid key without the route's scope;
- 404: another tenant's private model (the same answer as for a model that does not exist);
- 429 with `Retry-After`: a rate limit or token quota of the key or its tenant is exhausted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from lmaas import db
from lmaas.auth import ADMIN, ADMIN_KEY_ENV, INFERENCE, MODELS_READ, MODELS_WRITE, Auth, AuthConfig, Principal
from lmaas.errors import PermissionDeniedError

log = logging.getLogger("lmaas.serve")

READ_METHODS = ("GET", "HEAD", "OPTIONS")


def get_auth(request: Request) -> Auth | None:
    return getattr(request.app.state, "auth", None)


def authenticate(request: Request) -> Principal:
    """The caller (401 without a valid key); stored on `request.state.principal` for handlers."""
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    auth = get_auth(request)
    principal = Principal.unrestricted() if auth is None else auth.authenticate(request.headers.get("authorization"))
    request.state.principal = principal
    return principal


async def authenticate_async(request: Request) -> Principal:
    """`authenticate` for the inference routes: a key in this replica's cache costs no thread hop;
    only a cache miss reads the database, in a worker thread."""
    auth = get_auth(request)
    if auth is not None and getattr(request.state, "principal", None) is None:
        header = request.headers.get("authorization")
        request.state.principal = auth.authenticate_cached(header) or await asyncio.to_thread(auth.authenticate, header)
    return authenticate(request)


def require(scope: str):  # noqa: ANN201 - a FastAPI dependency
    """A dependency that admits only keys holding `scope` (or `admin`)."""

    def dependency(principal: Principal = Depends(authenticate)) -> Principal:
        if not principal.has(scope):
            raise PermissionDeniedError(f"this API key lacks the {scope!r} scope", param="authorization")
        return principal

    return Depends(dependency)


def registry_access(request: Request, principal: Principal = Depends(authenticate)) -> Principal:
    """Registry routes: reading needs `models:read`, changing needs `models:write`."""
    scope = MODELS_READ if request.method in READ_METHODS else MODELS_WRITE
    if not principal.has(scope):
        raise PermissionDeniedError(f"this API key lacks the {scope!r} scope", param="authorization")
    return principal


def admin_only(principal: Principal = Depends(authenticate)) -> Principal:
    if not principal.is_admin:
        raise PermissionDeniedError(f"this needs an API key with the {ADMIN!r} scope", param="authorization")
    return principal


async def inference_access(request: Request, principal: Principal = Depends(authenticate_async)) -> Principal:
    """Inference routes: `inference` scope; each POST counts against the key's and tenant's limits (429)."""
    if not principal.has(INFERENCE):
        raise PermissionDeniedError(f"this API key lacks the {INFERENCE!r} scope", param="authorization")
    auth = get_auth(request)
    if auth is not None and request.method not in READ_METHODS and not principal.anonymous and principal.metered():
        await asyncio.to_thread(auth.quotas.admit, principal)
    return principal


def build_auth(config: AuthConfig | None, settings: Any = None) -> Auth | None:
    """The `Auth` of an app from its config (None when disabled), bootstrapping an admin key if asked.

    A generated admin key never goes to a log (a replica's output lands in the Ray logs, which the
    dashboard shows): it is written to `$LMAAS_HOME/admin-key` on the replica's node, readable by
    its user only, and the log says where. `LMAAS_ADMIN_KEY` installs a known one instead.
    """
    if config is None or not config.enabled:
        return None
    from lmaas.config import load_settings

    settings = settings or load_settings()
    auth = Auth.from_settings(settings, config)
    if config.bootstrap:
        secret = auth.keys.bootstrap(secret=os.environ.get(ADMIN_KEY_ENV) or None)
        if secret:
            path = write_secret_file(Path(settings.home) / ADMIN_KEY_FILE, secret)
            message = f"lmaas: created tenant 'default' and its admin API key; it is in {path} on this node (mode 600), shown nowhere else"
            log.warning(message)
            print(message, file=sys.stderr, flush=True)
    return auth


ADMIN_KEY_FILE = "admin-key"


def write_secret_file(path: Path, secret: str) -> Path:
    """Write `secret` to `path`, created readable and writable by this user only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    os.chmod(path, 0o600)
    return path


class AuditFailures:
    """ASGI middleware: record refused or failed changes (non-GET /api/v1 requests answered 4xx/5xx) in the audit log.

    Successful changes are recorded by the code that makes them, in the same transaction; this adds
    the attempts that did not go through. Unauthenticated requests (401) are not recorded, so a
    flood of bad keys cannot fill the log.
    """

    def __init__(self, app, get_engine) -> None:  # noqa: ANN001 - an ASGI app, () -> Engine | None
        self.app, self.get_engine = app, get_engine

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or scope["method"] in READ_METHODS or not scope["path"].startswith("/api/v1/"):
            return await self.app(scope, receive, send)
        status = 500

        async def watch(message) -> None:  # noqa: ANN001
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            principal = scope.get("state", {}).get("principal")
            engine = self.get_engine()
            # a 503 is the database (or store) being down: there is nowhere to record it
            if status >= 400 and status != 503 and engine is not None and principal is not None and not principal.anonymous:
                outcome = "denied" if status in (403, 404, 429) else "error"
                try:
                    await run_in_threadpool(
                        db.record_event, engine, actor=principal.actor, action=f"http.{scope['method'].lower()}",
                        target=scope["path"][:500], outcome=outcome, tenant=principal.tenant, detail={"status": status, "at": time.time()},
                    )
                except Exception as exc:  # noqa: BLE001 - the answer is sent; a lost audit row must not raise past it
                    log.warning("cannot record the failed %s %s in the audit log: %s", scope["method"], scope["path"], exc)
