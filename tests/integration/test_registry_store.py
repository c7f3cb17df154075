"""The model registry's store against local files + SQLite and a real S3 server + PostgreSQL.

Every test runs on both backends through the `registry_backend` fixture.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from lmaas import db
from lmaas.db.schema import model_versions
from lmaas.errors import AlreadyExistsError, ConfigError, IntegrityError, InvalidInputError, NotFoundError
from lmaas.registry import ModelRegistry
from lmaas.registry.store import generate_signing_key
from lmaas.storage import Storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from registry_helpers import make_adapter_dir, make_model_dir  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["file-sqlite", "s3-postgresql"])
def registry_backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str | None]:
    """Where a registry lives: a local directory + SQLite file, or the S3 server + PostgreSQL."""
    if request.param == "file-sqlite":
        return {"uri": f"file://{tmp_path / 'store'}", "endpoint": None, "db": f"sqlite:///{tmp_path / 'lmaas.db'}"}
    s3 = request.getfixturevalue("s3_server")
    return {"uri": s3.uri(f"t-{os.urandom(5).hex()}"), "endpoint": s3.endpoint, "db": request.getfixturevalue("postgres_url")}


def open_registry(backend: dict, **kwargs) -> ModelRegistry:
    return ModelRegistry(Storage(backend["uri"], endpoint_url=backend["endpoint"]), db.connect(backend["db"]), **kwargs)


@pytest.fixture
def registry(registry_backend) -> ModelRegistry:
    return open_registry(registry_backend)


def test_register_resolve_and_download(registry: ModelRegistry, tmp_path: Path):
    src = make_model_dir(tmp_path / "src", seed=1)
    v1 = registry.register_version("tiny", src, task="causal-lm", dataset="wiki:3", run="run-1", metrics={"loss": 1.5})
    v2 = registry.register_version("tiny", make_model_dir(tmp_path / "src2", seed=2), task="causal-lm")
    assert (v1.version, v2.version) == (1, 2)
    assert v1.dataset == "wiki:3" and v1.run == "run-1" and v1.metrics == {"loss": 1.5}
    assert {f.path for f in v1.files} == {"model.safetensors", "config.json", "tokenizer.json"}
    assert v1.size == sum((src / f.path).stat().st_size for f in v1.files)
    assert registry.resolve("tiny").version == 2  # no production alias: latest ready
    registry.set_alias("tiny", "production", 1)
    assert registry.resolve("tiny").version == 1
    assert registry.resolve("tiny@production").version == 1
    assert registry.resolve("tiny:2").version == 2
    out = tmp_path / "out"
    registry.download("tiny", out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert [v.version for v in registry.list_versions("tiny")] == [2, 1]
    assert [v.version for v in registry.list_versions("tiny", offset=1, limit=1)] == [1]
    assert registry.get_model("tiny").latest_version == 2


def test_missing_references_are_not_found(registry: ModelRegistry, tmp_path: Path):
    registry.register_version("tiny", make_model_dir(tmp_path / "src"), task="causal-lm")
    for ref, words in [("nope", "no model"), ("tiny:9", "no version 9"), ("tiny@staging", "no alias 'staging'")]:
        with pytest.raises(NotFoundError, match=words):
            registry.resolve(ref)
    with pytest.raises(InvalidInputError, match="invalid model name"):
        registry.resolve("Bad/Name")


def test_bad_input_registers_nothing(registry: ModelRegistry, tmp_path: Path):
    src = make_model_dir(tmp_path / "src")
    with pytest.raises(InvalidInputError, match="invalid model name"):
        registry.register_version("../evil", src, task="causal-lm")
    pickled = make_model_dir(tmp_path / "pickled")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really weights")
    with pytest.raises(InvalidInputError, match="pytorch_model.bin"):
        registry.register_version("tiny", pickled, task="causal-lm")
    fake = make_model_dir(tmp_path / "fake")
    (fake / "model.safetensors").write_bytes(b"\x80\x04\x95pickle pretending")
    with pytest.raises(InvalidInputError, match="not a safetensors file"):
        registry.register_version("tiny", fake, task="causal-lm")
    with pytest.raises(InvalidInputError, match="sha256"):
        registry.register_version("tiny", src, task="causal-lm", expected_sha256={"model.safetensors": "0" * 64})
    with pytest.raises(InvalidInputError, match="unknown task"):
        registry.register_version("tiny", src, task="painting")
    with pytest.raises(NotFoundError):
        registry.resolve("tiny")
    assert registry.list_models() == []
    assert registry.storage.list("models") == []  # refused before anything was uploaded


def test_tampered_weights_fail_to_load_naming_the_file(registry: ModelRegistry, tmp_path: Path):
    version = registry.register_version("tiny", make_model_dir(tmp_path / "src"), task="causal-lm")
    path = f"{version.prefix}/model.safetensors"
    data = bytearray(registry.storage.read_bytes(path))
    data[-3] ^= 0xFF  # flip one byte of the tensor data
    registry.storage.write_bytes(path, bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors") as info:
        registry.download("tiny:1", tmp_path / "out")
    assert "sha256" in info.value.message
    with pytest.raises(IntegrityError, match="model.safetensors"):
        registry.read_file("tiny:1", "model.safetensors")
    with pytest.raises(IntegrityError, match="model.safetensors"):
        registry.verify("tiny:1")
    registry.storage.write_bytes(path, bytes(data[:-10]))  # truncated
    with pytest.raises(IntegrityError, match="model.safetensors"):
        registry.verify("tiny:1")


def test_aliases_archive_restore_delete(registry: ModelRegistry, tmp_path: Path):
    for seed in range(3):
        registry.register_version("tiny", make_model_dir(tmp_path / f"s{seed}", seed=seed), task="causal-lm")
    registry.set_alias("tiny", "staging", 2)
    registry.set_alias("tiny", "staging", 3)  # moves
    assert [(a.alias, a.version) for a in registry.aliases("tiny")] == [("staging", 3)]
    with pytest.raises(AlreadyExistsError, match="alias 'staging'"):
        registry.delete_version("tiny:3")
    with pytest.raises(AlreadyExistsError):
        registry.archive("tiny:3")
    registry.archive("tiny:2")
    assert registry.get_version("tiny", 2).status == "archived"
    with pytest.raises(InvalidInputError, match="archived"):
        registry.set_alias("tiny", "canary", 2)
    registry.delete_alias("tiny", "staging")
    assert registry.resolve("tiny").version == 3
    registry.archive("tiny:3")
    assert registry.resolve("tiny").version == 1  # latest *ready*
    registry.restore("tiny:3")
    assert registry.resolve("tiny").version == 3
    deleted = registry.delete_version("tiny:3")
    assert not registry.storage.exists(f"{deleted.prefix}/model.safetensors")
    with pytest.raises(NotFoundError):
        registry.resolve("tiny:3")
    with pytest.raises(NotFoundError):
        registry.delete_alias("tiny", "staging")
    # numbers are never reused
    assert registry.register_version("tiny", make_model_dir(tmp_path / "s9", seed=9), task="causal-lm").version == 4


def test_deployed_version_cannot_be_deleted(registry_backend, tmp_path: Path):
    registry = open_registry(registry_backend, deployments_of=lambda name, v: ["chat-prod"] if v == 1 else [])
    registry.register_version("tiny", make_model_dir(tmp_path / "src"), task="causal-lm")
    with pytest.raises(AlreadyExistsError, match="deployment 'chat-prod'"):
        registry.delete_version("tiny:1")
    assert registry.lineage("tiny:1").deployments == ("chat-prod",)


def test_lineage(registry: ModelRegistry, tmp_path: Path):
    base = registry.register_version("base", make_model_dir(tmp_path / "a"), task="causal-lm", dataset="wiki:1", run="train-7")
    small = registry.register_version("base-int8", make_model_dir(tmp_path / "b", seed=5), task="causal-lm", parent="base:1")
    registry.register_version("other", make_model_dir(tmp_path / "c", seed=6), task="causal-lm", dataset="web:2")
    registry.set_alias("base", "production", 1)
    lineage = registry.lineage("base")
    assert lineage.to_dict() == {
        "ref": "base:1",
        "dataset": "wiki:1",
        "dataset_sha256": None,
        "run": "train-7",
        "parent": None,
        "parents": [],
        "children": ["base-int8:1"],
        "aliases": ["production"],
        "deployments": [],
    }
    assert registry.lineage(small.ref).parent.ref == base.ref
    assert [v.ref for v in registry.trained_on("wiki:1")] == ["base:1"]
    registry.delete_alias("base", "production")
    with pytest.raises(AlreadyExistsError, match="derive from it"):
        registry.delete_version("base:1")
    with pytest.raises(NotFoundError):
        registry.register_version("x", make_model_dir(tmp_path / "d"), task="causal-lm", parent="base:9")
    assert registry.storage.list("models/x") == []  # refused before any upload
    staged = registry.stage("x", make_model_dir(tmp_path / "e"))
    registry.abandon(staged)
    assert registry.storage.list("models/x") == [] and registry.gc(grace_seconds=0, dry_run=True) == []


def test_adapters_and_merges_record_every_parent(registry: ModelRegistry, tmp_path: Path):
    base_dir = make_model_dir(tmp_path / "base")
    registry.register_version("base", base_dir, task="causal-lm")
    adapter = registry.register_version("bot", make_adapter_dir(tmp_path / "adapter", base_dir), task="adapter", parent="base:1")
    assert adapter.task == "adapter" and adapter.parents == ("base:1",)
    assert {f.path for f in adapter.files} >= {"adapter_config.json", "adapter_model.safetensors"}

    # refused before anything is stored: no base, a base it does not fit, pickle weights, not LoRA
    with pytest.raises(InvalidInputError, match="needs its base model") as no_base:
        registry.register_version("bot", tmp_path / "adapter", task="adapter")
    assert no_base.value.param == "parent"
    wider = make_model_dir(tmp_path / "wider", size=32)
    registry.register_version("wider", wider, task="causal-lm")
    with pytest.raises(InvalidInputError, match="does not fit") as misfit:
        registry.register_version("bot", make_adapter_dir(tmp_path / "wide-adapter", wider), task="adapter", parent="base:1")
    assert misfit.value.param == "files"
    pickled = make_adapter_dir(tmp_path / "pickled", base_dir)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(InvalidInputError):
        registry.register_version("bot", pickled, task="adapter", parent="base:1")
    other = make_adapter_dir(tmp_path / "other", base_dir)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(InvalidInputError, match="LORA"):
        registry.register_version("bot", other, task="adapter", parent="base:1")
    assert [v.version for v in registry.list_versions("bot")] == [1]

    # a merge of two versions lists both; neither parent can be deleted while it exists
    registry.register_version("base", make_model_dir(tmp_path / "base2", seed=1), task="causal-lm")
    merged = registry.register_version("soup", make_model_dir(tmp_path / "soup", seed=2), task="causal-lm",
                                       parents=["base:1", "base:2"])
    assert merged.parent == "base:1" and merged.parents == ("base:1", "base:2")
    lineage = registry.lineage("soup:1")
    assert [p.ref for p in lineage.parents] == ["base:1", "base:2"] and lineage.to_dict()["parents"] == ["base:1", "base:2"]
    assert [c.ref for c in registry.lineage("base:2").children] == ["soup:1"]
    with pytest.raises(AlreadyExistsError, match="derive from it"):
        registry.delete_version("base:2")
    registry.delete_version("soup:1")
    registry.delete_version("base:2")  # free once the merge is gone
    assert registry.lineage("base:1").children == (adapter,)


def test_signatures(registry_backend, tmp_path: Path):
    private, public = generate_signing_key()
    signer = open_registry(registry_backend, signing_key=bytes.fromhex(private))
    signed = signer.register_version("tiny", make_model_dir(tmp_path / "a"), task="causal-lm")
    assert signed.signature is not None
    strict = open_registry(registry_backend, verify_key=bytes.fromhex(public), require_signature=True)
    strict.download("tiny:1", tmp_path / "ok")
    open_registry(registry_backend).register_version("tiny", make_model_dir(tmp_path / "b", seed=1), task="causal-lm")
    with pytest.raises(IntegrityError, match="not signed"):
        strict.download("tiny:2", tmp_path / "no")
    _, other_public = generate_signing_key()
    stranger = open_registry(registry_backend, verify_key=bytes.fromhex(other_public), require_signature=True)
    with pytest.raises(IntegrityError, match="invalid signature"):
        stranger.download("tiny:1", tmp_path / "bad")


CONCURRENT_WORKER = r"""
import sys, time, os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
sys.path.insert(0, sys.argv[5])
from registry_helpers import make_model_dir
from lmaas import db
from lmaas.registry import ModelRegistry
from lmaas.storage import Storage
uri, endpoint, url, start_file, _, worker = sys.argv[1:7]
registry = ModelRegistry(Storage(uri, endpoint_url=endpoint or None), db.connect(url))
dirs = [make_model_dir(Path(start_file).parent / f"w{worker}-{i}", seed=int(worker) * 100 + i) for i in range(8)]
while not os.path.exists(start_file):
    time.sleep(0.01)
with ThreadPoolExecutor(4) as pool:
    versions = list(pool.map(lambda d: registry.register_version("shared", d, task="causal-lm", run=d.name), dirs))
print(" ".join(f"{v.version}={v.run}" for v in versions))
"""


def test_concurrent_registrations_get_consecutive_versions(registry_backend, tmp_path: Path):
    """32 registrations of one name from 4 processes x 4 threads: versions 1..32, none lost."""
    db.connect(registry_backend["db"])  # migrate once up front; the workers race on registration only
    start = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WORKER, registry_backend["uri"], registry_backend["endpoint"] or "",
             registry_backend["db"], str(start), str(TESTS), str(w)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for w in range(4)
    ]
    time.sleep(3)
    start.write_text("go")
    runs = {}
    for proc in procs:
        out, errs = proc.communicate(timeout=300)
        assert proc.returncode == 0, errs[-2000:]
        runs.update(item.split("=") for item in out.split())
    assert sorted(int(v) for v in runs) == list(range(1, 33))
    registry = open_registry(registry_backend)
    versions = registry.list_versions("shared", limit=100)
    assert sorted(v.version for v in versions) == list(range(1, 33))
    assert {v.run for v in versions} == set(runs.values())  # every write landed on its own number
    for v in versions:
        registry.verify(v.ref)  # each is loadable: every file matches its sha256
    assert registry.get_model("shared").latest_version == 32


def test_ray_workers_registering_at_once_get_consecutive_versions(ray_cluster, tmp_path: Path):
    """8 Ray tasks register a version of one name at the same moment: versions 1..8, each loadable."""
    import ray

    uri, url = f"file://{tmp_path / 'store'}", f"sqlite:///{tmp_path / 'lmaas.db'}"
    db.connect(url)  # migrate once up front; the tasks race on registration only
    dirs = [str(make_model_dir(tmp_path / f"src{i}", seed=i)) for i in range(8)]
    start = tmp_path / "go"

    # defined here so Ray ships it by value; its workers import lmaas from PYTHONPATH
    @ray.remote(num_cpus=0.25)
    def register(src: str) -> tuple[int, str]:
        import os
        import time

        from lmaas import db
        from lmaas.registry import ModelRegistry
        from lmaas.storage import Storage

        registry = ModelRegistry(Storage(uri), db.connect(url))
        while not os.path.exists(start):  # line up, so the registrations really overlap
            time.sleep(0.01)
        version = registry.register_version("shared", src, task="causal-lm", run=os.path.basename(src))
        return version.version, version.run

    refs = [register.remote(d) for d in dirs]
    time.sleep(1)
    start.write_text("go")
    results = ray.get(refs, timeout=300)
    assert sorted(v for v, _ in results) == list(range(1, 9))
    assert sorted(run for _, run in results) == sorted(Path(d).name for d in dirs)
    registry = ModelRegistry(Storage(uri), db.connect(url))
    versions = registry.list_versions("shared", limit=100)
    assert {v.version: v.run for v in versions} == dict(results)
    for v in versions:
        out = tmp_path / "out" / str(v.version)
        registry.download(v.ref, out)  # verifies every file's sha256
        assert (out / "model.safetensors").read_bytes() == (tmp_path / v.run / "model.safetensors").read_bytes()
    assert registry.get_model("shared").latest_version == 8


KILLED_REGISTRATION = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[4])
from lmaas import db
from lmaas.registry import ModelRegistry
from lmaas.storage import Storage
uri, endpoint, url, _, src, mode = sys.argv[1:7]
registry = ModelRegistry(Storage(uri, endpoint_url=endpoint or None), db.connect(url))
if mode == "after-upload":
    registry.stage("tiny", src)  # uploaded and verified; the commit never happens
    os.kill(os.getpid(), signal.SIGKILL)
seen = []
def progress(path, size):
    seen.append(path)
    if len(seen) == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-upload: one file stored, no manifest yet
registry.register_version("tiny", src, task="causal-lm", progress=progress)
"""


@pytest.mark.parametrize("mode", ["after-upload", "mid-upload"])
def test_killed_registration_leaves_no_version_and_gc_removes_its_files(registry_backend, tmp_path: Path, mode: str):
    registry = open_registry(registry_backend)
    registry.register_version("tiny", make_model_dir(tmp_path / "keep"), task="causal-lm")
    src = make_model_dir(tmp_path / "src", seed=3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_REGISTRATION, registry_backend["uri"], registry_backend["endpoint"] or "",
         registry_backend["db"], str(TESTS), str(src), mode],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [v.version for v in registry.list_versions("tiny")] == [1]
    kept = registry.resolve("tiny:1").prefix
    leftovers = [p for p in registry.storage.list("models/tiny") if not p.startswith(kept + "/")]
    if registry.storage.is_local and mode == "mid-upload":
        leftovers = registry.gc(grace_seconds=0, dry_run=True)  # a hidden staging directory
    assert leftovers, "the killed writer should have left files behind"
    assert registry.gc() == []  # within the grace period an upload may still be running
    removed = registry.gc(grace_seconds=0)
    assert removed
    assert [p for p in registry.storage.list("models/tiny") if not p.startswith(kept + "/")] == []
    assert registry.gc(grace_seconds=0, dry_run=True) == []
    registry.verify("tiny:1")  # the committed version is untouched
    assert registry.register_version("tiny", src, task="causal-lm").version == 2


def test_gc_removes_files_of_a_version_row_deleted_without_its_files(registry: ModelRegistry, tmp_path: Path):
    version = registry.register_version("tiny", make_model_dir(tmp_path / "a"), task="causal-lm")
    with registry.engine.begin() as conn:  # as if delete_version died after its commit
        conn.execute(sa.delete(model_versions).where(model_versions.c.prefix == version.prefix))
    assert registry.gc(grace_seconds=0) == [version.prefix]
    assert registry.storage.list(version.prefix) == []


def test_encryption_at_rest(registry_backend, tmp_path: Path):
    key = os.urandom(32)
    sealed = open_registry(registry_backend, encryption_key=key)
    src = make_model_dir(tmp_path / "src")
    version = sealed.register_version("secret", src, task="causal-lm")
    assert version.encrypted
    plain = (src / "model.safetensors").read_bytes()
    stored = sealed.storage.read_bytes(f"{version.prefix}/model.safetensors")
    assert stored != plain and plain[8:40] not in stored  # a leaked bucket does not leak weights
    stored_hashes = {f.path: f.sha256 for f in sealed.storage.read_manifest(version.prefix).files}
    assert stored_hashes["model.safetensors"] == hashlib.sha256(stored).hexdigest()  # the store hashes ciphertext
    # the database keeps plaintext hashes
    assert {f.path: f.sha256 for f in version.files}["model.safetensors"] == hashlib.sha256(plain).hexdigest()
    sealed.download("secret", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == plain
    assert sealed.read_file("secret:1", "model.safetensors")[1] == plain
    sealed.verify("secret:1")
    with pytest.raises(ConfigError, match="encrypted at rest"):
        open_registry(registry_backend).download("secret", tmp_path / "nokey")
    with pytest.raises(IntegrityError, match="does not decrypt"):
        open_registry(registry_backend, encryption_key=os.urandom(32)).read_file("secret:1", "model.safetensors")
    data = bytearray(stored)
    data[-1] ^= 1
    sealed.storage.write_bytes(f"{version.prefix}/model.safetensors", bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        sealed.download("secret:1", tmp_path / "tampered")
    with pytest.raises(IntegrityError, match="model.safetensors"):
        sealed.read_file("secret:1", "model.safetensors")


def test_encrypted_files_over_a_segment_stream_through_every_path(registry_backend, tmp_path: Path):
    """Sealed in 1 MiB segments: registration, the two-step upload, download, streamed and whole reads give the plaintext back;
    an altered segment stops a stream before it is complete."""
    import io

    from lmaas.registry.entities import ModelFile

    sealed = open_registry(registry_backend, encryption_key=os.urandom(32))
    src = make_model_dir(tmp_path / "src", size=280)  # a 2.5 MB weights file: three segments
    plain = (src / "model.safetensors").read_bytes()
    sealed.register_version("big", src, task="causal-lm")
    sealed.download("big:1", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == plain
    _, _, chunks = sealed.stream_file("big:1", "model.safetensors", whole_below=0)
    parts = list(chunks)
    assert len(parts) == 3 and b"".join(parts) == plain
    files = [ModelFile(p.name, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for p in sorted(src.iterdir())]
    upload_id = sealed.begin_upload("big", files)
    for f in files:
        sealed.put_upload_file(upload_id, f.path, io.BytesIO((src / f.path).read_bytes()))
    second = sealed.commit_upload(upload_id, task="causal-lm")
    assert second.encrypted and sealed.read_file(second.ref, "model.safetensors")[1] == plain
    target = f"{second.prefix}/model.safetensors"
    data = bytearray(sealed.storage.read_bytes(target))
    data[len(data) // 2] ^= 1
    sealed.storage.write_bytes(target, bytes(data))
    got = []
    with pytest.raises(IntegrityError, match="model.safetensors"):
        for chunk in sealed.stream_file(second.ref, "model.safetensors", whole_below=0)[2]:
            got.append(chunk)
    assert len(b"".join(got)) < len(plain)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_two_step_upload(registry_backend, tmp_path: Path, encrypted: bool):
    """begin_upload / put_upload_file / commit_upload: the REST API's two-step path, on both backends."""
    import io

    from lmaas.registry.entities import ModelFile

    registry = open_registry(registry_backend, encryption_key=os.urandom(32) if encrypted else None)
    src = make_model_dir(tmp_path / "src")
    files = [ModelFile(p.name, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for p in sorted(src.iterdir())]
    upload_id = registry.begin_upload("tiny", files)
    with pytest.raises(InvalidInputError, match="model.safetensors"):
        registry.put_upload_file(upload_id, "model.safetensors", io.BytesIO(b"x" * files[1].size))
    for f in files:
        registry.put_upload_file(upload_id, f.path, io.BytesIO((src / f.path).read_bytes()))
    assert registry.list_models() == []
    version = registry.commit_upload(upload_id, task="causal-lm", run="r1")
    assert (version.ref, version.encrypted, version.run) == ("tiny:1", encrypted, "r1")
    assert {f.path: f.sha256 for f in version.files} == {f.path: f.sha256 for f in files}
    registry.download("tiny:1", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    with pytest.raises(AlreadyExistsError, match="already committed"):
        registry.commit_upload(upload_id, task="causal-lm")
    # a file altered in the store after its PUT is caught at commit
    second = registry.begin_upload("tiny", files)
    for f in files:
        registry.put_upload_file(second, f.path, io.BytesIO((src / f.path).read_bytes()))
    target = f"models/tiny/{second}/config.json"
    stored = registry.storage.read_bytes(target)
    registry.storage.write_bytes(target, stored[:-1] + bytes([stored[-1] ^ 1]))  # a flipped bit (a random ciphertext may end in any byte)
    with pytest.raises(IntegrityError, match="config.json"):
        registry.commit_upload(second, task="causal-lm")
    registry.abort_upload(second)
    with pytest.raises(NotFoundError):
        registry.commit_upload(second, task="causal-lm")
    assert registry.storage.list(f"models/tiny/{second}") == []
    assert registry.get_model("tiny").latest_version == 1
