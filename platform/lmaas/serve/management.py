"""The management HTTP app: registry, auth and job REST APIs (`/api/v1/...`), the files API (`/v1/files`), fine-tuning and batches (`/v1/fine_tuning/jobs`, `/v1/batches`), the web console (`/console`), `/healthz`, `/readyz`, `/openapi.json`.

Its routes ride on the gateway Serve app (one port for `/v1` and `/api/v1`, plus `/api/v1/deployments`
there) and it runs standalone for tests and small setups:

    lmaas models serve-api --port 8080
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

import lmaas
from lmaas.auth import Auth
from lmaas.registry import ModelRegistry
from lmaas.registry.files import FileStore
from lmaas.serve.auth import AuditFailures
from lmaas.serve.console import add_console
from lmaas.serve.errors import install_error_handlers
from lmaas.serve.openai_app import MAX_BODY_BYTES, MAX_UPLOAD_BYTES, BodySizeLimit, readiness_response
from lmaas.serve.routers import auth as auth_router
from lmaas.serve.routers import batches as batches_router
from lmaas.serve.routers import files as files_router
from lmaas.serve.routers import fine_tuning as fine_tuning_router
from lmaas.serve.routers import jobs as jobs_router
from lmaas.serve.routers import registry as registry_router


def build_app(
    registry: ModelRegistry, *, auth: Auth | None = None, max_body_bytes: int = MAX_BODY_BYTES, max_upload_bytes: int = MAX_UPLOAD_BYTES
) -> FastAPI:
    """A FastAPI app serving `registry` (and, with `auth`, keys, tenants, usage, audit, feedback) under `/api/v1/`.

    Args:
        registry: the model registry.
        auth: require API keys with scopes and enforce tenants (see `lmaas.serve.auth`);
            None: open to every caller, as an admin (tests, a trusted network).
        max_body_bytes, max_upload_bytes: larger bodies (model file uploads) get 413, as on the gateway.
    """
    app = FastAPI(title="lmaas management API", version=lmaas.__version__)
    install_error_handlers(app)
    add_management_routes(app, registry, auth=auth)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the app answers (whether or not the database does)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: 200 when the database and the artifact store answer; else 503 (naming the problem to admins only)."""
        from lmaas.ops.health import database_and_storage

        ready, checks = await run_in_threadpool(database_and_storage, registry.engine, registry.storage)
        return await readiness_response(request, ready, checks)

    return app


def add_management_routes(app: FastAPI, registry: ModelRegistry | None, *, auth: Auth | None = None, deployments: Any = None) -> None:
    """Add the `/api/v1/` routers (registry, auth, jobs) and the web console over them (`/console`) to `app`
    (the standalone app above, or the gateway's inference app).

    Args:
        registry: the model registry (None: the one of this process's settings).
        deployments: a `serve.control.DeploymentControl` (the gateway has one): adds `/api/v1/deployments`.
    """
    if registry is None:
        from lmaas.config import load_settings

        registry = ModelRegistry.from_settings(load_settings())
    app.state.registry = registry
    app.state.auth = auth
    app.state.files = FileStore(registry.storage, registry.engine)
    app.include_router(registry_router.router)
    app.include_router(files_router.router)
    app.include_router(fine_tuning_router.router)
    app.include_router(batches_router.router)
    app.include_router(auth_router.router)
    app.include_router(jobs_router.router)
    if deployments is not None:
        from lmaas.serve.routers import deployments as deployments_router

        app.state.deployments = deployments
        app.include_router(deployments_router.router)
    add_console(app)
    app.add_middleware(AuditFailures, get_engine=lambda: auth.engine if auth is not None else None)
