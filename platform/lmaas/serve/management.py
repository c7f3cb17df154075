"""The management HTTP app: the registry REST API (`/api/v1/...`), `/healthz`, `/openapi.json`.

It is mounted into the gateway Serve app and runs standalone for tests and small setups:

    lmaas models serve-api --port 8080
"""

from __future__ import annotations

from fastapi import FastAPI

import lmaas
from lmaas.registry import ModelRegistry
from lmaas.serve.errors import install_error_handlers
from lmaas.serve.routers import registry as registry_router


def build_app(registry: ModelRegistry) -> FastAPI:
    """A FastAPI app serving `registry` under `/api/v1/`."""
    app = FastAPI(title="lmaas management API", version=lmaas.__version__)
    app.state.registry = registry
    install_error_handlers(app)
    app.include_router(registry_router.router)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
