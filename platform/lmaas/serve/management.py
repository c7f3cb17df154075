"""The management HTTP app: registry and auth REST APIs (`/api/v1/...`), `/healthz`, `/openapi.json`.

It is mounted into the gateway Serve app and runs standalone for tests and small setups:

    lmaas models serve-api --port 8080
"""

from __future__ import annotations

from fastapi import FastAPI

import lmaas
from lmaas.auth import Auth
from lmaas.registry import ModelRegistry
from lmaas.serve.auth import AuditFailures
from lmaas.serve.errors import install_error_handlers
from lmaas.serve.routers import auth as auth_router
from lmaas.serve.routers import registry as registry_router


def build_app(registry: ModelRegistry, *, auth: Auth | None = None) -> FastAPI:
    """A FastAPI app serving `registry` (and, with `auth`, keys, tenants, usage, audit, feedback) under `/api/v1/`.

    Args:
        registry: the model registry.
        auth: require API keys with scopes and enforce tenants (see `lmaas.serve.auth`);
            None: open to every caller, as an admin (tests, a trusted network).
    """
    app = FastAPI(title="lmaas management API", version=lmaas.__version__)
    app.state.registry = registry
    app.state.auth = auth
    install_error_handlers(app)
    app.include_router(registry_router.router)
    app.include_router(auth_router.router)
    app.add_middleware(AuditFailures, get_engine=lambda: auth.engine if auth is not None else None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
