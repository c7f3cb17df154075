"""Dataset versions: immutable, numbered per name, recorded in the database and beside the shards.

A version's directory `datasets/<name>/<version>/` holds `train/` and `validation/` Parquet
shards, `tokenizer/` (HF format), `dataset.json` (this record) and `_manifest.json` (written
last by `Storage.publish_dir`). The database row is inserted only after the publish succeeded,
so a reader never sees a half-written version.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from lmaas.db.schema import datasets
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

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def prefix(self) -> str:
        """Path of its directory inside the artifact store."""
        return prefix_of(self.name, self.version)

    def to_dict(self) -> dict:
        return asdict(self)


def prefix_of(name: str, version: int) -> str:
    return f"datasets/{name}/{version}"


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
    if not version.isdigit() or int(version) < 1:
        raise InvalidInputError(f"dataset reference {ref!r}: the version must be a positive integer", param="dataset")
    return name, int(version)


def _row(row: sa.Row) -> DatasetVersion:
    data = dict(row._mapping)
    data.pop("id")
    return DatasetVersion(**data)


def list_versions(engine: Engine, name: str | None = None) -> list[DatasetVersion]:
    """Every version (of `name`, or of all datasets), by name then version."""
    query = sa.select(datasets).order_by(datasets.c.name, datasets.c.version)
    if name is not None:
        query = query.where(datasets.c.name == name)
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(query)]


def get_version(engine: Engine, ref: str) -> DatasetVersion:
    """The version `name:N`, or the newest version of `name`.

    Raises:
        NotFoundError: no such dataset or version.
    """
    name, version = parse_ref(ref)
    query = sa.select(datasets).where(datasets.c.name == name)
    query = query.where(datasets.c.version == version) if version else query.order_by(datasets.c.version.desc()).limit(1)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        known = sorted({v.name for v in list_versions(engine)})
        hint = f" (datasets: {', '.join(known)})" if known else " (no datasets yet; run `lmaas data ingest`)"
        raise NotFoundError(f"dataset {ref} not found{hint}", param="dataset")
    return _row(row)


def find_by_content(engine: Engine, name: str, content_hash: str) -> DatasetVersion | None:
    """The oldest version of `name` with exactly this content, if any."""
    query = (
        sa.select(datasets)
        .where(datasets.c.name == name, datasets.c.content_hash == content_hash)
        .order_by(datasets.c.version)
        .limit(1)
    )
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
        record: every `DatasetVersion` field except `name`-derived `version`, `uri`, `created_at`.

    Raises:
        AlreadyExistsError: no free version number after `attempts` tries.
    """
    local_dir = Path(local_dir)
    name = record["name"]
    for _ in range(attempts):
        version = _next_version(storage, engine, name)
        prefix = prefix_of(name, version)
        entry = DatasetVersion(**record, version=version, uri=storage.url(prefix), created_at=time.time())
        (local_dir / METADATA_FILE).write_text(json.dumps(entry.to_dict(), indent=1, sort_keys=True))
        try:
            storage.publish_dir(local_dir, prefix)
        except AlreadyExistsError:
            continue
        values = entry.to_dict()
        try:
            with engine.begin() as conn:
                conn.execute(datasets.insert().values(**values))
        except sa.exc.IntegrityError:
            continue  # another writer recorded this number first; its prefix holds our files, unlisted
        return entry
    raise AlreadyExistsError(f"dataset {name}: no free version number after {attempts} attempts; try again")


def _next_version(storage: Storage, engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        in_db = conn.execute(sa.select(sa.func.max(datasets.c.version)).where(datasets.c.name == name)).scalar() or 0
    published = [p.rsplit("/", 1)[-1] for p in storage.list_published(f"datasets/{name}")]
    on_disk = max((int(v) for v in published if v.isdigit()), default=0)
    return max(in_db, on_disk) + 1
