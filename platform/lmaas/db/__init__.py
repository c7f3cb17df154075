"""The metadata database: one SQLAlchemy 2 engine, schema kept current by Alembic migrations.

SQLite (the default, a file under `LMAAS_HOME`) and PostgreSQL are both first-class. SQLite runs
in WAL mode with a busy timeout so several processes (CLI, Ray workers, Serve replicas) can
share one file. Migrations run on first use, serialized across processes by a lock (a file
lock for SQLite, an advisory lock for PostgreSQL), so concurrent first starts are safe.

Tables live in `lmaas.db.schema`; each feature adds its tables there and a migration under
`migrations/versions/` (copy the newest file, set `down_revision` to its `revision`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

from lmaas.config import redact_url, validate_database_url
from lmaas.errors import ConfigError, UnreachableError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MAX_INT = 2**31 - 1
"""The largest value an `sa.Integer` column holds on every backend (PostgreSQL's `integer` is 32-bit);
inputs that land in one (versions, rate limits, offsets) are checked against it, so they get a 400, not a database error."""
MAX_BIGINT = 2**63 - 1
_ADVISORY_LOCK_KEY = 0x1A_AA5  # any constant shared by every lmaas process
_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def connect(url: str, *, migrate: bool = True, connect_timeout: float = 10.0) -> Engine:
    """An engine for `url` with the lmaas schema up to date; one engine per URL per process.

    Args:
        url: `sqlite:///path` or `postgresql://...` (`postgresql+psycopg://` is used for the latter).
        migrate: bring the schema to the newest revision first.
        connect_timeout: seconds to wait for a PostgreSQL connection.

    Raises:
        ConfigError: the URL is malformed or names an unsupported database.
        UnreachableError: the database cannot be reached or opened.
    """
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = create_engine(url, connect_timeout=connect_timeout)
    if migrate:
        upgrade(engine)
    return engine


def create_engine(url: str, *, connect_timeout: float = 10.0) -> Engine:
    """A new SQLAlchemy engine for `url`, configured for concurrent use by several processes."""
    parsed = _driver_url(validate_database_url(url))
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            try:
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UnreachableError(f"database {url}: cannot create its directory: {exc.strerror}") from None
        engine = sa.create_engine(parsed, connect_args={"timeout": 30, "check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return sa.create_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        connect_args={"connect_timeout": max(1, int(connect_timeout))},
    )


def _driver_url(url: str) -> URL:
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI types
    # Let SQLAlchemy own transactions (pysqlite's implicit BEGIN breaks BEGIN IMMEDIATE).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # Take the write lock up front: two writers that both read then write would otherwise
    # deadlock-upgrade and one would fail with "database is locked" despite the busy timeout.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def ping(engine: Engine) -> str:
    """Return the server version string, or raise `UnreachableError`."""
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                return "SQLite " + conn.exec_driver_sql("select sqlite_version()").scalar_one()
            return "PostgreSQL " + conn.exec_driver_sql("show server_version").scalar_one().split()[0]
    except sa.exc.SQLAlchemyError as exc:
        raise _unreachable(engine, exc) from None


def unavailable(exc: BaseException) -> UnreachableError | None:
    """The `UnreachableError` (503) for a lost or refused database connection, or None for any other error.

    A connection that fails, a server that went away mid-query, or a pool with no connection free
    in time is the database being unavailable (retry later); a constraint or SQL error is not.
    """
    if isinstance(exc, sa.exc.DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError))
    ):
        detail = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else type(exc.orig).__name__
    elif isinstance(exc, sa.exc.TimeoutError):
        detail = "no database connection free in time"
    else:
        return None
    return UnreachableError(f"database unavailable: {detail}; try again shortly")


def _unreachable(engine: Engine, exc: Exception) -> UnreachableError:
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return UnreachableError(f"database {redact_url(str(engine.url.render_as_string(hide_password=True)))} is unreachable: {detail}")


# -- migrations ----------------------------------------------------------------------------
def _alembic():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config, ScriptDirectory.from_config(config)


def head_revision() -> str:
    """The newest schema revision this code knows."""
    return _alembic()[1].get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except sa.exc.SQLAlchemyError as exc:
        raise _unreachable(engine, exc) from None


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision; a no-op (one query) when it is current.

    Raises:
        UnreachableError: the database cannot be reached.
        ConfigError: the database was migrated by a newer lmaas than this one.
    """
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return
    from alembic.runtime.environment import EnvironmentContext

    config, script = _alembic()
    if current is not None and not _known_revision(script, current):
        raise ConfigError(
            f"database schema revision {current!r} is newer than this lmaas ({head!r}); upgrade lmaas",
            param="database_url",
        )

    def run(rev, _context):  # noqa: ANN001 - alembic callback
        return script._upgrade_revs(head, rev)

    try:
        with _migration_lock(engine) as conn:
            with EnvironmentContext(config, script, fn=run, destination_rev=head) as env:
                env.configure(connection=conn, transaction_per_migration=False)
                with env.begin_transaction():
                    env.run_migrations()
            conn.commit()
    except sa.exc.SQLAlchemyError as exc:
        raise _unreachable(engine, exc) from None


def _known_revision(script, revision: str) -> bool:  # noqa: ANN001 - alembic ScriptDirectory
    from alembic.util import CommandError

    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection holding the cross-process migration lock."""
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        lock_file = None
        if database and database != ":memory:":
            lock_file = open(f"{os.path.expanduser(database)}.migrate.lock", "a+")  # noqa: SIM115
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            if lock_file is not None:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
                lock_file.close()
        return
    with engine.connect() as conn:
        conn.exec_driver_sql(f"select pg_advisory_lock({_ADVISORY_LOCK_KEY})")
        conn.commit()
        try:
            yield conn
        finally:
            conn.rollback()
            conn.exec_driver_sql(f"select pg_advisory_unlock({_ADVISORY_LOCK_KEY})")
            conn.commit()


def record_event(
    bind: Engine | Connection,
    *,
    actor: str,
    action: str,
    target: str,
    outcome: str = "ok",
    tenant: str | None = None,
    detail: dict | None = None,
) -> int:
    """Append one row to the event log and return its id.

    Args:
        bind: an engine (the event is written in its own transaction) or a connection inside a
            transaction, which the event joins: it is recorded only if that transaction commits.
    """
    from lmaas.db.schema import events

    insert = events.insert().values(
        created_at=time.time(),
        actor=actor,
        tenant=tenant,
        action=action,
        target=target,
        outcome=outcome,
        detail=detail or {},
    )
    if isinstance(bind, Connection):
        return int(bind.execute(insert).inserted_primary_key[0])
    with bind.begin() as conn:
        return int(conn.execute(insert).inserted_primary_key[0])


def dispose_all() -> None:
    """Close every pooled connection (tests, and before a process forks)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
