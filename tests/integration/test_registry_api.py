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
    assert client.get("/api/v1/models").json()["data"][0]["aliases"] == client.get("/api/v1/models/tiny").json()["aliases"] == {"production": 1}
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


# -- two-step (presigned-style) upload ------------------------------------------------------
def declare(src: Path) -> list[dict]:
    return [
        {"path": p.relative_to(src).as_posix(), "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(src.rglob("*"))
        if p.is_file()
    ]


def begin(client: httpx.Client, name: str, src: Path) -> dict:
    r = client.post(f"/api/v1/models/{name}/uploads", json={"files": declare(src)})
    assert r.status_code == 201, r.text
    return r.json()


def test_two_step_upload_commits_a_version_that_downloads_and_verifies(api, tmp_path: Path):
    client, registry = api
    src = make_model_dir(tmp_path / "src")
    (src / "sub").mkdir()
    (src / "sub" / "tokenizer.json").write_text("{}")
    upload_ = begin(client, "tiny", src)
    assert upload_["object"] == "model.upload" and len(upload_["files"]) == 4
    assert registry.list_models() == []  # nothing visible before commit
    for target in upload_["files"]:
        data = (src / target["path"]).read_bytes()
        # chunked transfer encoding, as a client streaming a large file sends it
        r = client.put(target["url"], content=iter([data[i : i + 100] for i in range(0, len(data), 100)]))
        assert r.status_code == 200, r.text
        assert r.json()["sha256"] == target["sha256"]
    r = client.post(upload_["commit_url"], json={"task": "causal-lm", "dataset": "wiki:1", "metrics": {"loss": 1.5}})
    assert r.status_code == 201, r.text
    version = r.json()
    assert version["ref"] == "tiny:1" and version["dataset"] == "wiki:1" and version["metrics"] == {"loss": 1.5}
    assert {f["path"]: f["sha256"] for f in version["files"]} == {f["path"]: f["sha256"] for f in declare(src)}
    registry.download("tiny:1", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert client.get("/api/v1/models/tiny/versions/1/files/sub/tokenizer.json").content == b"{}"
    # committing twice is a conflict; so is aborting or writing to a committed upload
    assert_error(client.post(upload_["commit_url"], json={"task": "causal-lm"}), 409, "conflict_error", "already committed")
    assert_error(client.delete(f"/api/v1/uploads/{upload_['id']}"), 409, "conflict_error")
    assert_error(client.put(upload_["files"][0]["url"], content=b"x"), 409, "conflict_error")
    # the next two-step upload gets the next number, the same way a multipart upload does
    big = make_model_dir(tmp_path / "big", seed=1, size=250)  # about 2 MB: many body chunks
    second = begin(client, "tiny", big)
    for target in second["files"]:
        assert client.put(target["url"], content=(big / target["path"]).read_bytes()).status_code == 200
    assert client.post(second["commit_url"], json={"task": "causal-lm", "parent": "tiny:1"}).json()["ref"] == "tiny:2"
    assert client.get("/api/v1/models/tiny/versions/2/files/model.safetensors").content == (big / "model.safetensors").read_bytes()
    assert registry.gc(grace_seconds=0) == []
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/uploads/{upload_id}/commit" in paths


def test_two_step_upload_refuses_bad_files(api, tmp_path: Path):
    client, registry = api
    src = make_model_dir(tmp_path / "src")
    upload_ = begin(client, "tiny", src)
    urls = {t["path"]: t["url"] for t in upload_["files"]}
    weights = (src / "model.safetensors").read_bytes()
    # hash mismatch (same size) and size mismatch: 400 naming the file, nothing kept
    tampered = bytearray(weights)
    tampered[-1] ^= 1
    error = assert_error(client.put(urls["model.safetensors"], content=bytes(tampered)), 400, "invalid_request_error", "model.safetensors", "sha256")
    assert error["param"] == "sha256"
    assert_error(client.put(urls["model.safetensors"], content=weights + b"x"), 400, "invalid_request_error", "model.safetensors")
    assert_error(client.put(urls["config.json"], content=b"{}"), 400, "invalid_request_error", "config.json")
    assert_error(client.put(urls["config.json"], content=b"x" * (3 << 20)), 400, "invalid_request_error", "config.json", "more than")
    # a file never declared, and a missing file at commit
    assert_error(client.put(f"/api/v1/uploads/{upload_['id']}/files/extra.json", content=b"{}"), 400, "invalid_request_error", "extra.json")
    assert client.put(urls["config.json"], content=(src / "config.json").read_bytes()).status_code == 200
    assert client.put(urls["tokenizer.json"], content=(src / "tokenizer.json").read_bytes()).status_code == 200
    assert_error(client.post(upload_["commit_url"], json={"task": "causal-lm"}), 400, "invalid_request_error", "model.safetensors", "never uploaded")
    # a bad task leaves the upload open: fix it and commit
    assert client.put(urls["model.safetensors"], content=weights).status_code == 200
    assert_error(client.post(upload_["commit_url"], json={"task": "painting"}), 400, "invalid_request_error", "unknown task")
    assert_error(client.post(upload_["commit_url"], json={"task": "causal-lm", "parent": "nope:1"}), 404, "not_found_error")
    assert client.post(upload_["commit_url"], json={"task": "causal-lm"}).json()["ref"] == "tiny:1"
    # refused at declaration: traversal, pickle weights, a fake safetensors file once it lands
    digest = "0" * 64
    for bad in ("../x.json", "/etc/passwd", "a/../../x", "_manifest.json"):
        r = client.post("/api/v1/models/tiny/uploads", json={"files": [{"path": bad, "size": 2, "sha256": digest}]})
        assert_error(r, 400, "invalid_request_error", "invalid file path")
    r = client.post("/api/v1/models/tiny/uploads", json={"files": [{"path": "pytorch_model.bin", "size": 2, "sha256": digest}]})
    assert_error(r, 400, "invalid_request_error", "pytorch_model.bin", "pickle")
    assert_error(client.post("/api/v1/models/Bad_Name/uploads", json={"files": declare(src)}), 400, "invalid_request_error", "invalid model name")
    assert_error(client.post("/api/v1/models/tiny/uploads", json={"files": []}), 400, "invalid_request_error")
    fake = b"not safetensors at all"
    r = client.post("/api/v1/models/tiny/uploads", json={"files": [{"path": "model.safetensors", "size": len(fake), "sha256": hashlib.sha256(fake).hexdigest()}]})
    bad_upload = r.json()
    assert_error(client.put(bad_upload["files"][0]["url"], content=fake), 400, "invalid_request_error", "not a safetensors file")
    # traversal in the PUT url itself never escapes the upload
    r = client.put(f"/api/v1/uploads/{upload_['id']}/files/..%2F..%2Fx", content=b"{}")
    assert r.status_code in (400, 404, 409), r.text
    assert not (Path(registry.storage.uri.removeprefix("file://")) / "x").exists()
    # unknown upload ids
    for unknown in ("0" * 32, "nope"):
        assert_error(client.put(f"/api/v1/uploads/{unknown}/files/config.json", content=b"{}"), 404, "not_found_error")
        assert_error(client.post(f"/api/v1/uploads/{unknown}/commit", json={"task": "causal-lm"}), 404, "not_found_error")
        assert_error(client.delete(f"/api/v1/uploads/{unknown}"), 404, "not_found_error")
    assert [v["version"] for v in client.get("/api/v1/models/tiny/versions").json()["data"]] == [1]


def test_two_step_upload_abort_and_gc(api, tmp_path: Path):
    client, registry = api
    src = make_model_dir(tmp_path / "src")
    store = Path(registry.storage.uri.removeprefix("file://"))
    aborted = begin(client, "tiny", src)
    assert client.put(aborted["files"][0]["url"], content=(src / aborted["files"][0]["path"]).read_bytes()).status_code == 200
    r = client.delete(f"/api/v1/uploads/{aborted['id']}")
    assert r.status_code == 200 and r.json() == {"object": "model.upload", "id": aborted["id"], "deleted": True}
    assert not (store / "models" / "tiny" / aborted["id"]).exists()
    assert_error(client.post(aborted["commit_url"], json={"task": "causal-lm"}), 404, "not_found_error")
    # an upload left unfinished is kept during the grace period, then collected
    left = begin(client, "tiny", src)
    assert client.put(left["files"][0]["url"], content=(src / left["files"][0]["path"]).read_bytes()).status_code == 200
    assert registry.gc(grace_seconds=3600) == []
    assert registry.gc(grace_seconds=0) == [f"models/tiny/{left['id']}"]
    assert not (store / "models" / "tiny" / left["id"]).exists()
    assert_error(client.post(left["commit_url"], json={"task": "causal-lm"}), 404, "not_found_error")
