"""The artifact store: the one module that talks to fsspec.

A `Storage` is rooted at a URI (`file:///abs/path` or `s3://bucket/prefix`); every path given
to it is relative to that root and uses `/`. Two guarantees the rest of lmaas builds on:

- **Atomic objects.** `write_bytes`, `put_file` and `writer` make an object visible whole or
  not at all: local files are written beside their target and renamed into place; S3 objects
  are uploaded in one PUT (or one completed multipart upload) from a finished local file.
- **Atomic directories.** `publish_dir` uploads a directory and writes its manifest
  (`_manifest.json`, sha256 and size per file) last. A directory is *published* only when its
  manifest exists; readers go through `read_manifest` / `list_published`, so a writer killed
  mid-publish leaves nothing visible, only garbage for `garbage()` to find. Exactly one of
  several concurrent publishers of a prefix wins: locally the directory is staged under a
  hidden name and renamed into place in one step; on S3 the writer first claims the prefix
  with a conditional PUT (`If-None-Match: *`) of `_claim.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lmaas.errors import AlreadyExistsError, IntegrityError, NotFoundError, UnreachableError

MANIFEST = "_manifest.json"
CLAIM = "_claim.json"
_CHUNK = 1 << 20
_UPLOAD_BATCH = 16
_STAGING = ".staging-"
_TMP = ".tmp-"


def is_safe_relative_path(path: str) -> bool:
    """Whether `path` is a relative POSIX path that stays inside its directory wherever it is joined."""
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and "\\" not in path and "\0" not in path and not any(p in ("", ".", "..") for p in parts)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of a published directory."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """What a published directory holds; written last, so its presence means "complete"."""

    files: tuple[FileEntry, ...]
    created_at: float = field(default_factory=time.time)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def sha256(self) -> str:
        """One hash over every file's path and hash: equal for equal content."""
        digest = hashlib.sha256()
        for entry in sorted(self.files, key=lambda e: e.path):
            digest.update(f"{entry.path}\0{entry.sha256}\n".encode())
        return digest.hexdigest()

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "created_at": self.created_at,
                "sha256": self.sha256,
                "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str = "manifest") -> "Manifest":
        """Parse a stored manifest, refusing one a writer could not have made (it came from storage, so it is untrusted).

        Every entry must be a safe relative path (no absolute path, `..`, `.`, empty part,
        backslash or NUL), listed once, with a 64-hex-digit sha256 and a size >= 0.

        Raises:
            IntegrityError: malformed JSON or an entry breaking those rules (`where` names the manifest).
        """
        try:
            data = json.loads(text)
            entries = tuple(FileEntry(str(f["path"]), str(f["sha256"]), int(f["size"])) for f in data["files"])
            created_at = float(data["created_at"])
        except (ValueError, TypeError, KeyError) as exc:
            raise IntegrityError(f"{where} is not a valid manifest ({type(exc).__name__}): altered") from None
        seen: set[str] = set()
        for entry in entries:
            if not is_safe_relative_path(entry.path) or entry.path in seen:
                raise IntegrityError(f"{where} lists an unsafe or repeated path {entry.path!r}: altered")
            if entry.size < 0 or len(entry.sha256) != 64 or any(c not in "0123456789abcdef" for c in entry.sha256):
                raise IntegrityError(f"{where} has a malformed entry for {entry.path!r}: altered")
            seen.add(entry.path)
        return cls(files=entries, created_at=created_at)

    @classmethod
    def of_dir(cls, local_dir: str | os.PathLike[str]) -> "Manifest":
        """Hash every file under a local directory (the manifest itself excluded)."""
        root = Path(local_dir)
        files = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            if rel not in (MANIFEST, CLAIM):
                files.append(FileEntry(rel, sha256_file(path), path.stat().st_size))
        return cls(files=tuple(files))


def verified(chunks: Iterable[bytes], sha256: str, size: int, mismatch: str) -> Iterator[bytes]:
    """`chunks` passed on, hashed and counted as they go, the last one held back until its hash and size are known.

    Raises (instead of yielding the last chunk):
        IntegrityError(`mismatch`): the bytes are not `size` long or do not hash to `sha256`.
    """
    digest, count, held = hashlib.sha256(), 0, None
    for chunk in chunks:
        digest.update(chunk)
        count += len(chunk)
        if held is not None:
            yield held
        held = chunk
    if count != size or digest.hexdigest() != sha256:
        raise IntegrityError(mismatch)
    if held:
        yield held


class Storage:
    """An artifact store rooted at `file://` or `s3://` URI.

    Args:
        uri: normalized root URI (see `lmaas.config.normalize_storage_uri`).
        endpoint_url: S3-compatible endpoint; None uses AWS (or `AWS_ENDPOINT_URL*`).
        connect_timeout: seconds to wait for an S3 connection.
        max_attempts: S3 request attempts before giving up.
    """

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        connect_timeout: float = 10.0,
        max_attempts: int = 5,
    ) -> None:
        import fsspec

        self.uri = uri.rstrip("/")
        self.endpoint_url = endpoint_url
        self.scheme, _, rest = self.uri.partition("://")
        self.is_local = self.scheme == "file"
        if self.is_local:
            self._root = rest
            self.fs = fsspec.filesystem("file")
        else:
            self._root = rest
            self.fs = fsspec.filesystem(
                "s3",
                use_listings_cache=False,
                skip_instance_cache=True,
                client_kwargs={"endpoint_url": endpoint_url} if endpoint_url else {},
                config_kwargs={
                    "connect_timeout": connect_timeout,
                    "retries": {"max_attempts": max_attempts, "mode": "standard"},
                },
            )

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> "Storage":
        """The store named by `lmaas.config.Settings`."""
        return cls(settings.storage, endpoint_url=settings.s3_endpoint_url, **kwargs)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    # -- paths ---------------------------------------------------------------------------
    def _full(self, path: str = "") -> str:
        path = path.strip("/")
        if any(part in ("..", ".") for part in path.split("/")):
            raise ValueError(f"storage paths are relative and may not contain '.' or '..': {path!r}")
        return f"{self._root}/{path}" if path else self._root

    def url(self, path: str = "") -> str:
        """The full URI of `path` (for logs, manifests and other tools)."""
        full = self._full(path)
        return f"file://{full}" if self.is_local else f"s3://{full}"

    def pyarrow_filesystem(self) -> tuple[Any, str]:
        """A `pyarrow.fs.FileSystem` and root path for Ray Data / Ray Train on this store."""
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem(), self._root
        kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        return pafs.S3FileSystem(**kwargs), self._root

    # -- health --------------------------------------------------------------------------
    def check(self) -> None:
        """Raise `UnreachableError` unless the store can be reached and its root used."""
        try:
            if self.is_local:
                os.makedirs(self._root, exist_ok=True)
                if not os.access(self._root, os.W_OK):
                    raise UnreachableError(f"artifact store {self.uri} is not writable")
                return
            bucket = self._root.split("/", 1)[0]
            try:
                self.fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                raise UnreachableError(f"artifact store {self.uri}: bucket {bucket!r} does not exist; create it first") from None
        except UnreachableError:
            raise
        except Exception as exc:  # noqa: BLE001 - any transport failure means "unreachable"
            where = f" at {self.endpoint_url}" if self.endpoint_url else ""
            if type(exc).__name__ == "NoCredentialsError":
                raise UnreachableError(
                    f"artifact store {self.uri}{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or use an instance profile)"
                ) from None
            raise UnreachableError(f"artifact store {self.uri}{where} is unreachable: {_one_line(exc)}") from None

    # -- objects -------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(self._full(path)))

    def size(self, path: str) -> int:
        try:
            return int(self.fs.size(self._full(path)))
        except FileNotFoundError:
            raise NotFoundError(f"no object {self.url(path)}") from None

    def read_bytes(self, path: str) -> bytes:
        """The whole object. Raises `NotFoundError` if it does not exist."""
        try:
            return self.fs.cat_file(self._full(path))
        except FileNotFoundError:
            raise NotFoundError(f"no object {self.url(path)}") from None

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode()

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[IO[bytes]]:
        """A binary file object for reading `path` (streamed, not loaded whole)."""
        try:
            f = self.fs.open(self._full(path), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"no object {self.url(path)}") from None
        with f:
            yield f

    def checked_chunks(self, path: str, sha256: str, size: int, *, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """An object's bytes as chunks, checked against its recorded `size` and `sha256` on the way.

        The size is checked before the first chunk; the hash as the bytes stream, with the last chunk
        held back until it is known: the iterator raises `IntegrityError` instead of yielding it if
        they differ (a server then breaks the connection short of its Content-Length, so no client
        takes an altered object as complete).

        Raises:
            IntegrityError: the object is missing, of another size, or (while iterating) altered.
        """
        where = self.url(path)
        try:
            stored = self.size(path)
        except NotFoundError:
            raise IntegrityError(f"{where} is missing (it is recorded)") from None
        if stored != size:
            raise IntegrityError(f"{where} has {stored} bytes, {size} are recorded: truncated or altered")

        def chunks() -> Iterator[bytes]:
            with self.open(path) as f:
                yield from iter(lambda: f.read(chunk_size), b"")

        return verified(chunks(), sha256, size, f"{where} does not match its recorded sha256: altered")

    def sha256(self, path: str) -> str:
        """Hex sha256 of a stored object, streamed."""
        digest = hashlib.sha256()
        with self.open(path) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def write_bytes(self, path: str, data: bytes, *, overwrite: bool = True) -> str:
        """Write an object atomically and return its sha256.

        Raises:
            AlreadyExistsError: `overwrite` is False and the object exists.
        """
        with self.writer(path, overwrite=overwrite) as f:
            f.write(data)
        return hashlib.sha256(data).hexdigest()

    def write_text(self, path: str, text: str, *, overwrite: bool = True) -> str:
        return self.write_bytes(path, text.encode(), overwrite=overwrite)

    @contextlib.contextmanager
    def writer(self, path: str, *, overwrite: bool = True) -> Iterator[IO[bytes]]:
        """Stream-write an object; it appears only when the block exits without error.

        The bytes go to a local temporary file first (beside the target for `file://`), which is
        renamed or uploaded in one step at the end; an exception or a killed process leaves the
        target untouched.
        """
        full = self._full(path)
        if not overwrite and self.fs.exists(full):
            raise AlreadyExistsError(f"{self.url(path)} already exists and is immutable")
        if self.is_local:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            tmp_dir = os.path.dirname(full)
        else:
            tmp_dir = None
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f".{os.path.basename(full)}{_TMP}")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            self._commit_file(tmp, full, overwrite=overwrite)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_file(self, local_path: str | os.PathLike[str], path: str, *, overwrite: bool = True) -> str:
        """Upload a local file atomically and return its sha256."""
        full = self._full(path)
        if not overwrite and self.fs.exists(full):
            raise AlreadyExistsError(f"{self.url(path)} already exists and is immutable")
        digest = sha256_file(local_path)
        if self.is_local:
            with self.writer(path, overwrite=overwrite) as f, open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, _CHUNK)
        else:
            self._commit_file(os.fspath(local_path), full, overwrite=overwrite)
        return digest

    def _commit_file(self, local_tmp: str, full: str, *, overwrite: bool) -> None:
        if self.is_local:
            if overwrite:
                os.replace(local_tmp, full)
            else:
                # link() fails if the target appeared meanwhile: no silent overwrite of an immutable file
                try:
                    os.link(local_tmp, full)
                except FileExistsError:
                    raise AlreadyExistsError(f"file://{full} already exists and is immutable") from None
        else:
            # s3fs uploads in one PUT, or a multipart upload completed only after the last part;
            # "create" makes it conditional (If-None-Match: *), so an immutable object is never replaced
            try:
                self.fs.put_file(local_tmp, full, mode="overwrite" if overwrite else "create")
            except FileExistsError:
                raise AlreadyExistsError(f"s3://{full} already exists and is immutable") from None

    def get_file(self, path: str, local_path: str | os.PathLike[str]) -> None:
        """Download an object to a local file (written beside it and renamed into place)."""
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".{local_path.name}{_TMP}{uuid.uuid4().hex[:8]}")
        try:
            self.fs.get_file(self._full(path), str(tmp))
            os.replace(tmp, local_path)
        except FileNotFoundError:
            raise NotFoundError(f"no object {self.url(path)}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        """Paths of every visible object under `prefix`, relative to the root, sorted.

        Temporary and staging files of writers in progress are not listed.
        """
        full = self._full(prefix)
        try:
            found = self.fs.find(full)
        except FileNotFoundError:
            return []
        root_len = len(self._root) + 1
        out = []
        for item in found:
            if item.endswith("/"):  # a "directory" marker object, not a file
                continue
            rel = item[root_len:] if item.startswith(self._root + "/") else item
            if any(_is_temporary(part) for part in rel.split("/")):
                continue
            out.append(rel)
        return sorted(out)

    def delete(self, path: str) -> None:
        """Delete an object or everything under a prefix; missing paths are ignored."""
        if not path.strip("/"):
            raise ValueError("refusing to delete the whole artifact store")
        full = self._full(path)
        if self.fs.exists(full):
            self.fs.rm(full, recursive=True)

    # -- directories ---------------------------------------------------------------------
    def publish_dir(
        self,
        local_dir: str | os.PathLike[str],
        prefix: str,
        *,
        progress: Callable[[str, int], None] | None = None,
    ) -> Manifest:
        """Publish a local directory under `prefix`, all or nothing, and return its manifest.

        Args:
            local_dir: directory to upload (every file under it).
            prefix: destination, relative to the root; must not be published already.
            progress: called with (relative path, bytes) after each file is stored.

        Raises:
            AlreadyExistsError: `prefix` is already published (published directories are immutable).
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise NotFoundError(f"{local_dir} is not a directory")
        manifest = Manifest.of_dir(local_dir)
        if self.read_manifest(prefix) is not None:
            raise AlreadyExistsError(f"{self.url(prefix)} is already published and immutable")
        if self.is_local:
            self._publish_local(local_dir, prefix, manifest, progress)
        else:
            claim = json.dumps({"writer": f"{os.uname().nodename}:{os.getpid()}", "time": time.time()})
            try:
                self.fs.pipe_file(self._full(f"{prefix}/{CLAIM}"), claim.encode(), mode="create")
            except FileExistsError:
                raise AlreadyExistsError(f"{self.url(prefix)} is being or has been published; it is immutable") from None
            # s3fs uploads a batch of files concurrently; progress is reported per finished batch
            for start in range(0, len(manifest.files), _UPLOAD_BATCH):
                batch = manifest.files[start : start + _UPLOAD_BATCH]
                self.fs.put(
                    [str(local_dir / e.path) for e in batch], [self._full(f"{prefix}/{e.path}") for e in batch]
                )
                for entry in batch:
                    if progress:
                        progress(entry.path, entry.size)
            # the manifest goes last: until it exists the directory is not published
            self.write_text(f"{prefix}/{MANIFEST}", manifest.to_json(), overwrite=False)
        return manifest

    def _publish_local(
        self, local_dir: Path, prefix: str, manifest: Manifest, progress: Callable[[str, int], None] | None
    ) -> None:
        final = Path(self._full(prefix))
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".{final.name}{_STAGING}{uuid.uuid4().hex[:8]}"
        try:
            for entry in manifest.files:
                dest = staging / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local_dir / entry.path, dest)
                if progress:
                    progress(entry.path, entry.size)
            (staging / MANIFEST).write_text(manifest.to_json())
            if final.exists() and not any(final.iterdir()):
                final.rmdir()
            try:
                os.rename(staging, final)  # atomic; fails if another writer published first
            except OSError:
                raise AlreadyExistsError(f"{self.url(prefix)} is already published and immutable") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def read_manifest(self, prefix: str) -> Manifest | None:
        """The manifest of a published directory, or None if `prefix` is not published."""
        try:
            raw = self.read_bytes(f"{prefix}/{MANIFEST}")
        except NotFoundError:
            return None
        return Manifest.from_json(raw, where=self.url(f"{prefix}/{MANIFEST}"))

    def list_published(self, prefix: str = "") -> list[str]:
        """Published directories directly or deeply under `prefix` (paths relative to the root)."""
        suffix = f"/{MANIFEST}"
        return [p[: -len(suffix)] for p in self.list(prefix) if p.endswith(suffix)]

    def verify(self, prefix: str) -> Manifest:
        """Check every file of a published directory against its manifest.

        Raises:
            NotFoundError: `prefix` is not published.
            IntegrityError: a file is missing, truncated or altered; the message names it.
        """
        manifest = self.read_manifest(prefix)
        if manifest is None:
            raise NotFoundError(f"{self.url(prefix)} is not a published directory")
        for entry in manifest.files:
            path = f"{prefix}/{entry.path}"
            try:
                size = self.size(path)
            except NotFoundError:
                raise IntegrityError(f"{self.url(path)} is missing (listed in the manifest)") from None
            if size != entry.size:
                raise IntegrityError(f"{self.url(path)} has {size} bytes, manifest says {entry.size}: truncated or altered")
            if self.sha256(path) != entry.sha256:
                raise IntegrityError(f"{self.url(path)} does not match its sha256 in the manifest: altered")
        return manifest

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str], *, manifest: Manifest | None = None) -> Manifest:
        """Download a published directory, verifying each file's sha256 as it lands.

        Args:
            manifest: the manifest to download by, already read and checked by the caller (the
                stored one is not read again); default: the stored one.

        Raises:
            NotFoundError: `prefix` is not published.
            IntegrityError: a downloaded file does not match the manifest (or the manifest is malformed).
        """
        manifest = manifest if manifest is not None else self.read_manifest(prefix)
        if manifest is None:
            raise NotFoundError(f"{self.url(prefix)} is not a published directory")
        local_dir = Path(local_dir)
        for entry in manifest.files:  # a caller's manifest too: nothing lands outside `local_dir`
            if not is_safe_relative_path(entry.path):
                raise IntegrityError(f"{self.url(prefix)}: unsafe path {entry.path!r} in its manifest: altered")
        for start in range(0, len(manifest.files), _UPLOAD_BATCH):
            batch = manifest.files[start : start + _UPLOAD_BATCH]
            for entry in batch:
                (local_dir / entry.path).parent.mkdir(parents=True, exist_ok=True)
            try:  # one concurrent batch on S3
                self.fs.get([self._full(f"{prefix}/{e.path}") for e in batch], [str(local_dir / e.path) for e in batch])
            except FileNotFoundError as exc:
                raise IntegrityError(f"{self.url(prefix)}: a file listed in the manifest is missing ({exc})") from None
            for entry in batch:
                dest = local_dir / entry.path
                if sha256_file(dest) != entry.sha256:
                    dest.unlink()
                    raise IntegrityError(f"{self.url(prefix + '/' + entry.path)} does not match its sha256: altered")
        (local_dir / MANIFEST).write_text(manifest.to_json())
        return manifest

    def garbage(self, prefix: str, *, depth: int = 1) -> list[str]:
        """Leftovers of writers that died under `prefix`, for a collector to delete.

        Args:
            prefix: a collection of published directories.
            depth: how many levels below `prefix` each published directory sits
                (`models/<name>/<version>` is depth 2 under `models`).

        Returns:
            Staging directories and temporary files anywhere under `prefix`, and directories at
            `depth` that hold files but no manifest (an upload that never finished). Published
            directories and plain objects above `depth` are never garbage.
        """
        base = prefix.strip("/")
        full = self._full(base)
        try:
            found = self.fs.find(full)
        except FileNotFoundError:
            return []
        rels = [item[len(full) + 1 :].split("/") for item in found if item.startswith(full + "/")]
        published = {"/".join(parts[:-1]) for parts in rels if parts[-1] == MANIFEST and len(parts) == depth + 1}
        leftovers = set()
        for parts in rels:
            temporary = next((i for i, part in enumerate(parts) if _is_temporary(part)), None)
            if temporary is not None:
                leftovers.add("/".join(parts[: temporary + 1]))
            elif len(parts) > depth and "/".join(parts[:depth]) not in published:
                leftovers.add("/".join(parts[:depth]))
        return sorted(f"{base}/{rel}" if base else rel for rel in leftovers)


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and (_TMP in name or _STAGING in name)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


_GLOB_CHARS = ("*", "?", "[")


def resolve_files(
    source: str, *, endpoint_url: str | None = None, connect_timeout: float = 5.0, max_attempts: int = 2
) -> tuple[Any, list[str]]:
    """Resolve a source (path, directory, glob, `file://` or `s3://` URI) into files to read.

    Directories are walked recursively; hidden files and directories (names starting with `.`)
    are skipped. The list is sorted, so equal trees give equal orders wherever they live.

    Args:
        source: what the user named.
        endpoint_url: S3-compatible endpoint for `s3://` sources (None: AWS or `AWS_ENDPOINT_URL*`).
        connect_timeout: seconds to wait for the S3 endpoint.
        max_attempts: S3 request attempts before giving up.

    Returns:
        A `pyarrow.fs.FileSystem` and the file paths on it (as that filesystem names them).

    Raises:
        NotFoundError: nothing exists at `source` (or the glob matches nothing).
        UnreachableError: the S3 endpoint cannot be reached.
    """
    import glob as globlib

    import pyarrow.fs as pafs

    scheme, sep, rest = source.partition("://")
    if not sep:
        scheme, rest = "file", source
    if scheme == "file":
        path = os.path.expanduser(rest)
        if any(c in path for c in _GLOB_CHARS):
            files = [p for p in globlib.glob(path, recursive=True) if os.path.isfile(p)]
        elif os.path.isdir(path):
            files = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                files += [os.path.join(root, n) for n in names if not n.startswith(".")]
        elif os.path.isfile(path):
            files = [path]
        else:
            raise NotFoundError(f"source {source}: no such file or directory")
        if not files:
            raise NotFoundError(f"source {source}: no files found")
        return pafs.LocalFileSystem(), sorted(os.path.abspath(f) for f in files)
    if scheme != "s3":
        raise NotFoundError(f"source {source}: unsupported scheme {scheme!r}; use a path, file:// or s3://")
    store = Storage(f"s3://{rest.split('/', 1)[0]}", endpoint_url=endpoint_url, connect_timeout=connect_timeout,
                    max_attempts=max_attempts)
    fs = store.fs
    try:
        if any(c in rest for c in _GLOB_CHARS):
            files = [f for f in fs.glob(rest) if not f.endswith("/")]
        elif fs.isdir(rest):
            files = [f for f in fs.find(rest) if not f.endswith("/")]
        elif fs.exists(rest):
            files = [rest]
        else:
            raise NotFoundError(f"source {source}: no such object or prefix")
    except NotFoundError:
        raise
    except FileNotFoundError:
        raise NotFoundError(f"source {source}: no such object or prefix") from None
    except Exception as exc:  # noqa: BLE001 - any transport failure means "unreachable"
        where = f" at {endpoint_url}" if endpoint_url else ""
        raise UnreachableError(f"source {source}{where} is unreachable: {_one_line(exc)}") from None
    files = [f for f in files if not any(part.startswith(".") for part in f.split("/")[1:])]
    if not files:
        raise NotFoundError(f"source {source}: no files found")
    pa_fs, _ = store.pyarrow_filesystem()
    return pa_fs, sorted(files)
