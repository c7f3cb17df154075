"""Metadata database against SQLite and a real PostgreSQL server.

Every test runs twice through the `database_url` fixture.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import sqlalchemy as sa

from lmaas import db
from lmaas.db.schema import events, metadata
from lmaas.errors import ConfigError, UnreachableError


def test_connect_creates_the_schema_at_head(database_url: str):
    engine = db.connect(database_url)
    assert db.current_revision(engine) == db.head_revision()
    assert {"events", "alembic_version"} <= set(sa.inspect(engine).get_table_names())
    assert db.ping(engine).split()[0] in ("SQLite", "PostgreSQL")


def test_migrated_schema_matches_the_metadata(database_url: str):
    engine = db.connect(database_url)
    inspector = sa.inspect(engine)
    for table in metadata.sorted_tables:
        migrated = {c["name"]: c for c in inspector.get_columns(table.name)}
        assert set(migrated) == {c.name for c in table.columns}, table.name
        for column in table.columns:
            assert migrated[column.name]["nullable"] == column.nullable, (table.name, column.name)
        declared = {tuple(c.name for c in ix.columns) for ix in table.indexes}
        assert declared <= {tuple(ix["column_names"]) for ix in inspector.get_indexes(table.name)}


def test_upgrade_is_idempotent(database_url: str):
    engine = db.connect(database_url)
    db.upgrade(engine)
    db.upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from alembic_version")).scalar_one() == 1


def test_record_event_roundtrip(database_url: str):
    engine = db.connect(database_url)
    first = db.record_event(engine, actor="alice", action="model.register", target="m:1", detail={"size": 3})
    second = db.record_event(engine, actor="bob", action="alias.move", target="m@prod", outcome="denied", tenant="t1")
    assert second > first
    with engine.connect() as conn:
        rows = conn.execute(sa.select(events).order_by(events.c.id)).mappings().all()
    assert [(r["actor"], r["action"], r["outcome"], r["tenant"]) for r in rows] == [
        ("alice", "model.register", "ok", None),
        ("bob", "alias.move", "denied", "t1"),
    ]
    assert rows[0]["detail"] == {"size": 3}
    assert rows[0]["created_at"] > 1.7e9


def test_record_event_joins_the_callers_transaction(database_url: str):
    engine = db.connect(database_url)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        db.record_event(conn, actor="alice", action="model.register", target="m:1")
        raise RuntimeError("the caller's transaction fails")
    with engine.begin() as conn:
        kept = db.record_event(conn, actor="bob", action="model.register", target="m:2")
    with engine.connect() as conn:
        assert conn.execute(sa.select(events.c.id, events.c.target)).all() == [(kept, "m:2")]


def _first_start(url: str, barrier, results) -> None:
    barrier.wait(30)
    engine = db.connect(url)
    ids = [db.record_event(engine, actor="p", action="concurrent", target=str(i)) for i in range(20)]
    results.put(ids)


def test_many_processes_start_and_write_at_once(database_url: str):
    """Fresh database, 4 processes migrate and write concurrently: no error, no lost write."""
    ctx = mp.get_context("spawn")
    procs_count = 4
    barrier, results = ctx.Barrier(procs_count), ctx.Queue()
    procs = [ctx.Process(target=_first_start, args=(database_url, barrier, results)) for _ in range(procs_count)]
    for p in procs:
        p.start()
    collected = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ids = [i for batch in collected for i in batch]
    assert len(ids) == len(set(ids)) == procs_count * 20
    engine = db.connect(database_url)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one() == procs_count * 20
        assert conn.execute(sa.text("select count(*) from alembic_version")).scalar_one() == 1


def test_database_from_a_newer_lmaas_is_refused(database_url: str):
    engine = db.connect(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("update alembic_version set version_num = '9999'"))
    fresh = db.create_engine(database_url)
    with pytest.raises(ConfigError, match="newer than this lmaas"):
        db.upgrade(fresh)


def test_sqlite_uses_wal_and_a_busy_timeout(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("pragma journal_mode").scalar_one() == "wal"
        assert conn.exec_driver_sql("pragma busy_timeout").scalar_one() >= 10000


def test_unreachable_postgres_is_one_clear_error():
    with pytest.raises(UnreachableError, match="unreachable") as info:
        db.connect("postgresql://u:hunter2@127.0.0.1:1/none", connect_timeout=2)
    assert "hunter2" not in info.value.message
    assert "\n" not in info.value.message


def test_unusable_sqlite_path_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UnreachableError):
        db.connect(f"sqlite:///{blocker / 'sub' / 'x.db'}")


def test_bad_url_is_a_config_error():
    with pytest.raises(ConfigError, match="unsupported database 'mysql'"):
        db.connect("mysql://u@h/db")
