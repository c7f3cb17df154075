"""Two tenants, alice and bob: every attack bob's keys can try on alice's models, datasets and jobs is refused.

The management app (registry and jobs REST API) runs on uvicorn over one SQLite database and a local
artifact store; bob holds `models:read`, `models:write` and `deploy`. After each attack the test
compares alice's state byte for byte: her model rows, versions, aliases, datasets and every stored
file. Queued jobs run through `lmaas.ops.queue.execute` (their Ray job's entrypoint) on the session's
Ray cluster, as bob. Deployment takeovers are tried on a real Serve gateway in `test_canary.py`.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import uvicorn_app  # noqa: E402
from registry_helpers import make_model_dir, publish_unreadable_dataset  # noqa: E402
from serve_helpers import make_causal_lm  # noqa: E402

KEYS = {  # name -> (tenant, scopes, secret)
    "admin": ("default", ["admin"], "lmaas_isoadmin_" + "k" * 40),
    "alice": ("alice", ["models:read", "models:write", "deploy", "inference"], "lmaas_isoalice_" + "k" * 40),
    "bob": ("bob", ["models:read", "models:write", "deploy", "inference"], "lmaas_isobob_" + "k" * 40),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """alice's private `a-secret` (production alias) and public `a-public`, her dataset, and the API over them."""
    from lmaas.auth import Auth
    from lmaas.config import load_settings
    from lmaas.ops.queue import ClusterQueue
    from lmaas.registry import ModelRegistry
    from lmaas.serve.management import build_app

    root = tmp_path_factory.mktemp("iso")
    env = {"LMAAS_HOME": str(root / "home"), "LMAAS_STORAGE": f"file://{root / 'store'}", "LMAAS_DATABASE_URL": f"sqlite:///{root / 'lmaas.db'}"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        settings = load_settings()
        registry = ModelRegistry.from_settings(settings)
        engine = registry.engine
        auth = Auth(engine, registry=registry)
        for name, (tenant, scopes, secret) in KEYS.items():
            auth.keys.create_key(tenant, scopes, create_tenant=True, secret=secret)
        # alice's dataset: not parquet at all, so any job that read it would fail loudly
        publish_unreadable_dataset(registry.storage, engine, root / "alice-data", "a-data", "alice", sources=["/home/alice/corpus"],
                                   content=b"alice's private rows")
        alice = registry.acting_for("alice")
        lm = make_causal_lm(root / "lm", max_seq_len=64)
        alice.register_version("a-secret", lm, task="causal-lm", dataset="a-data:1")
        alice.set_alias("a-secret", "production", 1)
        alice.register_version("a-public", lm, task="causal-lm", dataset="a-data:1")
        registry.set_public("a-public", True)
        app = build_app(registry, auth=auth)
        app.state.jobs = ClusterQueue(settings, engine, lambda: None)  # queued only; test_jobs_run_as_their_tenant runs them
        with uvicorn_app(app) as base:
            clients = {name: httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {secret}"})
                       for name, (_, _, secret) in KEYS.items()}
            try:
                _, inference_key = auth.keys.create_key("alice", ["inference"])
                yield {"registry": registry, "engine": engine, "root": root, "env": env, "settings": settings, "lm": lm,
                       "inference_key": inference_key, **clients}
            finally:
                for client in clients.values():
                    client.close()


def alice_state(world) -> dict:
    """Everything of alice's, as bytes and rows: models, versions, aliases, datasets, uploaded files and stored bytes."""
    from lmaas.db.schema import datasets, model_aliases, model_versions, registered_models
    from lmaas.db.schema import files as files_table

    engine, storage = world["engine"], world["registry"].storage
    with engine.connect() as conn:
        models = conn.execute(sa.select(registered_models).where(registered_models.c.tenant == "alice").order_by(registered_models.c.id)).mappings().all()
        ids = [m["id"] for m in models]
        versions = conn.execute(sa.select(model_versions).where(model_versions.c.model_id.in_(ids)).order_by(model_versions.c.id)).mappings().all()
        aliases = conn.execute(sa.select(model_aliases).where(model_aliases.c.model_id.in_(ids)).order_by(model_aliases.c.alias)).mappings().all()
        data = conn.execute(sa.select(datasets).where(datasets.c.tenant == "alice").order_by(datasets.c.id)).mappings().all()
        uploaded = conn.execute(sa.select(files_table).where(files_table.c.tenant == "alice").order_by(files_table.c.id)).mappings().all()
    files = {}
    for prefix in [v["prefix"] for v in versions] + [f"datasets/{d['name']}/{d['version']}" for d in data] + ["uploads/alice"]:
        for path in storage.list(prefix):
            files[path] = hashlib.sha256(storage.read_bytes(path)).hexdigest()
    rows = [dict(r) for r in [*models, *versions, *aliases, *data, *uploaded]]
    return {"rows": json.loads(json.dumps(rows, default=str)), "files": files}


def error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()["error"]
    if param is not None:
        assert body["param"] == param, body
    return body


def upload(client: httpx.Client, name: str, model_dir: Path, **form: str) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(model_dir.iterdir()) if p.is_file()]
    return client.post(f"/api/v1/models/{name}/versions", files=files, data={"task": "causal-lm", **form})


def test_another_tenants_private_model_looks_missing_and_nothing_of_it_changes(world, tmp_path):
    bob, before = world["bob"], alice_state(world)
    missing = error(bob.get("/api/v1/models/nothing-here"), 404)
    hidden = error(bob.get("/api/v1/models/a-secret"), 404)
    assert hidden["message"].replace("a-secret", "X") == missing["message"].replace("nothing-here", "X")
    for path in ("/api/v1/models/a-secret/versions", "/api/v1/models/a-secret/versions/1", "/api/v1/resolve?ref=a-secret@production",
                 "/api/v1/models/a-secret/versions/1/files/config.json", "/api/v1/models/a-secret/versions/1/lineage"):
        error(bob.get(path), 404)
    assert {m["name"] for m in bob.get("/api/v1/models").json()["data"]} == {"a-public"}

    mine = make_model_dir(tmp_path / "bob-model", seed=7)
    taken = error(upload(bob, "a-secret", mine), 409, "name")  # names are global: taken, and nothing more is said
    assert "alice" not in taken["message"]
    error(upload(bob, "a-public", mine), 403, "name")  # shared read-only
    error(upload(bob, "b-model", mine, parent="a-secret:1"), 404, "parent")
    error(bob.post("/api/v1/models/a-secret/uploads", json={"files": [{"path": "w.safetensors", "size": 1, "sha256": "0" * 64}]}), 409)
    error(bob.put("/api/v1/models/a-secret/aliases/production", json={"version": 1}), 404)
    error(bob.delete("/api/v1/models/a-secret/aliases/production"), 404)
    error(bob.put("/api/v1/models/a-public/aliases/production", json={"version": 1}), 403)
    for action in ("archive", "restore"):
        error(bob.post(f"/api/v1/models/a-secret/versions/1/{action}"), 404)
        error(bob.post(f"/api/v1/models/a-public/versions/1/{action}"), 403)
    error(bob.delete("/api/v1/models/a-secret/versions/1"), 404)
    error(bob.delete("/api/v1/models/a-public/versions/1"), 403)
    error(bob.patch("/api/v1/models/a-public", json={"public": False}), 403)
    assert alice_state(world) == before

    # the same refusals in the library, whatever the caller (a job, a script) passes
    from lmaas.errors import AlreadyExistsError, NotFoundError, PermissionDeniedError

    as_bob = world["registry"].acting_for("bob")
    with pytest.raises(AlreadyExistsError):
        as_bob.register_version("a-secret", mine, task="causal-lm", tenant=None)  # acting for bob overrides an explicit tenant
    with pytest.raises(NotFoundError):
        as_bob.resolve("a-secret")
    with pytest.raises(NotFoundError):
        as_bob.set_alias("a-secret", "production", 1)
    with pytest.raises(PermissionDeniedError):
        as_bob.delete_version("a-public:1")
    with pytest.raises(PermissionDeniedError):
        as_bob.set_public("a-public", False)
    assert alice_state(world) == before


def test_derived_versions_and_uploads_stay_with_their_tenant(world, tmp_path):
    bob, alice = world["bob"], world["alice"]
    # bob may derive from alice's public model: the child is his, and it does not pin alice's version
    r = upload(bob, "b-derived", make_model_dir(tmp_path / "child", seed=3), parent="a-public:1")
    assert r.status_code == 201 and r.json()["tenant"] == "bob", r.text
    lineage = alice.get("/api/v1/models/a-public/versions/1/lineage").json()
    assert lineage["children"] == []  # alice cannot see bob's private child
    assert bob.get("/api/v1/models/a-public/versions/1/lineage").json()["children"] == ["b-derived:1"]

    # bob's open upload is not alice's to fill, commit or abort
    two_step = make_model_dir(tmp_path / "two-step", seed=4)
    declared = two_step / "model.safetensors"
    body = {"files": [{"path": p.name, "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in sorted(two_step.iterdir())]}
    opened = bob.post("/api/v1/models/b-two-step/uploads", json=body)
    assert opened.status_code == 201, opened.text
    upload_id = opened.json()["id"]
    error(alice.put(f"/api/v1/uploads/{upload_id}/files/model.safetensors", content=declared.read_bytes()), 404, "upload_id")
    error(alice.post(f"/api/v1/uploads/{upload_id}/commit", json={"task": "causal-lm"}), 404, "upload_id")
    error(alice.delete(f"/api/v1/uploads/{upload_id}"), 404, "upload_id")
    for p in sorted(two_step.iterdir()):
        assert bob.put(f"/api/v1/uploads/{upload_id}/files/{p.name}", content=p.read_bytes()).status_code == 200
    committed = bob.post(f"/api/v1/uploads/{upload_id}/commit", json={"task": "causal-lm"})
    assert committed.status_code == 201 and committed.json()["tenant"] == "bob", committed.text

    # alice deleting her public version detaches bob's child instead of refusing (409) over a version she cannot see
    registry = world["registry"]
    extra = registry.acting_for("alice").register_version("a-public", make_model_dir(tmp_path / "v2", seed=5), task="causal-lm")
    child = registry.acting_for("bob").register_version("b-derived", make_model_dir(tmp_path / "child2", seed=6), task="causal-lm",
                                                        parent=extra.ref)
    assert registry.acting_for("alice").delete_version(extra.ref).ref == "a-public:2"
    assert registry.get_version("b-derived", child.version).parent is None


def test_tenant_jobs_cannot_read_the_cluster_or_write_to_its_disks(world):
    bob, before = world["bob"], alice_state(world)
    store = world["root"] / "store"
    for source in ("/etc/passwd", f"{store}/datasets/a-data/1", f"{store}/uploads/bob/../alice/x.txt", "s3://lmaas-test/anything",
                   f"file://{store}/uploads/alice"):
        r = bob.post("/api/v1/jobs", json={"kind": "ingest", "config": {"name": "b-data", "sources": [source]}})
        body = error(r, 403, "sources")
        assert "passwd" not in body["message"].replace(source, "") and "root:" not in body["message"]
    ok = bob.post("/api/v1/jobs", json={"kind": "ingest", "config": {"name": "b-data", "sources": [f"{store}/uploads/bob/corpus"]}})
    assert ok.status_code == 201 and ok.json()["tenant"] == "bob", ok.text
    assert bob.post("/api/v1/jobs", json={"kind": "ingest", "config": {"name": "b-std", "sources": ["stdlib:5"]}}).status_code == 201
    export = {"kind": "compress", "config": {"ref": "a-public", "method": "export", "formats": ["torchscript"], "torchscript_dir": "/tmp/x"}}
    error(bob.post("/api/v1/jobs", json=export), 403, "config.torchscript_dir")
    assert world["admin"].post("/api/v1/jobs", json={**export, "tenant": "bob"}).status_code == 201  # an admin's job may
    error(bob.post("/api/v1/jobs", json={"kind": "ingest", "config": {"name": "b", "sources": ["stdlib:5"]}, "tenant": "alice"}), 403, "tenant")
    assert alice_state(world) == before


def test_jobs_run_as_their_tenant(world, ray_cluster, monkeypatch, capsys):
    """A queued job's driver resolves, registers and ingests as the job's tenant, whatever its config names;
    with signing keys in its environment (and signatures required) what it registers is signed."""
    from lmaas.ops import queue
    from lmaas.registry import ModelRegistry
    from lmaas.registry.store import generate_signing_key

    private, public = generate_signing_key()
    for name, value in {**world["env"], "LMAAS_SIGNING_KEY": private, "LMAAS_VERIFY_KEY": public}.items():
        monkeypatch.setenv(name, value)
    engine, before = world["engine"], alice_state(world)

    def run(kind: str, config: dict, tenant: str = "bob") -> tuple[int, str]:
        job = queue.submit(engine, kind=kind, config=config, tenant=tenant, privileged=True)  # as an admin submits for bob
        status = queue.execute(job.id)
        return status, capsys.readouterr().out

    status, out = run("compress", {"ref": "a-secret", "method": "int8-dynamic", "output_name": "b-stolen"})
    assert status == 1 and "no model named 'a-secret'" in out, out
    status, out = run("compress", {"ref": "a-public", "method": "int8-dynamic", "output_name": "a-secret"})
    assert status == 1 and "the model name 'a-secret' is taken" in out, out
    status, out = run("train", {"dataset": "a-data", "max_steps": 1, "output_model": "b-lm"})
    assert status == 1 and "dataset a-data not found" in out and "a-data" not in out.split("not found")[1], out
    status, out = run("ingest", {"name": "a-data", "sources": ["stdlib:5"]})
    assert status == 1 and "the dataset name 'a-data' is taken" in out, out
    assert alice_state(world) == before

    # alice's public model compresses for bob: the variant is bob's, evaluated on a fixed sample, not on alice's dataset
    status, out = run("compress", {"ref": "a-public:1", "method": "int8-dynamic", "output_name": "b-int8", "gate": {}})
    assert status == 0, out
    variant = ModelRegistry.from_settings(world["settings"]).get_version("b-int8", 1)
    assert (variant.tenant, variant.parent) == ("bob", "a-public:1")
    verifying = ModelRegistry.from_settings(world["settings"], verify_key=bytes.fromhex(public), require_signature=True)
    assert verifying.verify(variant.ref).signature  # the job's registry signed it (ModelRegistry.configured)
    assert "evaluating against a-public:1 on fixed sample (stdlib difflib source)" in out, out  # bob never learns a-public's dataset
    assert alice_state(world) == before


def test_uploads_are_counted_as_they_stream_and_large_downloads_stream_checked(world, tmp_path):
    """A chunked body (no Content-Length) over the upload limit is cut off with 413 and leaves nothing;
    a file of 8 MiB and more downloads in chunks, and a tampered one breaks off instead of arriving whole."""
    from lmaas.auth import Auth
    from lmaas.serve.management import build_app

    registry = world["registry"]
    app = build_app(registry, auth=Auth(world["engine"], registry=registry), max_upload_bytes=64 * 1024)
    with uvicorn_app(app) as base, httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {KEYS['bob'][2]}"}) as bob:
        data = b"\0" * (200 * 1024)
        body = {"files": [{"path": "model.safetensors", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]}
        opened = bob.post("/api/v1/models/b-chunked/uploads", json=body).json()
        chunked = bob.put(f"/api/v1/uploads/{opened['id']}/files/model.safetensors", content=iter([data[i:i + 16384] for i in range(0, len(data), 16384)]))
        assert error(chunked, 413)["code"] == "request_too_large"
        assert registry.storage.list(f"models/b-chunked/{opened['id']}") == []

        request = bob.build_request("POST", "/api/v1/models/b-multipart/versions", files=[("files", ("model.safetensors", data))],
                                    data={"task": "causal-lm"})
        raw = request.read()
        multipart = bob.post("/api/v1/models/b-multipart/versions", content=iter([raw[i:i + 16384] for i in range(0, len(raw), 16384)]),
                             headers={"Content-Type": request.headers["Content-Type"]})
        assert error(multipart, 413)["code"] == "request_too_large"
        assert error(bob.get("/api/v1/models/b-multipart"), 404)
        huge = {"files": [{"path": "model.safetensors", "size": 65 << 30, "sha256": "0" * 64}]}  # over the 64 GiB per file
        assert "limit per file" in error(bob.post("/api/v1/models/b-huge/uploads", json=huge), 400, "files")["message"]

    big = make_model_dir(tmp_path / "big", seed=9, size=1500)  # a 9 MB weights file
    version = registry.acting_for("bob").register_version("b-big", big, task="causal-lm")
    with world["bob"].stream("GET", "/api/v1/models/b-big/versions/1/files/model.safetensors") as r:
        assert r.status_code == 200 and r.headers["content-length"] == str((big / "model.safetensors").stat().st_size)
        assert b"".join(r.iter_bytes()) == (big / "model.safetensors").read_bytes()
    target = f"{version.prefix}/model.safetensors"
    tampered = bytearray(registry.storage.read_bytes(target))
    tampered[-1] ^= 1
    registry.storage.write_bytes(target, bytes(tampered))
    with pytest.raises(httpx.HTTPError):  # the stream breaks off at its end: the client never holds the altered file as complete
        with world["bob"].stream("GET", "/api/v1/models/b-big/versions/1/files/model.safetensors") as r:
            b"".join(r.iter_bytes())


def test_unsigned_versions_are_refused_at_replica_load(world, tmp_path):
    """With a verify key and `LMAAS_REQUIRE_SIGNATURE=1`, the load every Serve replica makes refuses a version
    whose signature was removed (and one never signed); a signed one loads and generates."""
    import asyncio

    from lmaas.db.schema import model_versions
    from lmaas.errors import IntegrityError
    from lmaas.registry import ModelRegistry
    from lmaas.registry.store import generate_signing_key
    from lmaas.serve.options import EngineOptions
    from lmaas.serve.replica import _load_version
    from lmaas.serve.engine import GenerationRequest, SamplingParams

    private, public = generate_signing_key()
    signing = ModelRegistry.from_settings(world["settings"], signing_key=bytes.fromhex(private), require_signature=True).acting_for("bob")
    signed = signing.register_version("b-signed", world["lm"], task="causal-lm")
    loaded = _load_version(signing, signed.ref, tmp_path / "cache", EngineOptions(num_threads=1), "b-signed")
    request = GenerationRequest(request_id="r1", prompt="def f(x):", params=SamplingParams(max_tokens=2, ignore_eos=True))
    out = asyncio.run(_collect(loaded.engine, request))
    assert len(out) == 2
    with world["engine"].begin() as conn:  # the signature stripped from the database
        conn.execute(model_versions.update().where(model_versions.c.prefix == signed.prefix).values(signature=None))
    with pytest.raises(IntegrityError, match="is not signed and this deployment requires signed versions"):
        _load_version(signing, signed.ref, tmp_path / "cache", EngineOptions(num_threads=1), "b-signed")
    assert len(list((tmp_path / "cache").glob("b-signed-1-*"))) == 1  # the first load's; the refused one left nothing


async def _collect(engine, request) -> list:
    events = [event async for event in engine.generate(request)]
    await engine.close()
    return [e for e in events if getattr(e, "token_id", None) is not None]


def test_a_fuzzed_non_admin_key_never_sees_another_tenants_data(world, tmp_path):
    """schemathesis over every `/api/v1` operation as bob, valid and invalid input, with alice's data present:
    no response names alice's private models or datasets (names bob has never been told), her files'
    locations or contents, and nothing of hers changes."""
    import uuid

    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    from lmaas.data.versions import publish_version
    from lmaas.registry.files import FileStore

    hidden, hidden_data = f"hidden-{uuid.uuid4().hex[:10]}", f"hidden-data-{uuid.uuid4().hex[:10]}"
    alice = world["registry"].acting_for("alice")
    data = tmp_path / "hidden-data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "part-00000.parquet").write_bytes(b"more of alice's rows")
    publish_version(alice.storage, world["engine"], data, {
        "name": hidden_data, "tenant": "alice", "sources": ["/home/alice/more"], "content_hash": "3" * 64, "tokenizer_hash": "4" * 64,
        "block_size": 32, "vocab_size": 512, "documents": 1, "train_rows": 1, "validation_rows": 0, "tokens": 32})
    version = alice.register_version(hidden, make_model_dir(tmp_path / "hidden", seed=11), task="causal-lm", dataset=f"{hidden_data}:1",
                                     run="alice-run-7")
    alice.set_alias(hidden, "production", 1)
    alice_file = FileStore(alice.storage, world["engine"]).create(io.BytesIO(b"alice's uploaded notes\n"), filename="alice-notes.txt",
                                                                  purpose="user_data", tenant="alice")
    before = alice_state(world)
    secrets_ = [hidden, hidden_data, "/home/alice", "alice's rows", "alice-run-7", version.prefix.rsplit("/", 1)[-1],
                alice_file.id, "alice-notes", "alice's uploaded",
                world["registry"].resolve("a-secret:1").prefix.rsplit("/", 1)[-1]]
    base, headers = str(world["bob"].base_url).rstrip("/"), {"Authorization": f"Bearer {KEYS['bob'][2]}"}
    schema = schemathesis.openapi.from_url(base + "/openapi.json", headers=headers, timeout=30)
    leaks, calls, operations = [], 0, 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith(("/api/v1/", "/v1/files")):
            continue
        operations += 1
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=3, deadline=None, database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def fuzz(case) -> None:  # noqa: ANN001
                nonlocal calls
                response = case.call(base_url=base, headers=headers, timeout=60)
                calls += 1
                text = response.text
                leaks.extend(f"{case.method} {case.formatted_path} -> {response.status_code}: {s!r}" for s in secrets_ if s in text)

            try:
                fuzz()
            except Unsatisfiable:
                pass
    # and the reads that do name alice's things, asked directly
    for path in ("/v1/files", f"/v1/files/{alice_file.id}", f"/v1/files/{alice_file.id}/content", "/api/v1/models", "/api/v1/models?search=hidden", "/api/v1/lineage?dataset=a-data:1", f"/api/v1/lineage?dataset={hidden_data}:1",
                 "/api/v1/models/a-public/versions", "/api/v1/models/a-public/versions/1/lineage", "/api/v1/jobs", "/api/v1/usage",
                 "/api/v1/feedback"):
        answer = world["bob"].get(path)
        calls += 1
        assert answer.status_code in (200, 404), (path, answer.status_code)
        # (a name the request itself holds may come back in its 404: bob sent it, nothing of alice's is told)
        leaks.extend(f"GET {path}: {s!r}" for s in secrets_ if s in answer.text and s not in path)
    assert operations >= 15 and calls >= 2 * operations
    assert leaks == [], "\n".join(leaks[:20])
    assert alice_state(world) == before


FINE_TUNE = b"".join(json.dumps(line).encode() + b"\n" for line in [
    {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]},
    {"prompt": "def f(x):", "completion": " return x"},
])


def openai_client(world, who: str):
    from openai import OpenAI

    return OpenAI(base_url=str(world["bob"].base_url).rstrip("/") + "/v1", api_key=KEYS[who][2], max_retries=0, timeout=60)


def test_files_api_with_the_openai_client_keeps_each_tenants_files_its_own(world):
    """alice uploads, lists, reads and deletes her files with the real `openai` client; bob's key finds none of them."""
    import openai

    alice, bob = openai_client(world, "alice"), openai_client(world, "bob")
    made = alice.files.create(file=("chat.jsonl", FINE_TUNE), purpose="fine-tune")
    assert (made.object, made.bytes, made.filename, made.purpose, made.status) == ("file", len(FINE_TUNE), "chat.jsonl", "fine-tune", "processed")
    assert made.id.startswith("file-") and made.id in [f.id for f in alice.files.list()]
    assert alice.files.retrieve(made.id).bytes == len(FINE_TUNE)
    assert alice.files.content(made.id).read() == FINE_TUNE
    batch = alice.files.create(file=("requests.jsonl", b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n'),
                               purpose="batch")
    assert [f.id for f in alice.files.list(purpose="batch")] == [batch.id]
    before = alice_state(world)

    # bob: every route answers as if alice's files did not exist
    assert made.id not in [f.id for f in bob.files.list()]
    for attempt in (lambda: bob.files.retrieve(made.id), lambda: bob.files.content(made.id), lambda: bob.files.delete(made.id)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    error(world["bob"].get(f"/v1/files/{made.id}/content"), 404, "file_id")
    assert alice_state(world) == before
    assert made.id in [f["id"] for f in world["admin"].get("/v1/files").json()["data"]]  # an admin sees every tenant's

    deleted = alice.files.delete(batch.id)
    assert deleted.deleted and deleted.id == batch.id
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(batch.id)
    assert world["registry"].storage.list(f"uploads/alice/files/{batch.id}") == []


def test_bad_files_are_refused_naming_the_line_and_leave_nothing(world):
    from lmaas.registry.files import FileStore

    storage, alice = world["registry"].storage, world["alice"]
    kept = set(storage.list("uploads/alice"))

    def post(content: bytes, purpose: str = "fine-tune", client=alice) -> httpx.Response:  # noqa: ANN001
        return client.post("/v1/files", files={"file": ("x.jsonl", content)}, data={"purpose": purpose})

    no_answer = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    assert "line 2: messages needs at least one assistant message" in error(post(FINE_TUNE.split(b"\n")[0] + b"\n" + no_answer), 400, "file")["message"]
    assert "line 1 is not valid JSON" in error(post(b"{nope\n"), 400, "file")["message"]
    assert "line 2: messages[0].role" in error(post(FINE_TUNE.split(b"\n")[0] + b'\n{"messages": [{"role": "robot", "content": "x"}]}'), 400, "file")["message"]
    twice = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n' * 2
    assert "line 2: custom_id 'a' is used twice" in error(post(twice, "batch"), 400, "file")["message"]
    assert "url must be one of" in error(post(b'{"custom_id": "a", "method": "POST", "url": "/v1/files", "body": {}}', "batch"), 400, "file")["message"]
    error(post(b"x", "assistants"), 400, "purpose")
    error(alice.post("/v1/files", data={"purpose": "fine-tune"}), 400, "file")
    # an inference-only key may upload batch files, not training data
    inference = httpx.Client(base_url=alice.base_url, timeout=60, headers={"Authorization": "Bearer " + world["inference_key"]})
    assert "models:write" in error(post(FINE_TUNE, client=inference), 403)["message"]
    assert post(b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}', "batch", inference).status_code == 200
    # larger than a file may be: refused as it streams, nothing kept
    with pytest.raises(Exception, match="larger than 1,000 bytes") as refused:
        FileStore(storage, world["engine"]).create(io.BytesIO(b"x" * 5000), filename="big.txt", purpose="user_data", tenant="alice", max_bytes=1000)
    assert refused.value.status == 413
    left = set(storage.list("uploads/alice")) - kept
    assert all("/files/" in p for p in left) and len(left) == 1  # only the inference key's batch file
    with world["engine"].connect() as conn:
        assert conn.execute(sa.text("select count(*) from files where tenant = 'alice' and filename = 'big.txt'")).scalar_one() == 0


def test_storage_quota_refuses_files_and_model_versions_past_it(world, tmp_path):
    admin, alice = world["admin"], world["alice"]
    r = admin.put("/api/v1/tenants/alice/storage-quota", json={"storage_bytes": 0})
    assert r.status_code == 200 and r.json()["storage_bytes"] == 0
    error(world["bob"].put("/api/v1/tenants/alice/storage-quota", json={"storage_bytes": None}), 403)
    error(admin.put("/api/v1/tenants/alice/storage-quota", json={"storage_bytes": -1}), 400, "storage_bytes")
    before = alice_state(world)
    try:
        refused = alice.post("/v1/files", files={"file": ("notes.txt", b"some notes")}, data={"purpose": "user_data"})
        assert "storage quota" in error(refused, 413, "file")["message"]
        refused = upload(alice, "a-secret", make_model_dir(tmp_path / "m", seed=4))
        assert "storage quota" in error(refused, 413, "files")["message"]
        assert alice_state(world) == before  # no file, no version, no bytes left behind
        assert world["bob"].post("/v1/files", files={"file": ("n.txt", b"bob's")}, data={"purpose": "user_data"}).status_code == 200  # bob's own quota
        assert admin.put("/api/v1/tenants/alice/storage-quota", json={"storage_bytes": 10**12}).status_code == 200
        assert alice.post("/v1/files", files={"file": ("notes.txt", b"some notes")}, data={"purpose": "user_data"}).status_code == 200
        assert {t["name"]: t["storage_bytes"] for t in admin.get("/api/v1/tenants").json()["data"]}["alice"] == 10**12
    finally:
        admin.put("/api/v1/tenants/alice/storage-quota", json={"storage_bytes": None})


def test_an_uploaded_file_is_an_ingest_source_for_its_tenant_only(world, ray_cluster, monkeypatch, capsys):
    """alice ingests her uploaded text by its id (a queued job run as her); bob's job naming it is refused (404)."""
    from lmaas.ops import queue

    for name, value in world["env"].items():
        monkeypatch.setenv(name, value)
    text = "".join(f"line {i} of alice's uploaded corpus, def f{i}(x): return x\n" for i in range(200))
    made = world["alice"].post("/v1/files", files={"file": ("corpus.txt", text.encode())}, data={"purpose": "user_data"}).json()
    bob_job = world["bob"].post("/api/v1/jobs", json={"kind": "ingest", "config": {"name": "b-copy", "sources": [made["id"]]}})
    assert made["id"] in error(bob_job, 404, "config.sources")["message"]
    engine = world["engine"]
    job = queue.submit(engine, kind="ingest", tenant="alice", storage=world["registry"].storage,
                       config={"name": "a-uploaded", "sources": [made["id"]], "format": "lines", "block_size": 16, "vocab_size": 300})
    assert job.config["sources"][0].endswith(f"uploads/alice/files/{made['id']}/corpus.txt")
    assert queue.execute(job.id) == 0, capsys.readouterr().out
    from lmaas.data.versions import get_version

    version = get_version(engine, "a-uploaded", tenant="alice")
    assert version.documents == 200 and version.tenant == "alice"


def test_the_cli_with_another_tenants_key_finds_none_of_alices_models(world, cli):
    """`lmaas models` against the gateway (LMAAS_URL) with bob's key: alice's private model is missing, one line, exit 1."""
    import os

    before = alice_state(world)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("LMAAS_")} | {
        "LMAAS_URL": str(world["bob"].base_url).rstrip("/"), "LMAAS_API_KEY": KEYS["bob"][2]}
    listed = cli("models", "list", env=env)
    assert listed.returncode == 0 and "a-public" in listed.stdout and "a-secret" not in listed.stdout, listed.stdout + listed.stderr
    for ref in ("a-secret", "a-secret:1", "a-secret@production"):
        shown = cli("models", "show", ref, env=env)
        assert shown.returncode == 1 and "Traceback" not in shown.stderr, shown.stderr
        assert "no model named 'a-secret'" in shown.stderr and len(shown.stderr.strip().splitlines()) == 1, shown.stderr
    public = cli("models", "show", "a-public:1", "--json", env=env)
    assert public.returncode == 0 and json.loads(public.stdout)["dataset"] is None  # alice's lineage stays hers
    assert alice_state(world) == before
