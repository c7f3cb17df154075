"""Readers: sources (paths, globs, `file://`, `s3://`, the built-in corpus) -> a Ray Dataset of documents.

Ray Data does the reading; every task decodes and checks its own files, and a bad file, line
or field raises `InvalidInputError` naming it. Each output row is one document: `{"text": str}`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from lmaas.data import corpus
from lmaas.data.chat import example_problem
from lmaas.errors import InvalidInputError, PermissionDeniedError
from lmaas.storage import Storage, resolve_files

UPLOADS_PREFIX = "uploads"
"""Where each tenant's own ingest sources live in the artifact store: `uploads/<tenant>/...`."""

_BY_EXTENSION = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class ResolvedSource:
    """One source as files on one filesystem, with the format to read them in."""

    source: str
    filesystem: Any
    files: list[str]
    format: str

    @property
    def scheme(self) -> str:
        return "s3://" if type(self.filesystem).__name__ == "S3FileSystem" else ""


def resolve(source: str, fmt: str, *, endpoint_url: str | None) -> ResolvedSource:
    """Files and format of one source.

    Raises:
        NotFoundError: nothing at `source`.
        UnreachableError: its S3 endpoint does not answer.
        InvalidInputError: `format: auto` and the files have mixed extensions.
    """
    stdlib = corpus.parse_stdlib_source(source)
    if stdlib is not False:
        import pyarrow.fs as pafs

        files = [str(p) for p in corpus.stdlib_files(stdlib)]
        return ResolvedSource(source, pafs.LocalFileSystem(), files, "text" if fmt == "auto" else fmt)
    filesystem, files = resolve_files(source, endpoint_url=endpoint_url)
    if fmt == "auto":
        found = {_BY_EXTENSION.get(_extension(f), "text") for f in files}
        if len(found) > 1:
            raise InvalidInputError(
                f"source {source}: files of several formats ({', '.join(sorted(found))}); set --format or name them apart",
                param="format",
            )
        fmt = found.pop()
    return ResolvedSource(source, filesystem, files, fmt)


def check_tenant_source(source: str, storage: Storage, tenant: str) -> None:
    """Refuse an ingest source a tenant (not an admin) may not read.

    A tenant reads the stdlib corpus and files under its own area of the artifact store,
    `uploads/<tenant>/` (named by path or URI as the store is: a local path for a `file://` store,
    `s3://...` for an S3 one); nothing else on the cluster's disks or buckets. Local paths are
    checked after resolving `..` and symbolic links.

    Raises:
        PermissionDeniedError: anything else (the message does not say what exists there).
    """
    if corpus.parse_stdlib_source(source) is not False:
        return
    area = storage.url(f"{UPLOADS_PREFIX}/{tenant}").partition("://")[2]
    scheme, sep, rest = source.partition("://")
    if not sep:
        scheme, rest = "file", source
    if storage.is_local and scheme == "file":
        target, root = os.path.realpath(os.path.expanduser(rest)), os.path.realpath(area)
        allowed = target == root or target.startswith(root + os.sep)
    elif not storage.is_local and scheme == "s3":
        parts = rest.split("/")
        allowed = not {".", ".."} & set(parts) and "" not in parts[:-1] and (rest + "/").startswith(area + "/")
    else:
        allowed = False
    if not allowed:
        raise PermissionDeniedError(
            f"source {source}: a tenant's ingest reads only the stdlib corpus and its own files under "
            f"{UPLOADS_PREFIX}/{tenant}/ in the artifact store; other sources need an admin", param="sources")


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name[name.rfind(".") :].lower() if "." in name else ""


def read_documents(resolved: list[ResolvedSource], *, text_field: str, num_cpus: float):
    """A Ray Dataset with one row per document (`text`), in source and file order."""
    import ray.data

    datasets = []
    for src in resolved:
        kwargs = {"filesystem": src.filesystem, "include_paths": True, "num_cpus": num_cpus}
        if src.format in ("text", "lines", "jsonl", "chat"):
            ds = ray.data.read_binary_files(src.files, **kwargs)
        elif src.format == "parquet":
            ds = ray.data.read_parquet(src.files, **kwargs)
        else:
            ds = ray.data.read_csv(src.files, **kwargs)
        datasets.append(
            ds.map_batches(
                _documents,
                fn_kwargs={"fmt": src.format, "field": text_field, "scheme": src.scheme},
                batch_format="pyarrow",
                batch_size=None,
                num_cpus=num_cpus,
                zero_copy_batch=True,
            )
        )
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])


def _documents(batch: pa.Table, fmt: str, field: str, scheme: str) -> pa.Table:
    paths = batch.column("path").to_pylist()
    texts: list[str] = []
    if fmt in ("text", "lines", "jsonl", "chat"):
        for path, data in zip(paths, batch.column("bytes").to_pylist()):
            texts += _parse_file(f"{scheme}{path}", data, fmt, field)
    else:
        if field not in batch.column_names:
            where = f"{scheme}{paths[0]}" if paths else "the source"
            raise InvalidInputError(f"{where}: no column {field!r} (columns: {', '.join(c for c in batch.column_names if c != 'path')})",
                                    param="text_field")
        for row, (path, value) in enumerate(zip(paths, batch.column(field).to_pylist())):
            if value is None:
                continue
            if not isinstance(value, str):
                raise InvalidInputError(f"{scheme}{path}: column {field!r} holds {type(value).__name__}, not text (row {row})",
                                        param="text_field")
            if value.strip():
                texts.append(value)
    return pa.table({"text": pa.array(texts, type=pa.string())})


def _parse_file(path: str, data: bytes, fmt: str, field: str) -> list[str]:
    if b"\0" in data[:8192]:
        raise InvalidInputError(f"{path}: binary file, not text (contains NUL bytes)", param="sources")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})", param="sources") from None
    if fmt == "text":
        return [text] if text.strip() else []
    if fmt == "lines":
        return [line for line in text.splitlines() if line.strip()]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}:{lineno}: not valid JSON ({exc.msg})", param="sources") from None
        if fmt == "chat":  # the example itself is the document, checked here where its line number is known
            problem = example_problem(record) if isinstance(record, dict) else "each line must be a JSON object"
            if problem:
                raise InvalidInputError(f"{path}:{lineno}: {problem}", param="sources")
            docs.append(line)
            continue
        if not isinstance(record, dict) or field not in record:
            raise InvalidInputError(f"{path}:{lineno}: no {field!r} field in the JSON record", param="text_field")
        value = record[field]
        if not isinstance(value, str):
            raise InvalidInputError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, not a string",
                                    param="text_field")
        if value.strip():
            docs.append(value)
    return docs
