"""Uploaded files, per tenant: what the OpenAI files API (`/v1/files`) stores, and what jobs read.

A file is immutable once uploaded: its bytes land in the artifact store under
`uploads/<tenant>/files/<id>/<filename>` (the tenant's own area, which a tenant's ingest job may
read: `data.sources.check_tenant_source`), checked for its purpose as they stream, and become
visible with their `files` row. Each purpose has its format:

- `fine-tune`: JSONL, one example per line: `{"messages": [...]}` (chat, with at least one
  assistant turn) or `{"prompt": ..., "completion": ...}`.
- `batch`: JSONL, one request per line: `{"custom_id", "method": "POST", "url", "body"}`, with
  `url` one of the OpenAI inference routes and each `custom_id` once.
- `user_data`: any bytes (text, JSONL, Parquet for an ingest job: `lmaas data ingest file-...`).

A bad line is refused with its line number and field, and nothing is kept. Every file counts
against its tenant's storage quota (`registry.usage`). A file of another tenant is not found,
exactly as one that does not exist.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from lmaas import db
from lmaas.data.chat import example_problem
from lmaas.data.sources import UPLOADS_PREFIX
from lmaas.db.schema import files
from lmaas.errors import InvalidInputError, NotFoundError, PayloadTooLargeError
from lmaas.registry.usage import check_storage_quota
from lmaas.storage import Storage

PURPOSES = ("fine-tune", "batch", "user_data")
"""What a client may upload a file for."""
OUTPUT_PURPOSES = ("batch_output",)
"""What lmaas itself files: a batch's results (`FileStore.adopt`), read and deleted like uploads."""
MAX_FILE_BYTES = 512 * 1024 * 1024
"""OpenAI's limit per file."""
MAX_LINE_BYTES = 8 * 1024 * 1024
"""The longest line of a JSONL file (a line is parsed whole)."""
MAX_BATCH_REQUESTS = 50_000
"""Requests per batch file, as OpenAI's."""
BATCH_URLS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredFile:
    """One uploaded file's record."""

    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    sha256: str
    path: str
    """Where its bytes are, relative to the artifact store's root."""
    created_at: float

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `file` object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": int(self.created_at), "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "status_details": None}


class FileStore:
    """Files in the artifact store, recorded in the metadata database; every call acts for a tenant.

    Args:
        storage, engine: the artifact store and the metadata database.
        actor: how the audit log names the caller.
    """

    def __init__(self, storage: Storage, engine: Engine, *, actor: str = "cli") -> None:
        self.storage, self.engine, self.actor = storage, engine, actor

    def as_actor(self, actor: str) -> "FileStore":
        return FileStore(self.storage, self.engine, actor=actor)

    def create(self, data: BinaryIO, *, filename: str, purpose: str, tenant: str, max_bytes: int = MAX_FILE_BYTES) -> StoredFile:
        """Store `data` as a new file of `tenant`, checked for `purpose` as it streams.

        Raises:
            InvalidInputError: an unknown purpose, a bad filename, or content not of the purpose's
                format (the message names the line and field).
            PayloadTooLargeError: more than `max_bytes`, or past the tenant's storage quota.
        """
        if purpose not in PURPOSES:
            raise InvalidInputError(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}", param="purpose")
        filename = _clean_filename(filename)
        with self.engine.connect() as conn:
            check_storage_quota(conn, tenant, 1, param="file")  # full already: refuse before reading the body
        file_id = new_file_id()
        path = file_path(tenant, file_id, filename)
        checker = _CHECKERS.get(purpose, _Unchecked)()
        digest, size = hashlib.sha256(), 0
        try:
            with self.storage.writer(path, overwrite=False) as out:
                while chunk := data.read(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLargeError(f"file: larger than {max_bytes:,} bytes", param="file")
                    digest.update(chunk)
                    checker.feed(chunk)
                    out.write(chunk)
                checker.finish()
            record = StoredFile(file_id, tenant, purpose, filename, size, digest.hexdigest(), path, time.time())
            with self.engine.begin() as conn:
                check_storage_quota(conn, tenant, size, param="file")
                conn.execute(files.insert().values(
                    id=record.id, tenant=tenant, purpose=purpose, filename=filename, bytes=size, sha256=record.sha256, path=path,
                    created_at=record.created_at))
                db.record_event(conn, actor=self.actor, action="file.create", target=file_id, tenant=tenant,
                                detail={"purpose": purpose, "bytes": size, "filename": filename})
        except BaseException:
            self.storage.delete(path)  # nothing half-written stays (writer keeps a failed write out already)
            raise
        return record

    def adopt(self, file_id: str, *, filename: str, purpose: str, tenant: str) -> StoredFile:
        """Record what a job wrote at `file_path(tenant, file_id, filename)` (a batch's output) as file `file_id` of `tenant`.

        Its size and sha256 are read from the stored bytes; it counts against the tenant's storage quota like an
        upload but is never refused for it (a finished batch's results are not thrown away).

        Raises:
            InvalidInputError: `purpose` is not one of `OUTPUT_PURPOSES`, or `file_id` is no file id.
            NotFoundError: nothing is stored there.
        """
        if purpose not in OUTPUT_PURPOSES:
            raise InvalidInputError(f"purpose must be one of {', '.join(OUTPUT_PURPOSES)}, not {purpose!r}", param="purpose")
        if not is_file_id(file_id):
            raise InvalidInputError(f"{file_id!r} is no file id (file-...)", param="file_id")
        path = file_path(tenant, file_id, filename)
        if not self.storage.exists(path):
            raise NotFoundError(f"nothing is stored at {self.storage.url(path)}", param="file_id")
        record = StoredFile(file_id, tenant, purpose, _clean_filename(filename), self.storage.size(path), self.storage.sha256(path), path,
                            time.time())
        with self.engine.begin() as conn:
            conn.execute(files.insert().values(
                id=record.id, tenant=tenant, purpose=purpose, filename=record.filename, bytes=record.bytes, sha256=record.sha256,
                path=path, created_at=record.created_at))
            db.record_event(conn, actor=self.actor, action="file.create", target=record.id, tenant=tenant,
                            detail={"purpose": purpose, "bytes": record.bytes, "filename": record.filename})
        return record

    def get(self, file_id: str, *, tenant: str | None) -> StoredFile:
        """One file (`tenant` None: an admin, any tenant's).

        Raises:
            NotFoundError: no such file, or another tenant's.
        """
        query = sa.select(files).where(files.c.id == file_id)
        if tenant is not None:
            query = query.where(files.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            raise NotFoundError(f"no file {file_id!r}; see GET /v1/files", param="file_id")
        return _stored(row)

    def list(self, *, tenant: str | None, purpose: str | None = None, limit: int = 100, after: str | None = None,
             order: str = "desc") -> list[StoredFile]:
        """A tenant's files (`tenant` None: every tenant's), newest first unless `order` is `asc`; `after`: a file id to page past."""
        if order not in ("asc", "desc"):
            raise InvalidInputError("order must be asc or desc", param="order")
        query = sa.select(files)
        if tenant is not None:
            query = query.where(files.c.tenant == tenant)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        if after is not None:
            cursor = self.get(after, tenant=tenant)
            key = (files.c.created_at, files.c.id)
            query = query.where(sa.tuple_(*key) < (cursor.created_at, cursor.id) if order == "desc"
                                else sa.tuple_(*key) > (cursor.created_at, cursor.id))
        ordering = (files.c.created_at.desc(), files.c.id.desc()) if order == "desc" else (files.c.created_at, files.c.id)
        with self.engine.connect() as conn:
            return [_stored(r) for r in conn.execute(query.order_by(*ordering).limit(limit)).mappings()]

    def chunks(self, record: StoredFile) -> Iterator[bytes]:
        """A file's bytes (a record `get` returned), checked against its size and sha256 as they stream."""
        return self.storage.checked_chunks(record.path, record.sha256, record.bytes)

    def url(self, file_id: str, *, tenant: str | None) -> str:
        """Where a file's bytes are, as a path or URI a job reads (an ingest source)."""
        return self.storage.url(self.get(file_id, tenant=tenant).path)

    def delete(self, record: StoredFile) -> StoredFile:
        """Delete a file (a record `get` returned, so for a tenant that may see it): its row first, so it is gone for
        every reader at once, then its bytes.

        Raises:
            NotFoundError: it was deleted meanwhile.
        """
        file_id = record.id
        with self.engine.begin() as conn:
            if not conn.execute(files.delete().where(files.c.id == file_id)).rowcount:
                raise NotFoundError(f"no file {file_id!r}; see GET /v1/files", param="file_id")
            db.record_event(conn, actor=self.actor, action="file.delete", target=file_id, tenant=record.tenant,
                            detail={"purpose": record.purpose, "bytes": record.bytes})
        self.storage.delete(record.path.rsplit("/", 1)[0])
        return record


FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


def file_path(tenant: str, file_id: str, filename: str) -> str:
    """Where file `file_id`'s bytes are kept, relative to the artifact store's root (one folder per file)."""
    return f"{UPLOADS_PREFIX}/{tenant}/files/{file_id}/{_stored_name(filename)}"


def is_file_id(text: str) -> bool:
    """Whether `text` names an uploaded file (`file-...`) rather than a path or URI."""
    return FILE_ID.match(text) is not None


def resolve_sources(sources: list[str], store: FileStore, *, tenant: str | None) -> list[str]:
    """Ingest sources with each uploaded file's id (`file-...`) replaced by where its bytes are.

    Raises:
        NotFoundError: an id that is not a file `tenant` may see (None: any tenant's).
    """
    return [store.url(s, tenant=tenant) if is_file_id(s) else s for s in sources]


def _stored(row: Any) -> StoredFile:
    return StoredFile(row["id"], row["tenant"], row["purpose"], row["filename"], int(row["bytes"]), row["sha256"], row["path"],
                      float(row["created_at"]))


def _clean_filename(filename: str) -> str:
    """The name a client gave, without folders; refused when empty or unprintable."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name or name in (".", "..") or len(name) > 255 or any(ord(c) < 32 for c in name):
        raise InvalidInputError("file: needs a filename of 1 to 255 printable characters", param="file")
    return name


def _stored_name(filename: str) -> str:
    """`filename` with only safe characters, for the store's path (its extension kept: ingest reads by it)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", filename).lstrip(".") or "file"


# ---- format checks, fed the bytes as they arrive ----


class _Unchecked:
    def feed(self, chunk: bytes) -> None:
        pass

    def finish(self) -> None:
        pass


class _JsonLines:
    """Splits the stream into lines and checks each as one JSON object (`check` below)."""

    what = "a JSON object"

    def __init__(self) -> None:
        self._pending = b""
        self.line = 0
        self.objects = 0

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for raw in lines:
            self._line(raw)
        if len(self._pending) > MAX_LINE_BYTES:
            raise InvalidInputError(f"file: line {self.line + 1} is longer than {MAX_LINE_BYTES:,} bytes", param="file")

    def finish(self) -> None:
        if self._pending.strip():
            self._line(self._pending)
        self._pending = b""
        if not self.objects:
            raise InvalidInputError(f"file: no lines; each line must be {self.what}", param="file")

    def _line(self, raw: bytes) -> None:
        self.line += 1
        if not raw.strip():
            return
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise InvalidInputError(f"file: line {self.line} is not valid JSON ({exc.msg})", param="file") from None
        if not isinstance(obj, dict):
            raise InvalidInputError(f"file: line {self.line} must be {self.what}", param="file")
        problem = self.check(obj)
        if problem:
            raise InvalidInputError(f"file: line {self.line}: {problem}", param="file")
        self.objects += 1

    def check(self, obj: dict) -> str | None:
        """What is wrong with one line's object (None: nothing)."""
        return None


class _FineTuneLines(_JsonLines):
    what = 'a JSON object with "messages" (chat) or "prompt" and "completion"'

    def check(self, obj: dict) -> str | None:
        return example_problem(obj)


class _BatchLines(_JsonLines):
    what = 'a JSON object with "custom_id", "method", "url" and "body"'

    def __init__(self) -> None:
        super().__init__()
        self._ids: set[str] = set()

    def check(self, obj: dict) -> str | None:
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
            return "custom_id must be a string of 1 to 512 characters"
        if custom_id in self._ids:
            return f"custom_id {custom_id!r} is used twice (each request needs its own)"
        if obj.get("method") != "POST":
            return "method must be POST"
        if obj.get("url") not in BATCH_URLS:
            return f"url must be one of {', '.join(BATCH_URLS)}"
        if not isinstance(obj.get("body"), dict):
            return "body must be a JSON object (the request the url takes)"
        if len(self._ids) >= MAX_BATCH_REQUESTS:
            return f"a batch file holds at most {MAX_BATCH_REQUESTS:,} requests"
        self._ids.add(custom_id)
        return None


_CHECKERS = {"fine-tune": _FineTuneLines, "batch": _BatchLines}
