"""The registry REST API: a real uvicorn server on 127.0.0.1, talked to with httpx."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path

import httpx
import pytest

from lmaas import db
from lmaas.registry import ModelRegistry
from lmaas.storage import Storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_port, wait_for  # noqa: E402
from registry_helpers import make_model_dir  # noqa: E402


@pytest.fixture
def api(tmp_path: Path):
    """(httpx client, registry) for a management app served by uvicorn in a thread."""
    import uvicorn

    from lmaas.serve.management import build_app

    registry = ModelRegistry(Storage(f"file://{tmp_path / 'store'}"), db.connect(f"sqlite:///{tmp_path / 'lmaas.db'}"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(registry), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "uvicorn")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield client, registry
    server.should_exit = True
    thread.join(10)


def upload(client: httpx.Client, name: str, src: Path, **form) -> httpx.Response:
    files = [("files", (p.relative_to(src).as_posix(), p.read_bytes())) for p in sorted(src.rglob("*")) if p.is_file()]
    return client.post(f"/api/v1/models/{name}/versions", files=files, data={"task": "causal-lm", **form})


def assert_error(response: httpx.Response, status: int, type_: str, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    for word in words:
        assert word in error["message"], error["message"]
    return error


def test_upload_list_get_download(api, tmp_path: Path):
    client, _ = api
    assert client.get("/healthz").json() == {"status": "ok"}
    src = make_model_dir(tmp_path / "src")
    (src / "sub").mkdir()
    (src / "sub" / "tokenizer.json").write_text("{}")
    digests = {p.relative_to(src).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in src.rglob("*") if p.is_file()}
    r = upload(client, "tiny", src, sha256=json.dumps(digests), dataset="wiki:1", metrics=json.dumps({"loss": 2.0}))
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert v1["ref"] == "tiny:1" and v1["dataset"] == "wiki:1" and v1["metrics"] == {"loss": 2.0}
    assert {f["path"]: f["sha256"] for f in v1["files"]} == digests
    for seed in (1, 2):
        assert upload(client, "tiny", make_model_dir(tmp_path / f"s{seed}", seed=seed), parent="tiny:1").status_code == 201
    assert [m["name"] for m in client.get("/api/v1/models").json()["data"]] == ["tiny"]
    assert client.get("/api/v1/models", params={"search": "zzz"}).json()["data"] == []
    assert client.get("/api/v1/models/tiny").json()["latest_version"] == 3
    page = client.get("/api/v1/models/tiny/versions", params={"limit": 2}).json()
    assert [v["version"] for v in page["data"]] == [3, 2] and page["has_more"] and page["next_offset"] == 2
    page = client.get("/api/v1/models/tiny/versions", params={"limit": 2, "offset": 2}).json()
    assert [v["version"] for v in page["data"]] == [1] and not page["has_more"]
    assert client.get("/api/v1/models/tiny/versions/2").json()["parent"] == "tiny:1"
    r = client.get("/api/v1/models/tiny/versions/1/files/sub/tokenizer.json")
    assert r.status_code == 200 and r.content == b"{}"
    r = client.get("/api/v1/models/tiny/versions/1/files/model.safetensors")
    assert r.content == (src / "model.safetensors").read_bytes()
    assert r.headers["x-sha256"] == digests["model.safetensors"]
    assert client.get("/api/v1/resolve", params={"ref": "tiny"}).json()["version"] == 3
    lineage = client.get("/api/v1/models/tiny/versions/1/lineage").json()
    assert lineage["children"] == ["tiny:2", "tiny:3"] and lineage["dataset"] == "wiki:1"
    assert [v["ref"] for v in client.get("/api/v1/lineage", params={"dataset": "wiki:1"}).json()["data"]] == ["tiny:1"]
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/models/{name}/versions" in paths and "post" in paths["/api/v1/models/{name}/versions"]


def test_aliases_archive_restore_delete(api, tmp_path: Path):
    client, _ = api
    for seed in range(2):
        assert upload(client, "tiny", make_model_dir(tmp_path / f"s{seed}", seed=seed)).status_code == 201
    r = client.put("/api/v1/models/tiny/aliases/production", json={"version": 1})
    assert r.status_code == 200 and r.json()["version"] == 1
    assert client.get("/api/v1/resolve", params={"ref": "tiny"}).json()["version"] == 1
    assert client.get("/api/v1/resolve", params={"ref": "tiny@production"}).json()["version"] == 1
    assert_error(client.delete("/api/v1/models/tiny/versions/1"), 409, "conflict_error", "alias 'production'")
    assert_error(client.post("/api/v1/models/tiny/versions/1/archive"), 409, "conflict_error")
    assert client.post("/api/v1/models/tiny/versions/2/archive").json()["status"] == "archived"
    assert_error(client.put("/api/v1/models/tiny/aliases/canary", json={"version": 2}), 400, "invalid_request_error", "archived")
    assert client.post("/api/v1/models/tiny/versions/2/restore").json()["status"] == "ready"
    assert client.delete("/api/v1/models/tiny/aliases/production").json() == {"object": "model.alias", "id": "tiny@production", "deleted": True}
    assert_error(client.delete("/api/v1/models/tiny/aliases/production"), 404, "not_found_error", "no alias")
    r = client.delete("/api/v1/models/tiny/versions/1")
    assert r.status_code == 200 and r.json()["id"] == "tiny:1"
    assert_error(client.get("/api/v1/models/tiny/versions/1"), 404, "not_found_error", "no version 1")


def test_error_statuses_and_nothing_registered(api, tmp_path: Path):
    client, registry = api
    src = make_model_dir(tmp_path / "src")
    assert upload(client, "tiny", src).status_code == 201
    assert_error(client.get("/api/v1/models/nope"), 404, "not_found_error", "no model named 'nope'")
    assert_error(client.get("/api/v1/models/tiny/versions/9"), 404, "not_found_error", "no version 9")
    assert_error(client.get("/api/v1/resolve", params={"ref": "tiny@staging"}), 404, "not_found_error", "no alias 'staging'")
    assert_error(client.get("/api/v1/resolve", params={"ref": "tiny:x"}), 400, "invalid_request_error", "positive integer")
    assert_error(client.get("/api/v1/models/tiny/versions/abc"), 400, "invalid_request_error")
    assert_error(client.get("/api/v1/models/tiny/versions/1/files/nothere.txt"), 404, "not_found_error")
    # bad uploads: invalid name, hash mismatch, pickle weights, fake safetensors, path traversal, bad task
    assert_error(upload(client, "Bad_Name", src), 400, "invalid_request_error", "invalid model name")
    error = assert_error(upload(client, "tiny", src, sha256=json.dumps({"model.safetensors": "0" * 64})), 400, "invalid_request_error", "sha256")
    assert error["param"] == "sha256"
    pickled = make_model_dir(tmp_path / "pickled")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    assert_error(upload(client, "tiny", pickled), 400, "invalid_request_error", "pytorch_model.bin")
    fake = make_model_dir(tmp_path / "fake")
    (fake / "model.safetensors").write_bytes(b"not safetensors at all")
    assert_error(upload(client, "tiny", fake), 400, "invalid_request_error", "not a safetensors file")
    r = client.post("/api/v1/models/tiny/versions", files=[("files", ("../x", b"{}"))], data={"task": "causal-lm"})
    assert_error(r, 400, "invalid_request_error", "invalid file path")
    assert_error(upload(client, "tiny", src, task="painting"), 400, "invalid_request_error", "unknown task")
    assert_error(client.post("/api/v1/models/tiny/versions", data={"task": "causal-lm"}), 400, "invalid_request_error")
    assert_error(client.put("/api/v1/models/tiny/aliases/production", json={"version": 0}), 400, "invalid_request_error")
    assert_error(client.put("/api/v1/models/tiny/aliases/7", json={"version": 1}), 400, "invalid_request_error", "invalid alias")
    assert [v["version"] for v in client.get("/api/v1/models/tiny/versions").json()["data"]] == [1]
    assert not (Path(registry.storage.uri.removeprefix("file://")) / "x").exists()
    # a tampered file is refused with an integrity error naming it
    version = registry.resolve("tiny:1")
    path = f"{version.prefix}/model.safetensors"
    data = bytearray(registry.storage.read_bytes(path))
    data[-1] ^= 1
    registry.storage.write_bytes(path, bytes(data))
    assert_error(client.get("/api/v1/models/tiny/versions/1/files/model.safetensors"), 500, "integrity_error", "model.safetensors")
