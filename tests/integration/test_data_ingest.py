"""Ingest on the session Ray cluster: local and S3 sources, every format, versions, bad input."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from lmaas import db
from lmaas.data import corpus
from lmaas.data.config import IngestConfig
from lmaas.data.feed import training_dataset
from lmaas.data.ingest import ingest
from lmaas.data.versions import get_version, list_versions
from lmaas.errors import ConfigError, InvalidInputError, NotFoundError, UnreachableError
from lmaas.storage import Storage

TINY = {"vocab_size": 300, "block_size": 64, "batch_size": 16, "validation_percent": 10.0}


@pytest.fixture(scope="module")
def stdlib_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stdlib")
    corpus.copy_stdlib(root, 24)
    return root


@pytest.fixture
def store(tmp_path) -> Storage:
    return Storage(f"file://{tmp_path / 'store'}")


@pytest.fixture
def engine(tmp_path):
    return db.connect(f"sqlite:///{tmp_path / 'lmaas.db'}")


def upload_dir(s3_server, local: Path) -> str:
    prefix = f"src-{uuid.uuid4().hex[:8]}"
    remote = Storage(s3_server.uri(prefix), endpoint_url=s3_server.endpoint)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        remote.put_file(path, path.relative_to(local).as_posix())
    return s3_server.uri(prefix)


def test_local_and_s3_sources_give_the_same_content_hash(ray_cluster, stdlib_dir, s3_server, store, engine):
    local = ingest(IngestConfig(name="local", sources=[str(stdlib_dir)], **TINY), storage=store, engine=engine)
    s3_uri = upload_dir(s3_server, stdlib_dir)
    remote = ingest(IngestConfig(name="remote", sources=[s3_uri], **TINY), storage=store, engine=engine,
                    endpoint_url=s3_server.endpoint)
    assert local.version.content_hash == remote.version.content_hash
    assert local.version.tokenizer_hash == remote.version.tokenizer_hash
    assert (local.version.documents, local.version.tokens) == (remote.version.documents, remote.version.tokens) 
    assert local.version.documents == 24 and local.version.train_rows > 0 and local.version.validation_rows > 0
    manifest = store.verify(local.version.prefix)
    assert {"dataset.json", "tokenizer/tokenizer.json", "train/part-00000.parquet"} <= {f.path for f in manifest.files}
    recorded = json.loads(store.read_bytes(f"{local.version.prefix}/dataset.json"))
    assert recorded["content_hash"] == local.version.content_hash and recorded["version"] == 1


def test_reingest_is_unchanged_and_new_data_is_a_new_version(ray_cluster, stdlib_dir, store, engine, tmp_path):
    config = IngestConfig(name="code", sources=[str(stdlib_dir)], **TINY)
    first = ingest(config, storage=store, engine=engine)
    again = ingest(config, storage=store, engine=engine)
    assert not first.unchanged and again.unchanged
    assert again.version == first.version
    extra = tmp_path / "extra.py"
    extra.write_text("def added():\n    return 'a new document that was not there before'\n" * 20)
    grown = ingest(config.model_copy(update={"sources": [str(stdlib_dir), str(extra)]}), storage=store, engine=engine)
    assert not grown.unchanged and grown.version.version == 2
    assert grown.version.content_hash != first.version.content_hash
    assert [v.version for v in list_versions(engine, "code")] == [1, 2]
    assert get_version(engine, "code").version == 2 and get_version(engine, "code:1") == first.version
    assert store.list_published("datasets/code") == ["datasets/code/1", "datasets/code/2"]


def test_every_format_reads_the_same_documents(ray_cluster, store, engine, tmp_path):
    docs = [f"record {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(120)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")
    pacsv.write_csv(pa.table({"body": docs}), tmp_path / "docs.csv")
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n")
    hashes = {}
    for name, fmt in (("jsonl", "auto"), ("parquet", "auto"), ("csv", "auto"), ("txt", "lines")):
        config = IngestConfig(name=f"f-{name}", sources=[str(tmp_path / f"docs.{name}")], format=fmt, text_field="body",
                              **{**TINY, "block_size": 16})
        result = ingest(config, storage=store, engine=engine)
        assert result.version.documents == 120
        hashes[name] = result.version.content_hash
    assert len(set(hashes.values())) == 1, hashes


def test_training_dataset_streams_the_train_split(ray_cluster, stdlib_dir, s3_server):
    store = Storage(s3_server.uri(f"store-{uuid.uuid4().hex[:8]}"), endpoint_url=s3_server.endpoint)
    engine = db.connect(f"sqlite:///{stdlib_dir.parent / f'{uuid.uuid4().hex}.db'}")
    version = ingest(IngestConfig(name="s3store", sources=[str(stdlib_dir)], **TINY), storage=store, engine=engine).version
    store.verify(version.prefix)
    rows = 0
    for batch in training_dataset(version, store).iter_torch_batches(batch_size=32):
        assert batch["input_ids"].shape[1] == 64 and str(batch["input_ids"].dtype) == "torch.int64"
        assert int(batch["input_ids"].max()) < version.vocab_size
        rows += len(batch["input_ids"])
    assert rows == version.train_rows
    assert training_dataset(version, store, "validation").count() == version.validation_rows


def _bad_jsonl(tmp_path: Path) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"body": "no text field"}\n')
    return str(path)


def _binary(tmp_path: Path) -> str:
    # own directory: tmp_path also holds the test's SQLite files (lmaas.db-shm is binary too)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ok.txt").write_text("some text " * 50)
    (tmp_path / "bin" / "blob.bin").write_bytes(bytes(range(256)) * 8)
    return str(tmp_path / "bin")


def _empty(tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n\n")
    return str(tmp_path / "empty")


@pytest.mark.parametrize(
    "make_source, error, words",
    [
        (lambda tmp: str(tmp / "does-not-exist"), NotFoundError, ["does-not-exist"]),
        (_empty, InvalidInputError, ["empty"]),
        (_bad_jsonl, InvalidInputError, ["bad.jsonl:3", "'text'"]),
        (_binary, InvalidInputError, ["blob.bin", "binary"]),
    ],
    ids=["missing", "empty", "jsonl-field", "binary"],
)
def test_bad_input_is_one_clear_error_and_no_version(ray_cluster, store, engine, tmp_path, make_source, error, words):
    config = IngestConfig(name="bad", sources=[make_source(tmp_path)], **TINY)
    with pytest.raises(error) as info:
        ingest(config, storage=store, engine=engine)
    message = info.value.message
    assert all(w in message for w in words), message
    assert len(message.splitlines()) == 1
    assert list_versions(engine) == [] and store.list_published("datasets") == []


def test_unreachable_s3_endpoint(store, engine):
    config = IngestConfig(name="bad", sources=["s3://bucket/corpus"], **TINY)
    with pytest.raises(UnreachableError, match="127.0.0.1:9"):
        ingest(config, storage=store, engine=engine, endpoint_url="http://127.0.0.1:9")
    assert list_versions(engine) == []


def test_block_size_below_8_is_refused_before_any_work():
    from lmaas.config import load_config

    with pytest.raises(ConfigError, match="block_size"):
        load_config(IngestConfig, None, ["block_size=4"])
