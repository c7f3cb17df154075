"""Dataset versions: immutable, numbered per name, recorded in the database and beside the shards.

A version's directory `datasets/<name>/<version>/` holds `train/` and `validation/` Parquet
shards, `tokenizer/` (HF format), `dataset.json` (this record) and `_manifest.json` (written
last by `Storage.publish_dir`). The database row is inserted only after the publish succeeded,
so a reader never sees a half-written version; the prefix is recorded in `dataset_uploads`
before it is written, so a publish whose insert fails (or whose process dies) is deleted at once
or found later by `gc`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from lmaas import db
from lmaas.db.schema import dataset_uploads, datasets
from lmaas.errors import AlreadyExistsError, InvalidInputError, NotFoundError
from lmaas.storage import Storage

METADATA_FILE = "dataset.json"


@dataclass(frozen=True)
class DatasetVersion:
    """One immutable dataset version (plain data, no I/O)."""

    name: str
    version: int
    uri: str
    sources: list[str]
    content_hash: str
    tokenizer_hash: str
    block_size: int
    vocab_size: int
    documents: int
    train_rows: int
    validation_rows: int
    tokens: int
    created_at: float
    tenant: str = "default"
    """Who owns it (see `lmaas.auth`)."""

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def prefix(self) -> str:
        """Path of its directory inside the artifact store."""
        return prefix_of(self.name, self.version)

    def to_dict(self) -> dict:
        return asdict(self)


DATASETS_PREFIX = "datasets"


def prefix_of(name: str, version: int) -> str:
    return f"{DATASETS_PREFIX}/{name}/{version}"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`name` -> (name, None: latest); `name:7` -> (name, 7).

    Raises:
        InvalidInputError: the version part is not a positive integer.
    """
    name, sep, version = ref.partition(":")
    if not name:
        raise InvalidInputError(f"dataset reference {ref!r}: use NAME or NAME:VERSION", param="dataset")
    if not sep:
        return name, None
    if not version.isdigit() or not 1 <= int(version) <= db.MAX_INT:
        raise InvalidInputError(f"dataset reference {ref!r}: the version must be a positive integer up to {db.MAX_INT}", param="dataset")
    return name, int(version)


def _row(row: sa.Row) -> DatasetVersion:
    data = dict(row._mapping)
    data.pop("id")
    return DatasetVersion(**data)


def list_versions(engine: Engine, name: str | None = None, *, tenant: str | None = None) -> list[DatasetVersion]:
    """Every version (of `name`, or of all datasets), by name then version; `tenant`: only that tenant's."""
    query = sa.select(datasets).order_by(datasets.c.name, datasets.c.version)
    if name is not None:
        query = query.where(datasets.c.name == name)
    if tenant is not None:
        query = query.where(datasets.c.tenant == tenant)
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(query)]


def get_version(engine: Engine, ref: str, *, tenant: str | None = None) -> DatasetVersion:
    """The version `name:N`, or the newest version of `name`.

    Args:
        tenant: only a version this tenant owns (another tenant's answers as missing).

    Raises:
        NotFoundError: no such dataset or version.
    """
    name, version = parse_ref(ref)
    query = sa.select(datasets).where(datasets.c.name == name)
    if tenant is not None:
        query = query.where(datasets.c.tenant == tenant)
    query = query.where(datasets.c.version == version) if version else query.order_by(datasets.c.version.desc()).limit(1)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        known = sorted({v.name for v in list_versions(engine, tenant=tenant)})
        hint = f" (datasets: {', '.join(known)})" if known else " (no datasets yet; run `lmaas data ingest`)"
        raise NotFoundError(f"dataset {ref} not found{hint}", param="dataset")
    return _row(row)


def check_name_free(engine: Engine, name: str, tenant: str | None) -> None:
    """Refuse a new version of dataset `name` by `tenant` when another tenant's versions hold the name.

    Dataset names are global (versions live at `datasets/<name>/<N>`), so this says only that the
    name is in use, never whose it is or what it holds. `tenant` None (the operator) may add to any.

    Raises:
        AlreadyExistsError: the name is another tenant's.
    """
    if tenant is None:
        return
    with engine.connect() as conn:
        _check_owner(conn, name, tenant)


def _check_owner(conn: sa.Connection, name: str, tenant: str | None, *, lock: bool = False) -> None:
    """`check_name_free` on `conn`; `lock`: first serialize with every other publish of `name` until the transaction ends
    (PostgreSQL: a transaction-scoped advisory lock; SQLite's write transactions are serialized already)."""
    if tenant is None:
        return
    if lock and conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"lmaas.datasets/{name}"})
    owners = set(conn.execute(sa.select(datasets.c.tenant).where(datasets.c.name == name).distinct()).scalars())
    if owners - {tenant}:
        raise AlreadyExistsError(f"the dataset name {name!r} is taken; choose another name", param="name")


def find_by_content(engine: Engine, name: str, content_hash: str, *, tenant: str | None = None) -> DatasetVersion | None:
    """The oldest version of `name` with exactly this content, if any (`tenant`: only its own)."""
    query = (
        sa.select(datasets)
        .where(datasets.c.name == name, datasets.c.content_hash == content_hash)
        .order_by(datasets.c.version)
        .limit(1)
    )
    if tenant is not None:
        query = query.where(datasets.c.tenant == tenant)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return _row(row) if row else None


def publish_version(storage: Storage, engine: Engine, local_dir: str | Path, record: dict, *, attempts: int = 20) -> DatasetVersion:
    """Publish `local_dir` as the next version of `record["name"]` and record it in the database.

    The version number is the next free one; when a concurrent ingest takes it first (its
    publish wins the prefix), this one retries with the following number.

    Args:
        storage: artifact store.
        engine: metadata database.
        local_dir: the shards and tokenizer, complete.
        record: every `DatasetVersion` field except `name`-derived `version`, `uri`, `created_at`
            (`tenant`, its owner, defaults to `default`).

    Raises:
        AlreadyExistsError: no free version number after `attempts` tries, or the name is another tenant's.
    """
    local_dir = Path(local_dir)
    name = record["name"]
    check_name_free(engine, name, record.get("tenant", "default"))
    for _ in range(attempts):
        version = _next_version(storage, engine, name)
        prefix = prefix_of(name, version)
        entry = DatasetVersion(**record, version=version, uri=storage.url(prefix), created_at=time.time())
        (local_dir / METADATA_FILE).write_text(json.dumps(entry.to_dict(), indent=1, sort_keys=True))
        try:
            with engine.begin() as conn:
                conn.execute(dataset_uploads.insert().values(prefix=prefix, name=name, created_at=time.time()))
        except sa.exc.IntegrityError:
            continue  # a concurrent ingest is publishing this number
        try:
            storage.publish_dir(local_dir, prefix)
        except AlreadyExistsError:
            _forget_upload(engine, prefix)
            continue
        except BaseException:
            _abandon(storage, engine, prefix)
            raise
        try:
            with engine.begin() as conn:
                # checked again where the version becomes visible: two tenants publishing one new name at once get one owner
                _check_owner(conn, name, record.get("tenant", "default"), lock=True)
                conn.execute(datasets.insert().values(**entry.to_dict()))
                conn.execute(dataset_uploads.delete().where(dataset_uploads.c.prefix == prefix))
        except BaseException:
            _abandon(storage, engine, prefix)
            raise
        return entry
    raise AlreadyExistsError(f"dataset {name}: no free version number after {attempts} attempts; try again")


def gc(storage: Storage, engine: Engine, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> list[str]:
    """Delete dataset files no version references: publishes whose database insert never happened.

    A prefix recorded in `dataset_uploads` (a publish in progress) is left alone for
    `grace_seconds`; a published prefix with neither a version nor an upload row, and any
    writer's leftover temporaries, are deleted.

    Returns:
        The store prefixes deleted (or that would be, with `dry_run`).
    """
    with engine.connect() as conn:
        referenced = {prefix_of(r.name, r.version) for r in conn.execute(sa.select(datasets.c.name, datasets.c.version))}
        uploads = {r.prefix: r.created_at for r in conn.execute(sa.select(dataset_uploads))}
    now = time.time()
    in_progress = {p for p, t in uploads.items() if now - t < grace_seconds}
    candidates = set(storage.garbage(DATASETS_PREFIX, depth=2))
    candidates.update(p for p in storage.list_published(DATASETS_PREFIX) if p.count("/") == 2)
    removed = []
    for path in sorted(candidates):
        owner = "/".join(path.split("/")[:3])
        if owner in in_progress or (path == owner and owner in referenced):
            continue
        removed.append(path)
        if not dry_run:
            storage.delete(path)
    stale = [p for p in uploads if p not in in_progress]
    if stale and not dry_run:
        with engine.begin() as conn:
            conn.execute(dataset_uploads.delete().where(dataset_uploads.c.prefix.in_(stale)))
    return removed


def _abandon(storage: Storage, engine: Engine, prefix: str) -> None:
    """Best effort after a failed publish: delete the prefix, then its upload row (gc does what fails here)."""
    try:
        storage.delete(prefix)
    except Exception:  # noqa: BLE001 - the row stays, gc retries after the grace period
        return
    _forget_upload(engine, prefix)


def _forget_upload(engine: Engine, prefix: str) -> None:
    try:
        with engine.begin() as conn:
            conn.execute(dataset_uploads.delete().where(dataset_uploads.c.prefix == prefix))
    except sa.exc.SQLAlchemyError:
        pass  # gc drops it after the grace period


def _next_version(storage: Storage, engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        in_db = conn.execute(sa.select(sa.func.max(datasets.c.version)).where(datasets.c.name == name)).scalar() or 0
        pending = conn.execute(sa.select(dataset_uploads.c.prefix).where(dataset_uploads.c.name == name)).scalars().all()
    in_db = max([in_db] + [int(p.rsplit("/", 1)[-1]) for p in pending if p.rsplit("/", 1)[-1].isdigit()])
    published = [p.rsplit("/", 1)[-1] for p in storage.list_published(f"datasets/{name}")]
    on_disk = max((int(v) for v in published if v.isdigit()), default=0)
    return max(in_db, on_disk) + 1
