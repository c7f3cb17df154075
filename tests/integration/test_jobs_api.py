"""The job queue over REST (`/api/v1/jobs`): a real uvicorn server with API keys on a real SQLite database.

The app runs standalone without a Ray cluster (as `lmaas models serve-api` does without RAY_ADDRESS):
jobs are queued for the admitter on the cluster, which `tests/e2e/test_job_queue.py` exercises.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_port, wait_for  # noqa: E402

KEYS = {  # name -> (tenant, scopes, secret)
    "admin": ("default", ["admin"], "lmaas_jobsadmin_" + "k" * 40),
    "a": ("a", ["models:read", "models:write"], "lmaas_jobsa_" + "k" * 40),
    "b": ("b", ["models:read", "models:write"], "lmaas_jobsb_" + "k" * 40),
    "reader": ("a", ["models:read"], "lmaas_jobsreader_" + "k" * 40),
}


@pytest.fixture
def api(tmp_path: Path, lmaas_env):
    """name -> httpx client with that key, for a management app served by uvicorn in a thread."""
    import uvicorn

    from lmaas import db
    from lmaas.auth import Auth
    from lmaas.config import load_settings
    from lmaas.ops.queue import ClusterQueue
    from lmaas.registry import ModelRegistry
    from lmaas.serve.management import build_app
    from lmaas.storage import Storage

    engine = db.connect(f"sqlite:///{tmp_path / 'lmaas.db'}")
    registry = ModelRegistry(Storage(f"file://{tmp_path / 'store'}"), engine)
    auth = Auth(engine, registry=registry)
    keys = {name: auth.keys.create_key(tenant, scopes, create_tenant=True, secret=secret)[0] for name, (tenant, scopes, secret) in KEYS.items()}
    app = build_app(registry, auth=auth)
    app.state.jobs = ClusterQueue(load_settings(), engine, lambda: None)  # no Ray cluster in this process, whatever ran before
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "uvicorn")
    clients = {name: httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers={"Authorization": f"Bearer {secret}"})
               for name, (_, _, secret) in KEYS.items()}
    try:
        yield clients, keys
    finally:
        for client in clients.values():
            client.close()
        server.should_exit = True
        thread.join(10)


def assert_error(response: httpx.Response, status: int, param: str | None, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error["message"]


def test_submit_list_get_cancel_over_rest(api):
    clients, keys = api
    a, b, admin, reader = clients["a"], clients["b"], clients["admin"], clients["reader"]

    r = a.post("/api/v1/jobs", json={"config": {"dataset": "wiki", "max_steps": 50}, "priority": "high"})
    assert r.status_code == 201, r.text
    job = r.json()
    assert (job["kind"], job["state"], job["priority"], job["tenant"]) == ("train", "queued", "high", "a")
    assert job["config"]["max_steps"] == 50 and job["resources"]["CPU"] > 0 and job["submission_id"] is None
    other = b.post("/api/v1/jobs", json={"kind": "ingest", "config": {"name": "corpus", "sources": ["stdlib:5"]}}).json()
    command = admin.post("/api/v1/jobs", json={"command": "python eval.py", "cpus": 0.5, "priority": "low", "tenant": "a"}).json()
    assert (command["kind"], command["resources"], command["tenant"]) == ("command", {"CPU": 0.5}, "a")

    # validation: 400 naming the field, nothing queued
    assert_error(a.post("/api/v1/jobs", json={"config": {"dataset": "wiki"}, "priority": "urgent"}), 400, "priority", "high, normal, low")
    assert_error(a.post("/api/v1/jobs", json={"kind": "train", "config": {"dataset": "wiki", "max_steps": 0}}), 400, "config.max_steps")
    assert_error(a.post("/api/v1/jobs", json={"config": {"dataset": "wiki"}, "priorty": "high"}), 400, "priorty")
    assert_error(a.post("/api/v1/jobs", json={"kind": "evaluate", "config": {}}), 400, "kind", "unknown job kind")
    assert_error(a.post("/api/v1/jobs", json={}), 400, "config")
    assert_error(admin.post("/api/v1/jobs", json={"command": "true", "config": {"dataset": "x"}}), 400, "config")
    assert_error(a.get("/api/v1/jobs", params={"state": "stuck"}), 400, "state", "unknown job state")
    assert_error(a.get("/api/v1/jobs/not-a-number"), 400, "job_id")

    # scopes: a command job is admin-only; changing needs models:write; another tenant's submission is refused
    assert_error(a.post("/api/v1/jobs", json={"command": "rm -rf /"}), 403, "authorization", "admin")
    assert_error(reader.post("/api/v1/jobs", json={"config": {"dataset": "wiki"}}), 403, "authorization", "models:write")
    assert_error(reader.post(f"/api/v1/jobs/{job['id']}/cancel"), 403, "authorization")
    assert_error(a.post("/api/v1/jobs", json={"config": {"dataset": "wiki"}, "tenant": "b"}), 403, "tenant")
    assert httpx.get(f"{a.base_url}/api/v1/jobs").status_code == 401

    # tenants see their own jobs; another tenant's is 404 as if it did not exist
    assert [j["id"] for j in a.get("/api/v1/jobs").json()["data"]] == [command["id"], job["id"]]
    assert [j["id"] for j in reader.get("/api/v1/jobs", params={"tenant": "b"}).json()["data"]] == [command["id"], job["id"]]
    assert [j["id"] for j in admin.get("/api/v1/jobs").json()["data"]] == [command["id"], other["id"], job["id"]]
    assert [j["id"] for j in admin.get("/api/v1/jobs", params={"tenant": "b"}).json()["data"]] == [other["id"]]
    assert a.get(f"/api/v1/jobs/{job['id']}").json() == job
    assert_error(b.get(f"/api/v1/jobs/{job['id']}"), 404, "id")
    assert_error(b.post(f"/api/v1/jobs/{job['id']}/cancel"), 404, "id")
    assert_error(b.get(f"/api/v1/jobs/{job['id']}/logs"), 404, "id")
    assert_error(a.get("/api/v1/jobs/99999"), 404, "id")

    # cancel: a queued job never starts; a finished one cannot be cancelled again; no logs before it started
    assert_error(a.get(f"/api/v1/jobs/{job['id']}/logs"), 400, "id", "has not started")
    r = a.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    assert_error(a.post(f"/api/v1/jobs/{job['id']}/cancel"), 400, "id", "already cancelled")
    assert [j["id"] for j in a.get("/api/v1/jobs", params={"state": ["queued", "running"]}).json()["data"]] == [command["id"]]
    assert [j["id"] for j in a.get("/api/v1/jobs", params={"state": "cancelled"}).json()["data"]] == [job["id"]]

    # submit and cancel are audited with the key as actor
    events = admin.get("/api/v1/audit", params={"action": "job.*"}).json()["data"]
    seen = {(e["action"], e["target"], e["actor"]) for e in events}
    assert ("job.submit", f"job:{job['id']}", f"key:{keys['a'].id}") in seen
    assert ("job.submit", f"job:{command['id']}", f"key:{keys['admin'].id}") in seen
    assert ("job.cancel", f"job:{job['id']}", f"key:{keys['a'].id}") in seen
    assert "/api/v1/jobs/{job_id}/cancel" in admin.get("/openapi.json").json()["paths"]
