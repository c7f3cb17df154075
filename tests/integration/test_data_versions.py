"""Publishing dataset versions against a real SQLite database: a failed insert or a dead writer leaves no unflagged prefix."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from lmaas import db
from lmaas.data import versions
from lmaas.db.schema import dataset_uploads
from lmaas.storage import Storage


def _record(name: str) -> dict:
    return {"name": name, "sources": ["x"], "content_hash": "0" * 64, "tokenizer_hash": "1" * 64, "block_size": 8,
            "vocab_size": 300, "documents": 1, "train_rows": 1, "validation_rows": 0, "tokens": 8}


@pytest.fixture
def store(tmp_path) -> Storage:
    return Storage(f"file://{tmp_path / 'store'}")


@pytest.fixture
def engine(tmp_path):
    return db.connect(f"sqlite:///{tmp_path / 'lmaas.db'}")


@pytest.fixture
def shards(tmp_path) -> Path:
    local = tmp_path / "content"
    (local / "train").mkdir(parents=True)
    (local / "train" / "part-00000.parquet").write_bytes(b"rows")
    return local


def _uploads(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(dataset_uploads.c.prefix)).scalars())


def test_a_rejected_insert_deletes_the_published_prefix(store, engine, shards):
    versions.publish_version(store, engine, shards, _record("ok"))
    with engine.begin() as conn:  # the database itself refuses the row, after the shards are published
        conn.exec_driver_sql("CREATE TRIGGER reject BEFORE INSERT ON datasets BEGIN SELECT RAISE(ABORT, 'rejected'); END")
    with pytest.raises(sa.exc.IntegrityError, match="rejected"):
        versions.publish_version(store, engine, shards, _record("wiki"))
    assert store.list_published("datasets") == ["datasets/ok/1"]
    assert store.list("datasets/wiki") == []
    assert _uploads(engine) == []
    assert [v.ref for v in versions.list_versions(engine)] == ["ok:1"]


def test_gc_collects_a_dead_writers_prefix_after_the_grace_period(store, engine, shards):
    kept = versions.publish_version(store, engine, shards, _record("wiki"))
    # what a writer killed between publish and insert leaves: its upload row and a published prefix
    with engine.begin() as conn:
        conn.execute(dataset_uploads.insert().values(prefix="datasets/wiki/2", name="wiki", created_at=time.time()))
    store.publish_dir(shards, "datasets/wiki/2")
    store.publish_dir(shards, "datasets/other/1")  # published, never recorded, no upload row
    assert versions.gc(store, engine) == ["datasets/other/1"]  # wiki/2 is in its grace period
    assert versions._next_version(store, engine, "wiki") == 3
    assert versions.gc(store, engine, grace_seconds=0, dry_run=True) == ["datasets/wiki/2"]
    assert versions.gc(store, engine, grace_seconds=0) == ["datasets/wiki/2"]
    assert store.list_published("datasets") == [kept.prefix]
    assert _uploads(engine) == []
    assert versions.gc(store, engine, grace_seconds=0) == []


def test_two_tenants_publishing_one_new_name_at_once_get_one_owner(database_url, tmp_path):
    """Both pass the early name check; where the version becomes visible one of them is refused, and leaves nothing."""
    import threading

    from lmaas.errors import AlreadyExistsError

    store, engine = Storage(f"file://{tmp_path / 'store'}"), db.connect(database_url)
    outcomes: dict[str, list] = {}
    for round_ in range(4):
        name = f"shared-{round_}"
        barrier = threading.Barrier(2)

        def publish(tenant: str) -> None:
            local = tmp_path / f"{name}-{tenant}"
            (local / "train").mkdir(parents=True)
            (local / "train" / "part-00000.parquet").write_bytes(tenant.encode())
            barrier.wait()
            try:
                versions.publish_version(store, engine, local, {**_record(name), "tenant": tenant})
                outcomes.setdefault(name, []).append(tenant)
            except AlreadyExistsError as exc:
                assert "is taken" in exc.message
                outcomes.setdefault(name, []).append("refused")

        threads = [threading.Thread(target=publish, args=(t,)) for t in ("alice", "bob")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("select tenant, version from datasets where name = :n"), {"n": name}).all()
        owners = {tenant for tenant, _ in rows}
        assert len(rows) == 1 and sorted(outcomes[name]) == sorted([*owners, "refused"]), (name, rows, outcomes[name])
        # the loser's shards are gone: only the winner's version is stored (1, or 2 when the loser took number 1 first)
        kept = f"datasets/{name}/{rows[0][1]}/"
        assert [p for p in store.list(f"datasets/{name}") if not p.startswith(kept)] == []
    assert _uploads(engine) == []
