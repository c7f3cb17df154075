"""`ModelRegistry`: model versions in the artifact store, their metadata in the database.

Registration is upload-then-commit:

1. the files are checked (safetensors only, safe paths), published under a fresh, unique prefix
   `models/<name>/<upload id>` with `Storage.publish_dir` (manifest written last) and re-verified
   against the local hashes; the upload is recorded in `model_uploads` so gc leaves it alone;
2. one database transaction locks the model's counter row (SQLite: `BEGIN IMMEDIATE`;
   PostgreSQL: `SELECT ... FOR UPDATE`), takes the next version number and inserts the version
   row pointing at that prefix.

A reader sees a version only after step 2, so never a half-registered one, and numbers are
consecutive because they are allocated only once the upload has succeeded. A writer killed
between the steps leaves an unreferenced prefix that `gc()` deletes after a grace period.

Tenancy is enforced here, not only by the HTTP routers: every method that reads or changes a
model takes the caller's `tenant` (None: an admin or the operator's own CLI, which sees and
changes everything). A tenant sees its own models and public ones; another tenant's private
model answers exactly as a missing one (`NotFoundError`, same message); a public model of
another tenant is read-only (`PermissionDeniedError`). Model names are global, so registering
under a name another tenant holds is refused (`AlreadyExistsError`: the name is taken) and
reveals only that the name is in use. A `parent` must be visible to the caller.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import io
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from lmaas import db
from lmaas.db.schema import deployments, model_aliases, model_uploads, model_version_parents, model_versions, registered_models
from lmaas.errors import AlreadyExistsError, ConfigError, IntegrityError, InvalidInputError, NotFoundError, PermissionDeniedError
from lmaas.models.adapter import check_adapter
from lmaas.models.hf import check_causal_lm
from lmaas.registry.entities import (
    ARCHIVED,
    READY,
    TASKS,
    Alias,
    Lineage,
    ModelFile,
    ModelVersion,
    RegisteredModel,
    signing_payload,
)
from lmaas.registry import sealing
from lmaas.registry.usage import check_storage_quota
from lmaas.registry.refs import DEFAULT_ALIAS, ModelRef, parse_ref, validate_alias, validate_file_path, validate_model_name
from lmaas.storage import MANIFEST, FileEntry, Manifest, Storage, verified

MODELS_PREFIX = "models"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
"""Weights formats that unpickle (or may) on load: refused at registration."""
MAX_FILE_BYTES = 64 << 30
"""Largest file one version may hold (an upload declaring more is refused before anything is stored)."""
STREAM_ABOVE_BYTES = 8 << 20
"""Files at least this big are sent in chunks, hashed as they go (`stream_file`); smaller ones are checked whole first."""
SIGNING_KEY_ENV = "LMAAS_SIGNING_KEY"
VERIFY_KEY_ENV = "LMAAS_VERIFY_KEY"
REQUIRE_SIGNATURE_ENV = "LMAAS_REQUIRE_SIGNATURE"
DeploymentsOf = Callable[[str, int], list[str]]


def _scoped(method: Callable[..., Any]) -> Callable[..., Any]:
    """Make a method's keyword `tenant` the registry's own when it acts for one (`acting_for`)."""

    @functools.wraps(method)
    def scoped(self: "ModelRegistry", *args: Any, **kwargs: Any) -> Any:
        if self.tenant is not None:
            kwargs["tenant"] = self.tenant
        return method(self, *args, **kwargs)

    return scoped


def no_deployments(_name: str, _version: int) -> list[str]:
    """The deployment lookup until `serve` records deployments: nothing is deployed."""
    return []


class ModelRegistry:
    """Register, resolve, load and manage model versions.

    Args:
        storage: the artifact store holding version files.
        engine: SQLAlchemy engine of the metadata database (migrated; see `lmaas.db.connect`).
        signing_key: raw 32-byte Ed25519 private key; versions registered here are signed with it.
        verify_key: raw 32-byte Ed25519 public key; signatures are checked on load with it.
        require_signature: refuse to load a version without a valid signature.
        deployments_of: `(name, version) -> [deployment names]`; deleting a deployed version is refused.
        encryption_key: 32-byte AES-256 key; versions registered here are stored encrypted
            (AES-GCM, client side) and encrypted versions are decrypted on load.
        actor: who the events this registry records name as their actor (see `as_actor`).
    """

    def __init__(
        self,
        storage: Storage,
        engine: Engine,
        *,
        signing_key: bytes | None = None,
        verify_key: bytes | None = None,
        require_signature: bool = False,
        deployments_of: DeploymentsOf = no_deployments,
        encryption_key: bytes | None = None,
        actor: str = "registry",
    ) -> None:
        self.actor = actor
        self.storage = storage
        if encryption_key is not None and len(encryption_key) != 32:
            raise ConfigError("the encryption key must be 32 bytes (AES-256)", param="encryption_key")
        self.encryption_key = encryption_key
        self.engine = engine
        self._signer = _private_key(signing_key) if signing_key else None
        if verify_key is None and self._signer is not None:
            verify_key = _public_bytes(self._signer)
        self._verifier = _public_key(verify_key) if verify_key else None
        if require_signature and self._verifier is None:
            raise ConfigError(f"a signature is required but no verify key is set; set {VERIFY_KEY_ENV}", param="verify_key")
        self.require_signature = require_signature
        self.deployments_of = deployments_of
        self.tenant: str | None = None
        """The tenant every call acts for (see `acting_for`); None: each call's own `tenant`."""

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> "ModelRegistry":
        """The registry of `lmaas.config.Settings`, with signing keys from the environment (see `configured`)."""
        return cls.configured(Storage.from_settings(settings), db.connect(settings.database_url), **kwargs)

    @classmethod
    def configured(cls, storage: Storage, engine: Engine, **kwargs: Any) -> "ModelRegistry":
        """The registry over `storage` and `engine` with the keys this process's environment sets.

        Every path that registers or loads a version builds its registry here (or with
        `from_settings`), so signing, verification and encryption apply everywhere.
        `LMAAS_SIGNING_KEY` / `LMAAS_VERIFY_KEY` hold hex Ed25519 keys (32 bytes each);
        `LMAAS_REQUIRE_SIGNATURE=1` refuses unsigned versions on load. `LMAAS_ENCRYPTION_KEY`
        (hex, 32 bytes) or `LMAAS_ENCRYPTION_KEY_FILE` (a file holding it) turns on encryption at rest.
        """
        keys = {
            "encryption_key": _encryption_key_from_env(),
            "signing_key": _hex_env(SIGNING_KEY_ENV),
            "verify_key": _hex_env(VERIFY_KEY_ENV),
            "require_signature": os.environ.get(REQUIRE_SIGNATURE_ENV, "").lower() in ("1", "true", "yes"),
        }
        return cls(storage, engine, **{**keys, **kwargs})

    def acting_for(self, tenant: str) -> "ModelRegistry":
        """This registry, acting for `tenant` in every call whatever the call's own `tenant` says.

        What a queued job or a tenant's request runs with: everything it resolves is what `tenant`
        may see, everything it registers belongs to `tenant`, and it changes only `tenant`'s models.
        """
        clone = copy.copy(self)
        clone.tenant = tenant
        return clone

    def as_actor(self, actor: str) -> "ModelRegistry":
        """This registry, recording `actor` (e.g. `key:<id>`) in the audit log for what it changes."""
        clone = copy.copy(self)
        clone.actor = actor
        return clone

    def _event(self, conn: Connection, action: str, target: str, *, tenant: str | None, detail: dict | None = None) -> None:
        """Record a registry event inside the caller's transaction."""
        db.record_event(conn, actor=self.actor, action=action, target=target, tenant=tenant, detail=detail)

    # -- registration --------------------------------------------------------------------
    @_scoped
    def register_version(
        self,
        name: str,
        local_dir: str | os.PathLike[str],
        *,
        task: str,
        parent: str | None = None,
        parents: list[str] | None = None,
        dataset: str | None = None,
        dataset_sha256: str | None = None,
        run: str | None = None,
        metrics: dict[str, float] | None = None,
        description: str = "",
        tenant: str | None = None,
        owner: str | None = None,
        expected_sha256: dict[str, str] | None = None,
        progress: Callable[[str, int], None] | None = None,
    ) -> ModelVersion:
        """Upload a local model directory and make it the next version of `name`.

        Args:
            name: model name (created on first registration).
            local_dir: directory of the version's files (weights as `.safetensors`).
            task: `causal-lm`, `embedding`, ... (see `entities.TASKS`).
            parent: reference of the version this one derives from (compression, distillation; an
                adapter's base causal LM, which an `adapter` must name).
            parents: every version it derives from, in order, when several (a weight merge); `parent`
                is then left out or equal to the first.
            dataset: the dataset version it was trained on, e.g. `wiki:3`.
            dataset_sha256: the dataset's content hash, if known.
            run: the training/compression run that produced it.
            metrics: evaluation numbers to keep with it.
            tenant: the caller's tenant: `name` must be free or its own, `parent` visible to it, and
                a new model belongs to it (None: an admin, who may add to any model).
            owner: who a model created here belongs to (default: `tenant`, else `default`).
            expected_sha256: `{path: sha256}` the caller expects (an upload's claimed hashes).
            progress: called with (path, bytes) as each file is stored.

        Returns:
            The new, visible version.

        Raises:
            InvalidInputError: bad name, task or file (pickle weights, unsafe path, hash mismatch).
            NotFoundError: `local_dir` or `parent` does not exist (or `parent` is invisible to `tenant`).
            AlreadyExistsError: another tenant holds the name `name`.
            PermissionDeniedError: `name` is another tenant's public model (read-only to `tenant`).
            IntegrityError: the uploaded files do not match the local ones.
        """
        _check_task(task)
        parents = _parents(parent, parents)
        if task == "causal-lm":
            check_causal_lm_dir(local_dir)  # a directory transformers and vLLM load, before anything is uploaded
        # fail before uploading anything; `commit` checks both again under the model's lock
        self.check_writable(name, tenant=tenant, create=True)
        for ref in parents:
            self._check_parent(ref, tenant)
        if task == "adapter":
            root = Path(local_dir)
            if not root.is_dir():
                raise NotFoundError(f"{local_dir} is not a directory", param="dir")
            paths = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
            check_adapter(paths, lambda path: (root / path).read_bytes(), lambda path: _check_safetensors(root / path, path),
                          self._base_header(parents, tenant))
        self._check_room(name, local_dir, owner or tenant or "default")
        staged = self.stage(name, local_dir, expected_sha256=expected_sha256, progress=progress)
        try:
            return self.commit(
                staged,
                task=task,
                parents=parents,
                dataset=dataset,
                dataset_sha256=dataset_sha256,
                run=run,
                metrics=metrics,
                description=description,
                tenant=tenant,
                owner=owner,
            )
        except Exception:
            self.abandon(staged)
            raise

    def _check_room(self, name: str, local_dir: str | os.PathLike[str], owner: str) -> None:
        """Refuse, before uploading anything, a version that would not fit its tenant's storage quota (`commit` checks again)."""
        root = Path(local_dir)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
        with self.engine.connect() as conn:
            held = conn.execute(sa.select(registered_models.c.tenant).where(registered_models.c.name == name)).scalar()
            check_storage_quota(conn, held or owner, size, param="files")

    def abandon(self, staged: "StagedUpload") -> None:
        """Delete a staged upload that will never be committed (best effort; gc catches the rest)."""
        try:
            with self.engine.connect() as conn:
                if conn.execute(sa.select(model_versions.c.id).where(model_versions.c.prefix == staged.prefix)).first():
                    return  # it did commit (the error came later): keep it
            self.storage.delete(staged.prefix)
            with self.engine.begin() as conn:
                conn.execute(model_uploads.delete().where(model_uploads.c.prefix == staged.prefix))
        except Exception:  # noqa: BLE001 - the original error matters more; gc collects leftovers
            pass

    def stage(
        self,
        name: str,
        local_dir: str | os.PathLike[str],
        *,
        expected_sha256: dict[str, str] | None = None,
        progress: Callable[[str, int], None] | None = None,
    ) -> "StagedUpload":
        """Step 1 of registration: check, upload and verify files; nothing is visible yet."""
        validate_model_name(name)
        manifest = check_model_dir(local_dir, expected_sha256=expected_sha256)
        prefix = f"{MODELS_PREFIX}/{name}/{uuid.uuid4().hex}"
        with self.engine.begin() as conn:
            conn.execute(model_uploads.insert().values(prefix=prefix, name=name, created_at=time.time()))
        if self.encryption_key is None:
            published = self.storage.publish_dir(local_dir, prefix, progress=progress)
        else:
            with tempfile.TemporaryDirectory(prefix="lmaas-encrypt-") as sealed:
                for entry in manifest.files:
                    dest = Path(sealed) / entry.path
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with open(Path(local_dir) / entry.path, "rb") as src, open(dest, "wb") as out:
                        sealing.seal(self.encryption_key, entry.path, src, out)
                published = self.storage.publish_dir(sealed, prefix, progress=progress)
        stored = self.storage.verify(prefix)
        if stored.sha256 != published.sha256:
            raise IntegrityError(f"{self.storage.url(prefix)}: uploaded files differ from what was sent")
        if self.encryption_key is None and stored.sha256 != manifest.sha256:
            raise IntegrityError(f"{self.storage.url(prefix)}: uploaded files differ from {local_dir} (changed during upload?)")
        # the database records plaintext hashes, so integrity checks hold through encryption
        return StagedUpload(name=name, prefix=prefix, manifest=manifest, encrypted=self.encryption_key is not None)

    @_scoped
    def commit(
        self,
        staged: "StagedUpload",
        *,
        task: str,
        parent: str | None = None,
        parents: list[str] | None = None,
        dataset: str | None = None,
        dataset_sha256: str | None = None,
        run: str | None = None,
        metrics: dict[str, float] | None = None,
        description: str = "",
        tenant: str | None = None,
        owner: str | None = None,
    ) -> ModelVersion:
        """Step 2 of registration: allocate the next version number and make it visible, atomically.

        `tenant` and `owner` as for `register_version`; ownership is checked under the model's lock.
        """
        _check_task(task)
        parents = _parents(parent, parents)
        metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        files = [ModelFile(f.path, f.sha256, f.size).to_dict() for f in staged.manifest.files]
        with self.engine.begin() as conn:
            parent_rows = []
            for ref in parents:
                self._visible(conn, parse_ref(ref).name, tenant, param="parent")
                parent_rows.append(self._version_row(conn, ref))
            if task == "adapter" and parent_rows[0]["task"] != "causal-lm":
                raise InvalidInputError(f"an adapter's parent is its base causal LM; {parents[0]} is a {parent_rows[0]['task']} model",
                                        param="parent")
            parent_id = parent_rows[0]["id"] if parent_rows else None
            model = self._lock_model(conn, staged.name, owner=owner or tenant or "default", tenant=tenant)
            check_storage_quota(conn, model["tenant"], staged.manifest.size, param="files")
            number = model["last_version"] + 1
            signature = None
            if self._signer is not None:
                payload = signing_payload(staged.name, number, staged.manifest.sha256)
                signature = self._signer.sign(payload).hex()
            conn.execute(
                registered_models.update().where(registered_models.c.id == model["id"]).values(last_version=number)
            )
            conn.execute(
                model_versions.insert().values(
                    model_id=model["id"],
                    version=number,
                    status=READY,
                    task=task,
                    prefix=staged.prefix,
                    files=files,
                    manifest_sha256=staged.manifest.sha256,
                    size_bytes=staged.manifest.size,
                    created_at=time.time(),
                    run=run,
                    dataset=dataset,
                    dataset_sha256=dataset_sha256,
                    parent_id=parent_id,
                    metrics=metrics,
                    description=description,
                    signature=signature,
                    encrypted=staged.encrypted,
                )
            )
            if len(parent_rows) > 1:
                version_id = conn.execute(sa.select(model_versions.c.id).where(model_versions.c.prefix == staged.prefix)).scalar_one()
                conn.execute(model_version_parents.insert(), [
                    {"version_id": version_id, "position": i, "parent_id": row["id"]} for i, row in enumerate(parent_rows[1:], start=1)
                ])
            conn.execute(model_uploads.delete().where(model_uploads.c.prefix == staged.prefix))
            self._event(conn, "model.register", f"{staged.name}:{number}", tenant=model["tenant"], detail={"prefix": staged.prefix})
        return self.get_version(staged.name, number)

    # -- two-step upload (the REST API's presigned-style path) ----------------------------
    @_scoped
    def begin_upload(self, name: str, files: list[ModelFile], *, tenant: str | None = None) -> str:
        """Open a two-step upload: declare the files, PUT each with `put_upload_file`, then `commit_upload`.

        The files land under a fresh prefix `models/<name>/<upload id>` recorded in `model_uploads`,
        so until it is committed or aborted `gc()` treats it as an upload in progress (kept for the
        grace period, then collected).

        Args:
            name: model name (created at commit if new).
            files: every file of the version with its size and sha256.
            tenant: the caller's tenant (None: an admin); `name` must be free or its own. The
                upload's later calls take the same `tenant`; to another tenant it does not exist.

        Returns:
            The upload id.

        Raises:
            InvalidInputError: bad name, no files, a file listed twice, an unsafe path, pickle-format
                weights, a negative size, a file over `MAX_FILE_BYTES` or a malformed sha256.
            AlreadyExistsError / PermissionDeniedError: as for `register_version`.
        """
        self.check_writable(name, tenant=tenant, create=True)
        if not files:
            raise InvalidInputError("an upload needs at least one file", param="files")
        declared: dict[str, dict[str, Any]] = {}
        for f in files:
            path = validate_file_path(f.path)
            if path in declared:
                raise InvalidInputError(f"file {path!r} listed twice", param="files")
            _check_weights_format(path)
            if f.size < 0:
                raise InvalidInputError(f"{path}: size must not be negative", param="files")
            if f.size > MAX_FILE_BYTES:
                raise InvalidInputError(f"{path}: {f.size:,} bytes is over the {MAX_FILE_BYTES:,}-byte limit per file", param="files")
            digest = f.sha256.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise InvalidInputError(f"{path}: sha256 must be 64 hex digits", param="files")
            declared[path] = {"size": int(f.size), "sha256": digest}
        upload_id = uuid.uuid4().hex
        with self.engine.begin() as conn:
            conn.execute(
                model_uploads.insert().values(prefix=f"{MODELS_PREFIX}/{name}/{upload_id}", name=name, created_at=time.time(), files=declared,
                                              tenant=tenant)
            )
            self._event(conn, "upload.begin", f"{name}/{upload_id}", tenant=tenant, detail={"files": len(declared)})
        return upload_id

    @_scoped
    def put_upload_file(self, upload_id: str, path: str, data: BinaryIO, *, tenant: str | None = None) -> ModelFile:
        """Store one declared file of an open upload, checking its size and sha256 as it lands.

        Sending a file again replaces it. Nothing is visible until `commit_upload`.

        Raises:
            NotFoundError: no open upload `upload_id`.
            AlreadyExistsError: the upload is already committed.
            InvalidInputError: `path` was not declared, or the bytes do not match its declared size
                or sha256, or a `.safetensors` file is not safetensors (nothing is kept).
        """
        upload = self._open_upload(upload_id, tenant=tenant)
        expected = upload["files"].get(path)
        if expected is None:
            raise InvalidInputError(f"{path}: not a file of upload {upload_id}; declare it when the upload begins", param="path")
        target = f"{upload['prefix']}/{path}"
        key = self.encryption_key
        with self.storage.writer(target) as out:  # sealed as it streams when encryption is on: one segment in memory
            sink = out if key is None else sealing.SealingWriter(key, path, out)
            _copy_checked(data, sink, path, expected)
            if key is not None:
                sink.close()  # its last segment
        if path.endswith(".safetensors"):
            try:
                with self.storage.open(target) as f:
                    plain = f if key is None else sealing.UnsealingReader(sealing.unsealed(key, path, f, self.storage.url(target)))
                    _check_safetensors_header(plain, expected["size"], path)
            except InvalidInputError:
                self.storage.delete(target)
                raise
        return ModelFile(path, expected["sha256"], expected["size"])

    @_scoped
    def commit_upload(self, upload_id: str, *, task: str, tenant: str | None = None, **details: Any) -> ModelVersion:
        """Verify that every declared file of an upload arrived intact and register it as the next version.

        Args:
            upload_id: from `begin_upload`.
            task, tenant, **details: as for `commit` (parent, dataset, dataset_sha256, run, metrics, description, owner).

        Raises:
            NotFoundError: no open upload `upload_id`.
            AlreadyExistsError: the upload is already committed (or a commit of it is in progress).
            InvalidInputError: a declared file was never sent, or the task is unknown.
            IntegrityError: a stored file no longer matches what was sent.
        """
        _check_task(task)
        upload = self._open_upload(upload_id, tenant=tenant)
        details["parents"] = _parents(details.pop("parent", None), details.get("parents"))
        for ref in details["parents"]:
            self._check_parent(ref, tenant)
        prefix = upload["prefix"]
        plain, stored = [], []
        for path, expected in sorted(upload["files"].items()):
            target = f"{prefix}/{path}"
            if not self.storage.exists(target):
                raise InvalidInputError(f"{path}: declared but never uploaded; PUT it before committing", param="files")
            if self.encryption_key is None:
                digest = self.storage.sha256(target)
                stored.append(FileEntry(path, digest, self.storage.size(target)))
            else:
                stored.append(FileEntry(path, self.storage.sha256(target), self.storage.size(target)))
                plain_digest = hashlib.sha256()
                with self.storage.open(target) as f:
                    for chunk in sealing.unsealed(self.encryption_key, path, f, self.storage.url(target)):
                        plain_digest.update(chunk)
                digest = plain_digest.hexdigest()
            if digest != expected["sha256"]:
                raise IntegrityError(f"{self.storage.url(target)} does not match the sha256 it was uploaded with: altered")
            plain.append(FileEntry(path, expected["sha256"], expected["size"]))
        # the manifest goes last and never over another: a second commit of the same upload stops here
        try:
            self.storage.write_text(f"{prefix}/{MANIFEST}", Manifest(tuple(stored)).to_json(), overwrite=False)
        except AlreadyExistsError:
            raise AlreadyExistsError(f"upload {upload_id} is already being committed", param="upload_id") from None
        staged = StagedUpload(name=upload["name"], prefix=prefix, manifest=Manifest(tuple(plain)), encrypted=self.encryption_key is not None)
        try:
            if task == "causal-lm":
                self._check_staged_causal_lm(staged)
            if task == "adapter":
                check_adapter([e.path for e in staged.manifest.files], lambda path: self._read_staged(staged, path),
                              lambda path: self._stored_header(f"{staged.prefix}/{path}", path, staged.encrypted),
                              self._base_header(details["parents"], tenant))
            return self.commit(staged, task=task, tenant=tenant, **details)
        except Exception:
            # the files stay staged: drop the manifest so the client can fix the request and commit again
            if not self._is_committed(prefix):
                self.storage.delete(f"{prefix}/{MANIFEST}")
            raise

    def _check_staged_causal_lm(self, staged: "StagedUpload") -> None:
        """`models.hf.check_causal_lm` on an upload's stored files (decrypted where sealed)."""
        check_causal_lm([e.path for e in staged.manifest.files], lambda path: self._read_staged(staged, path),
                        lambda path: self._stored_header(f"{staged.prefix}/{path}", path, staged.encrypted))

    def _read_staged(self, staged: "StagedUpload", path: str) -> bytes:
        data = self.storage.read_bytes(f"{staged.prefix}/{path}")
        return sealing.open_whole(self.encryption_key, path, data, path) if staged.encrypted else data

    def _stored_header(self, target: str, path: str, encrypted: bool) -> dict[str, Any]:
        """The JSON header of a stored safetensors file (decrypting only its first chunks where sealed)."""
        with self.storage.open(target) as f:
            if not encrypted:
                return _check_safetensors_header(f, self.storage.size(target), path)
            head = b""
            for chunk in sealing.unsealed(self.encryption_key, path, f, path):  # the header is at the start
                head += chunk
                if len(head) >= 8 and len(head) >= 8 + int.from_bytes(head[:8], "little"):
                    break
            return _check_safetensors_header(io.BytesIO(head), len(head), path)

    def _base_header(self, parents: list[str], tenant: str | None) -> dict[str, Any]:
        """The tensor shapes of an adapter's base model (its first parent), from its stored safetensors headers.

        Raises:
            InvalidInputError: no parent, or one that is not a causal LM.
        """
        if not parents:
            raise InvalidInputError("an adapter needs its base model as parent (--parent NAME:VERSION)", param="parent")
        base = self.resolve(parents[0], tenant=tenant)
        if base.task != "causal-lm":
            raise InvalidInputError(f"an adapter's parent is its base causal LM; {base.ref} is a {base.task} model", param="parent")
        header: dict[str, Any] = {}
        for entry in base.files:
            if entry.path.endswith(".safetensors"):
                header.update(self._stored_header(f"{base.prefix}/{entry.path}", entry.path, base.encrypted))
        return header

    @_scoped
    def abort_upload(self, upload_id: str, *, tenant: str | None = None) -> None:
        """Delete an open upload and its files.

        Raises:
            NotFoundError: no open upload `upload_id` (or one of another tenant's).
            AlreadyExistsError: it is already committed (delete the version instead).
        """
        upload = self._open_upload(upload_id, tenant=tenant)
        with self.engine.begin() as conn:
            conn.execute(model_uploads.delete().where(model_uploads.c.prefix == upload["prefix"]))
            self._event(conn, "upload.abort", f"{upload['name']}/{upload_id}", tenant=None)
        self.storage.delete(upload["prefix"])

    @_scoped
    def upload_name(self, upload_id: str, *, tenant: str | None = None) -> str:
        """The model an open upload is for. Raises `NotFoundError` / `AlreadyExistsError` as `commit_upload` does."""
        return self._open_upload(upload_id, tenant=tenant)["name"]

    def _open_upload(self, upload_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        """The open upload's row; one `tenant` could not have begun (the name is not its own or free) is missing."""
        if len(upload_id) != 32 or any(c not in "0123456789abcdef" for c in upload_id):
            raise NotFoundError(f"no upload {upload_id!r}", param="upload_id")
        pattern = f"{MODELS_PREFIX}/%/{upload_id}"
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(model_uploads).where(model_uploads.c.prefix.like(pattern), model_uploads.c.files.is_not(None))
            ).mappings().first()
            if row is None:
                if conn.execute(sa.select(model_versions.c.id).where(model_versions.c.prefix.like(pattern))).first():
                    raise AlreadyExistsError(f"upload {upload_id} is already committed", param="upload_id")
                raise NotFoundError(f"no upload {upload_id!r} (never begun, aborted, or collected after its grace period)", param="upload_id")
            if tenant is not None:
                model = self._model_row(conn, row["name"])
                if row["tenant"] != tenant or (model is not None and model.tenant != tenant):
                    raise NotFoundError(f"no upload {upload_id!r} (never begun, aborted, or collected after its grace period)", param="upload_id")
        return dict(row)

    def _is_committed(self, prefix: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(model_versions.c.id).where(model_versions.c.prefix == prefix)).first() is not None

    def _lock_model(self, conn: Connection, name: str, *, owner: str, tenant: str | None) -> dict[str, Any]:
        """The model's row, created for `owner` if missing, locked until the transaction ends.

        Raises (rolling the transaction back) unless `tenant` may add versions to it, as `check_writable`.
        """
        values = dict(name=name, tenant=owner, description="", tags={}, created_at=time.time(), last_version=0)
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        # a concurrent creator makes this wait for its commit, then do nothing
        conn.execute(insert(registered_models).values(**values).on_conflict_do_nothing(index_elements=["name"]))
        query = sa.select(registered_models).where(registered_models.c.name == name)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = dict(conn.execute(query).mappings().one())
        _check_owner(name, row["tenant"], bool(row["public"]), tenant, create=True)
        return row

    # -- ownership -----------------------------------------------------------------------
    @_scoped
    def check_writable(self, name: str, *, tenant: str | None = None, create: bool = False, param: str = "name") -> RegisteredModel | None:
        """Refuse a change to model `name` unless `tenant` owns it (None: an admin, who may change any).

        Args:
            create: the change may create the model (a registration): a free name is fine.
            param: the field named by the errors.

        Returns:
            The model, or None when it does not exist (only with `create`).

        Raises:
            NotFoundError: no such model, or another tenant's private one (the same message either way).
            PermissionDeniedError: another tenant's public model (shared read-only).
            AlreadyExistsError: with `create`, another tenant's private model holds the name.
        """
        validate_model_name(name)
        with self.engine.connect() as conn:
            row = self._writable(conn, name, tenant, create=create, param=param)
        return None if row is None else _model(row._mapping)

    def _check_parent(self, parent: str, tenant: str | None) -> None:
        """NotFoundError naming `parent` unless it resolves to a version `tenant` may see."""
        try:
            self.resolve(parent, tenant=tenant)
        except NotFoundError as exc:
            raise NotFoundError(f"parent: {exc.message}", param="parent") from None

    def _model_row(self, conn: Connection, name: str) -> Any:
        return conn.execute(sa.select(registered_models).where(registered_models.c.name == name)).first()

    def _writable(self, conn: Connection, name: str, tenant: str | None, *, create: bool = False, param: str) -> Any:
        """`check_writable` inside the caller's transaction: the model's row (None: free, with `create`)."""
        row = self._model_row(conn, name)
        if row is None:
            if create:
                return None
            raise NotFoundError(f"no model named {name!r}", param=param)
        _check_owner(name, row.tenant, bool(row.public), tenant, create=create, param=param)
        return row

    def _visible(self, conn: Connection, name: str, tenant: str | None, *, param: str = "model") -> None:
        """NotFoundError unless `tenant` may see model `name` (its own or public; None sees all)."""
        row = self._model_row(conn, name)
        if row is None or not _sees(tenant, row._mapping):
            raise NotFoundError(f"no model named {name!r}", param=param)

    # -- reading -------------------------------------------------------------------------
    @_scoped
    def get_model(self, name: str, *, tenant: str | None = None) -> RegisteredModel:
        """A registered model by name.

        Args:
            tenant: only a model this tenant owns, or a public one (None: any model).

        Raises:
            NotFoundError: no such model, or (with `tenant`) one the tenant may not see: the
                message is the same either way, so another tenant's names do not leak.
        """
        validate_model_name(name)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(registered_models).where(registered_models.c.name == name)).mappings().first()
        if row is None or not _model(row).visible_to(tenant):
            raise NotFoundError(f"no model named {name!r}", param="name")
        return _model(row)

    @_scoped
    def list_models(self, *, search: str | None = None, tenant: str | None = None, offset: int = 0, limit: int = 100) -> list[RegisteredModel]:
        """Registered models sorted by name; `search` matches a substring of the name.

        Args:
            tenant: only models this tenant owns, plus public ones (None: every model).
        """
        query = sa.select(registered_models).order_by(registered_models.c.name).offset(offset).limit(limit)
        if search:
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(registered_models.c.name.like(f"%{escaped}%", escape="\\"))
        if tenant is not None:
            query = query.where(sa.or_(registered_models.c.tenant == tenant, registered_models.c.public.is_(True)))
        with self.engine.connect() as conn:
            return [_model(r) for r in conn.execute(query).mappings()]

    def set_public(self, name: str, public: bool) -> RegisteredModel:
        """Share a model with every tenant (read and inference), or make it private to its owner again (admins only)."""
        if self.tenant is not None:
            raise PermissionDeniedError("only an admin makes a model public or private", param="public")
        with self.engine.begin() as conn:
            model = self._require_model(conn, validate_model_name(name))
            conn.execute(registered_models.update().where(registered_models.c.id == model.id).values(public=bool(public)))
            self._event(conn, "model.public" if public else "model.private", name, tenant=model.tenant)
        return self.get_model(name)

    @_scoped
    def list_versions(
        self, name: str, *, offset: int = 0, limit: int = 100, status: str | None = None, tenant: str | None = None
    ) -> list[ModelVersion]:
        """Versions of a model, newest first. Raises `NotFoundError` for an unknown (or, with `tenant`, invisible) model."""
        self.get_model(name, tenant=tenant)
        query = self._versions_query().where(registered_models.c.name == name).order_by(model_versions.c.version.desc())
        if status:
            query = query.where(model_versions.c.status == status)
        with self.engine.connect() as conn:
            return [_seen(self._version(conn, r), tenant) for r in conn.execute(query.offset(offset).limit(limit)).mappings()]

    @_scoped
    def get_version(self, name: str, version: int, *, tenant: str | None = None) -> ModelVersion:
        """One version by number. Raises `NotFoundError`."""
        return self.resolve(ModelRef(validate_model_name(name), version=int(version)), tenant=tenant)

    @_scoped
    def resolve(self, ref: str | ModelRef, *, tenant: str | None = None) -> ModelVersion:
        """The version a reference names: `name`, `name:7` or `name@alias`.

        A bare `name` means its `production` alias if set, else its latest ready version.

        Args:
            tenant: only a model this tenant owns, or a public one (None: any model). Another
                tenant's public version comes without its training lineage (`dataset`,
                `dataset_sha256`, `run`): those name its owner's private data.

        Raises:
            InvalidInputError: a malformed reference.
            NotFoundError: no such model, version or alias (or a model `tenant` may not see).
        """
        if tenant is not None:
            self.get_model(parse_ref(ref).name, tenant=tenant)
        with self.engine.connect() as conn:
            return _seen(self._version(conn, self._version_row(conn, ref)), tenant)

    @_scoped
    def aliases(self, name: str, *, tenant: str | None = None) -> list[Alias]:
        """Every alias of a model, by alias name."""
        self.get_model(name, tenant=tenant)
        query = (
            sa.select(model_aliases.c.alias, model_aliases.c.updated_at, model_versions.c.version)
            .join(model_versions, model_versions.c.id == model_aliases.c.version_id)
            .join(registered_models, registered_models.c.id == model_aliases.c.model_id)
            .where(registered_models.c.name == name)
            .order_by(model_aliases.c.alias)
        )
        with self.engine.connect() as conn:
            return [Alias(name, r["alias"], r["version"], r["updated_at"]) for r in conn.execute(query).mappings()]

    def _versions_query(self) -> sa.Select:
        return sa.select(model_versions, registered_models.c.name, registered_models.c.tenant, registered_models.c.public).join(
            registered_models, registered_models.c.id == model_versions.c.model_id
        )

    def _version_row(self, conn: Connection, ref: str | ModelRef) -> dict[str, Any]:
        parsed = parse_ref(ref)
        query = self._versions_query().where(registered_models.c.name == parsed.name)
        if parsed.version is not None:
            row = conn.execute(query.where(model_versions.c.version == parsed.version)).mappings().first()
            if row is None:
                self._require_model(conn, parsed.name)
                raise NotFoundError(f"model {parsed.name!r} has no version {parsed.version}", param="model")
            return dict(row)
        alias = parsed.alias or DEFAULT_ALIAS
        row = conn.execute(
            query.join(model_aliases, model_aliases.c.version_id == model_versions.c.id).where(model_aliases.c.alias == alias)
        ).mappings().first()
        if row is not None:
            return dict(row)
        if parsed.alias is not None:
            self._require_model(conn, parsed.name)
            raise NotFoundError(f"model {parsed.name!r} has no alias {parsed.alias!r}", param="model")
        row = conn.execute(
            query.where(model_versions.c.status == READY).order_by(model_versions.c.version.desc()).limit(1)
        ).mappings().first()
        if row is None:
            self._require_model(conn, parsed.name)
            raise NotFoundError(f"model {parsed.name!r} has no ready version", param="model")
        return dict(row)

    def _require_model(self, conn: Connection, name: str) -> Any:
        row = conn.execute(sa.select(registered_models.c.id, registered_models.c.tenant).where(registered_models.c.name == name)).first()
        if row is None:
            raise NotFoundError(f"no model named {name!r}", param="model")
        return row

    def _version(self, conn: Connection, row: Any) -> ModelVersion:
        parent = None
        if row["parent_id"] is not None:
            p = conn.execute(
                sa.select(registered_models.c.name, model_versions.c.version)
                .join(registered_models, registered_models.c.id == model_versions.c.model_id)
                .where(model_versions.c.id == row["parent_id"])
            ).first()
            parent = f"{p.name}:{p.version}"
        extra = conn.execute(
            sa.select(registered_models.c.name, model_versions.c.version)
            .select_from(model_version_parents)
            .join(model_versions, model_versions.c.id == model_version_parents.c.parent_id)
            .join(registered_models, registered_models.c.id == model_versions.c.model_id)
            .where(model_version_parents.c.version_id == row["id"])
            .order_by(model_version_parents.c.position)
        ).all() if parent else []
        return ModelVersion(
            name=row["name"],
            version=row["version"],
            task=row["task"],
            status=row["status"],
            prefix=row["prefix"],
            files=tuple(ModelFile(f["path"], f["sha256"], int(f["size"])) for f in row["files"]),
            manifest_sha256=row["manifest_sha256"],
            created_at=row["created_at"],
            run=row["run"],
            dataset=row["dataset"],
            dataset_sha256=row["dataset_sha256"],
            parent=parent,
            parents=(parent, *(f"{p.name}:{p.version}" for p in extra)) if parent else (),
            metrics=dict(row["metrics"] or {}),
            description=row["description"],
            signature=row["signature"],
            encrypted=bool(row["encrypted"]),
            tenant=row["tenant"],
        )

    # -- loading -------------------------------------------------------------------------
    @_scoped
    def download(self, ref: str | ModelRef, local_dir: str | os.PathLike[str], *, tenant: str | None = None) -> ModelVersion:
        """Download a version's files to `local_dir`, verifying every sha256 (and the signature).

        Raises:
            NotFoundError: the reference names nothing (or a model `tenant` may not see).
            IntegrityError: a stored file is missing, truncated or altered (the message names
                it), or the signature is missing (when required) or invalid.
        """
        version = self.resolve(ref, tenant=tenant)
        self.check_signature(version)
        manifest = self.storage.read_manifest(version.prefix)
        if manifest is None:
            raise IntegrityError(f"{version.ref}: its files are missing from {self.storage.url(version.prefix)}")
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        # one manifest, read (and its paths checked) once and matched against the database, is used throughout
        if not version.encrypted:
            if manifest.sha256 != version.manifest_sha256:
                raise IntegrityError(f"{version.ref}: the stored manifest {self.storage.url(version.prefix + '/' + MANIFEST)} was altered")
            self.storage.download_dir(version.prefix, local_dir, manifest=manifest)
            (local_dir / MANIFEST).unlink(missing_ok=True)
            return version
        key = self._decryption_key(version)
        if sorted(e.path for e in manifest.files) != sorted(f.path for f in version.files):
            raise IntegrityError(f"{version.ref}: the stored manifest {self.storage.url(version.prefix + '/' + MANIFEST)} lists other "
                                 "files than the database: altered")
        with tempfile.TemporaryDirectory(prefix="lmaas-sealed-") as sealed:
            self.storage.download_dir(version.prefix, sealed, manifest=manifest)  # verifies the ciphertext hashes
            for entry in version.files:
                dest = local_dir / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(Path(sealed) / entry.path, "rb") as src, open(dest, "wb") as out:
                    for chunk in self._unsealed_checked(version, key, entry, src):
                        out.write(chunk)
        return version

    def _decryption_key(self, version: ModelVersion) -> bytes:
        if self.encryption_key is None:
            raise ConfigError(
                f"{version.ref} is encrypted at rest; set LMAAS_ENCRYPTION_KEY or LMAAS_ENCRYPTION_KEY_FILE to load it",
                param="encryption_key",
            )
        return self.encryption_key

    def _decrypt_checked(self, version: ModelVersion, key: bytes, entry: ModelFile, data: bytes) -> bytes:
        return b"".join(self._unsealed_checked(version, key, entry, io.BytesIO(data)))

    def _unsealed_checked(self, version: ModelVersion, key: bytes, entry: ModelFile, src: BinaryIO) -> Iterator[bytes]:
        """A sealed file's plaintext in segments, hashed as it goes; the last segment is held back until the hash matches.

        Raises (while iterating):
            IntegrityError: it does not decrypt, or its plaintext differs from the recorded size and sha256.
        """
        where = self.storage.url(f"{version.prefix}/{entry.path}")
        return verified(sealing.unsealed(key, entry.path, src, where), entry.sha256, entry.size,
                        f"{where} does not match its sha256 in the manifest after decryption: altered")

    @_scoped
    def read_file(self, ref: str | ModelRef, path: str, *, tenant: str | None = None) -> tuple[ModelVersion, bytes]:
        """One file of a version, verified against its recorded sha256.

        Raises:
            NotFoundError: no such version or file (or a model `tenant` may not see).
            IntegrityError: the stored bytes do not match (the message names the file).
        """
        version = self.resolve(ref, tenant=tenant)
        self.check_signature(version)
        return version, self._read_checked(version, _file_entry(version, path))

    def _read_checked(self, version: ModelVersion, entry: ModelFile) -> bytes:
        """One file's bytes, decrypted if sealed, verified against the sha256 the database records."""
        path = entry.path
        where = self.storage.url(f"{version.prefix}/{path}")
        try:
            data = self.storage.read_bytes(f"{version.prefix}/{path}")
        except NotFoundError:
            raise IntegrityError(f"{where} is missing (listed in the manifest)") from None
        if version.encrypted:
            return self._decrypt_checked(version, self._decryption_key(version), entry, data)
        if not _matches(data, entry):
            raise IntegrityError(f"{where} does not match its sha256 in the manifest: truncated or altered")
        return data

    @_scoped
    def stream_file(self, ref: str | ModelRef, path: str, *, tenant: str | None = None, chunk_size: int = 1 << 20,
                    whole_below: int = STREAM_ABOVE_BYTES) -> tuple[ModelVersion, ModelFile, Iterator[bytes]]:
        """One file of a version as chunks, for sending without holding it in memory.

        A file smaller than `whole_below` (and any encrypted one: AES-GCM opens whole files) is read
        and verified before the first chunk, so damage is a clean `IntegrityError`. A larger one is
        checked for presence and size first, then hashed as it streams, its last chunk held back
        until the hash is known: the iterator raises `IntegrityError` instead of yielding it if the
        bytes differ from the recorded sha256 (a server then breaks the connection short of its
        Content-Length, so no client takes an altered file as complete).

        Raises:
            NotFoundError: no such version or file (or a model `tenant` may not see).
            IntegrityError: the file is missing, truncated or altered.
        """
        version = self.resolve(ref, tenant=tenant)
        self.check_signature(version)
        entry = _file_entry(version, path)
        if entry.size < whole_below:
            return version, entry, iter([self._read_checked(version, entry)])
        if version.encrypted:
            key, target = self._decryption_key(version), f"{version.prefix}/{path}"
            if not self.storage.exists(target):
                raise IntegrityError(f"{self.storage.url(target)} is missing (listed in the manifest)")

            def unsealed_chunks() -> Iterator[bytes]:
                with self.storage.open(target) as f:
                    yield from self._unsealed_checked(version, key, entry, f)

            return version, entry, unsealed_chunks()
        return version, entry, self.storage.checked_chunks(f"{version.prefix}/{path}", entry.sha256, entry.size, chunk_size=chunk_size)

    @_scoped
    def verify(self, ref: str | ModelRef, *, tenant: str | None = None) -> ModelVersion:
        """Check a version's stored files and signature without downloading them elsewhere."""
        version = self.resolve(ref, tenant=tenant)
        self.check_signature(version)
        manifest = self.storage.verify(version.prefix)
        if version.encrypted:
            for entry in version.files:
                self.read_file(version.ref, entry.path)  # decrypts and checks the plaintext hash
        elif manifest.sha256 != version.manifest_sha256:
            raise IntegrityError(f"{version.ref}: the stored manifest was altered")
        return version

    def check_signature(self, version: ModelVersion) -> None:
        """Raise `IntegrityError` if the signature is invalid, or missing while one is required."""
        if version.signature is None:
            if self.require_signature:
                raise IntegrityError(f"{version.ref} is not signed and this deployment requires signed versions")
            return
        if self._verifier is None:
            if self.require_signature:
                raise IntegrityError(f"{version.ref}: no verify key to check its signature with")
            return
        from cryptography.exceptions import InvalidSignature

        try:
            self._verifier.verify(bytes.fromhex(version.signature), version.signing_payload())
        except (InvalidSignature, ValueError):
            raise IntegrityError(f"{version.ref}: invalid signature (not signed by the configured key, or altered)") from None

    # -- aliases and status --------------------------------------------------------------
    @_scoped
    def set_alias(self, name: str, alias: str, version: int, *, tenant: str | None = None) -> Alias:
        """Point `alias` of model `name` at `version` (moving it if it exists).

        Args:
            tenant: the caller's tenant, which must own the model (None: an admin).

        Raises:
            NotFoundError: no such model or version (or another tenant's private model).
            PermissionDeniedError: another tenant's public model.
            InvalidInputError: bad alias, or the version is archived.
        """
        validate_alias(alias)
        with self.engine.begin() as conn:
            self._writable(conn, validate_model_name(name), tenant, param="model")
            row = self._version_row(conn, ModelRef(name, version=int(version)))
            if row["status"] != READY:
                raise InvalidInputError(f"{name}:{version} is archived; restore it before pointing an alias at it", param="version")
            now = time.time()
            conn.execute(
                model_aliases.delete().where(model_aliases.c.model_id == row["model_id"], model_aliases.c.alias == alias)
            )
            conn.execute(model_aliases.insert().values(model_id=row["model_id"], alias=alias, version_id=row["id"], updated_at=now))
            self._event(conn, "alias.set", f"{name}@{alias}", tenant=row["tenant"], detail={"version": int(version)})
        return Alias(name, alias, int(version), now)

    @_scoped
    def delete_alias(self, name: str, alias: str, *, tenant: str | None = None) -> None:
        """Remove an alias. Raises `NotFoundError` if it does not exist; `tenant` as for `set_alias`."""
        validate_alias(alias)
        with self.engine.begin() as conn:
            model = self._writable(conn, validate_model_name(name), tenant, param="name")
            deleted = conn.execute(
                model_aliases.delete().where(model_aliases.c.model_id == model.id, model_aliases.c.alias == alias)
            ).rowcount
            if not deleted:
                raise NotFoundError(f"model {name!r} has no alias {alias!r}", param="alias")
            self._event(conn, "alias.delete", f"{name}@{alias}", tenant=model.tenant)

    @_scoped
    def archive(self, ref: str | ModelRef, *, tenant: str | None = None) -> ModelVersion:
        """Mark a version archived (hidden from `name` resolution; files kept). Refused (409) if an alias points at it.

        `tenant` must own the model (None: an admin), as for `set_alias`.
        """
        return self._set_status(ref, ARCHIVED, tenant)

    @_scoped
    def restore(self, ref: str | ModelRef, *, tenant: str | None = None) -> ModelVersion:
        """Mark an archived version ready again (`tenant` as for `archive`)."""
        return self._set_status(ref, READY, tenant)

    def _set_status(self, ref: str | ModelRef, status: str, tenant: str | None) -> ModelVersion:
        with self.engine.begin() as conn:
            self._writable(conn, parse_ref(ref).name, tenant, param="model")
            row = self._version_row(conn, ref)
            if status == ARCHIVED:
                self._refuse_if_in_use(conn, row, "archive")
            conn.execute(model_versions.update().where(model_versions.c.id == row["id"]).values(status=status))
            self._event(conn, f"version.{status}", f"{row['name']}:{row['version']}", tenant=row["tenant"])
        return self.get_version(row["name"], row["version"])

    @_scoped
    def delete_version(self, ref: str | ModelRef, *, tenant: str | None = None) -> ModelVersion:
        """Delete a version and its files.

        Versions of other tenants that derive from it (possible while it is public) do not hold it:
        they lose their parent link instead, as the owner cannot see them.

        Args:
            tenant: the caller's tenant, which must own the model (None: an admin).

        Raises:
            NotFoundError: no such version (or another tenant's private model).
            PermissionDeniedError: another tenant's public model.
            AlreadyExistsError (409): an alias or a deployment points at it, or another version of
                its owner's (or a public one) derives from it.
        """
        with self.engine.begin() as conn:
            self._writable(conn, parse_ref(ref).name, tenant, param="model")
            row = self._version_row(conn, ref)
            self._refuse_if_in_use(conn, row, "delete")
            child_rows = conn.execute(
                sa.select(model_versions.c.id, registered_models.c.tenant, registered_models.c.public)
                .join(registered_models, registered_models.c.id == model_versions.c.model_id)
                .where(_derived_from(row["id"]))
            ).all()
            unseen = [c.id for c in child_rows if c.tenant != row["tenant"] and not c.public]
            children = len(child_rows) - len(unseen)
            if children:
                raise AlreadyExistsError(
                    f"cannot delete {row['name']}:{row['version']}: {children} version(s) derive from it; delete them first",
                    param="model",
                )
            version = self._version(conn, row)
            if unseen:
                conn.execute(model_versions.update().where(model_versions.c.id.in_(unseen), model_versions.c.parent_id == row["id"])
                             .values(parent_id=None))
                conn.execute(model_version_parents.delete().where(model_version_parents.c.parent_id == row["id"]))
            conn.execute(model_version_parents.delete().where(model_version_parents.c.version_id == row["id"]))
            conn.execute(model_versions.delete().where(model_versions.c.id == row["id"]))
            self._event(conn, "version.delete", version.ref, tenant=row["tenant"])
        # the row is gone first: a crash here leaves only unreferenced files, which gc removes
        self.storage.delete(version.prefix)
        return version

    def _refuse_if_in_use(self, conn: Connection, row: dict[str, Any], verb: str) -> None:
        aliases = conn.execute(sa.select(model_aliases.c.alias).where(model_aliases.c.version_id == row["id"])).scalars().all()
        deployed = self._deployed(conn, row["name"], row["version"])
        if aliases or deployed:
            users = [f"alias {a!r}" for a in aliases] + [f"deployment {d!r}" for d in deployed]
            raise AlreadyExistsError(
                f"cannot {verb} {row['name']}:{row['version']}: {', '.join(users)} point(s) at it; move or delete them first",
                param="model",
            )

    # -- lineage -------------------------------------------------------------------------
    @_scoped
    def lineage(self, ref: str | ModelRef, *, tenant: str | None = None) -> Lineage:
        """A version's dataset, run, parent, children (derived versions), aliases and deployments.

        Args:
            tenant: only a model this tenant may see; a parent or children it may not see are left out.
        """
        with self.engine.connect() as conn:
            self._visible(conn, parse_ref(ref).name, tenant)
            row = self._version_row(conn, ref)
            version = _seen(self._version(conn, row), tenant)
            parent_rows = [self._version_row(conn, ref) for ref in version.parents]
            parents = tuple(_seen(self._version(conn, r), tenant) for r in parent_rows if _sees(tenant, r))
            parent = parents[0] if parent_rows and _sees(tenant, parent_rows[0]) else None
            children = tuple(
                _seen(self._version(conn, r), tenant)
                for r in conn.execute(self._versions_query().where(_derived_from(row["id"])).order_by(model_versions.c.id)).mappings()
                if _sees(tenant, r)
            )
            aliases = tuple(conn.execute(sa.select(model_aliases.c.alias).where(model_aliases.c.version_id == row["id"])).scalars())
            deployed = self._deployed(conn, version.name, version.version)
        return Lineage(version, parent, children, tuple(sorted(aliases)), tuple(deployed), parents)

    def _deployed(self, conn: Connection, name: str, version: int) -> list[str]:
        """Deployments that serve `name:version` by number: the database's records (`app/name`, see
        `lmaas.serve.records`) and whatever `deployments_of` adds."""
        ref = f"{name}:{version}"
        rows = conn.execute(
            sa.select(deployments.c.app, deployments.c.name)
            .where(sa.or_(deployments.c.ref == ref, deployments.c.canary_ref == ref))
            .order_by(deployments.c.app, deployments.c.name)
        ).all()
        return sorted({f"{r.app}/{r.name}" for r in rows} | set(self.deployments_of(name, version)))

    @_scoped
    def trained_on(self, dataset: str, *, tenant: str | None = None) -> list[ModelVersion]:
        """Every version whose recorded dataset is `dataset` (e.g. `wiki:3`), oldest first (`tenant`: only its own
        models': a dataset is its owner's, and which public models were trained on it is the owner's to know)."""
        with self.engine.connect() as conn:
            rows = conn.execute(self._versions_query().where(model_versions.c.dataset == dataset).order_by(model_versions.c.id)).mappings()
            return [self._version(conn, r) for r in rows if tenant is None or r["tenant"] == tenant]

    # -- garbage collection --------------------------------------------------------------
    def gc(self, *, grace_seconds: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Delete files no version references: uploads that died before commit, deleted versions.

        An upload in progress (recorded in `model_uploads`) is left alone for `grace_seconds`.

        Returns:
            The store prefixes deleted (or that would be, with `dry_run`).
        """
        with self.engine.connect() as conn:
            referenced = set(conn.execute(sa.select(model_versions.c.prefix)).scalars())
            uploads = {r.prefix: r.created_at for r in conn.execute(sa.select(model_uploads))}
        now = time.time()
        candidates = set(self.storage.garbage(MODELS_PREFIX, depth=2))
        for path in self.storage.list(MODELS_PREFIX):
            parts = path.split("/")
            if len(parts) >= 4:
                candidates.add("/".join(parts[:3]))
        removed = []
        for path in sorted(candidates):
            owner = _owning_prefix(path)
            if owner in referenced and not _is_temporary_path(path):
                continue
            started = uploads.get(owner)
            if started is not None and now - started < grace_seconds:
                continue
            removed.append(path)
            if not dry_run:
                self.storage.delete(path)
        if not dry_run:
            stale = [p for p, t in uploads.items() if now - t >= grace_seconds and p not in referenced]
            if stale:
                with self.engine.begin() as conn:
                    conn.execute(model_uploads.delete().where(model_uploads.c.prefix.in_(stale)))
        return removed


class StagedUpload:
    """Files uploaded and verified under a unique prefix, not yet a version."""

    def __init__(self, *, name: str, prefix: str, manifest: Manifest, encrypted: bool = False) -> None:
        self.name = name
        self.prefix = prefix
        self.manifest = manifest
        """Hashes of the plaintext files."""
        self.encrypted = encrypted


def check_model_dir(local_dir: str | os.PathLike[str], *, expected_sha256: dict[str, str] | None = None) -> Manifest:
    """Check a local model directory before upload and return its manifest.

    Raises:
        NotFoundError: not a directory.
        InvalidInputError: empty, a pickle-format weights file, an unsafe or reserved file name,
            a `.safetensors` file that is not safetensors, or a file whose sha256 differs from
            `expected_sha256`.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise NotFoundError(f"{local_dir} is not a directory", param="dir")
    manifest = Manifest.of_dir(root)
    if not manifest.files:
        raise InvalidInputError(f"{local_dir} holds no files", param="files")
    for entry in manifest.files:
        validate_file_path(entry.path)
        if (root / entry.path).is_symlink():
            raise InvalidInputError(f"{entry.path}: symbolic links are not registered; copy the file", param="files")
        _check_weights_format(entry.path)
        if entry.path.endswith(".safetensors"):
            _check_safetensors(root / entry.path, entry.path)
    if expected_sha256 is not None:
        actual = {e.path: e.sha256 for e in manifest.files}
        for path, digest in expected_sha256.items():
            if path not in actual:
                raise InvalidInputError(f"{path}: listed in the hashes but not uploaded", param="sha256")
            if actual[path] != digest.lower():
                raise InvalidInputError(f"{path}: sha256 {actual[path]} does not match the declared {digest}", param="sha256")
    return manifest


def _check_weights_format(path: str) -> None:
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise InvalidInputError(f"{path}: pickle-based weights are refused; save weights as .safetensors", param="files")


def _check_safetensors(path: Path, rel: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return _check_safetensors_header(f, path.stat().st_size, rel)


def _check_safetensors_header(f: BinaryIO, size: int, rel: str) -> dict[str, Any]:
    """A valid safetensors file starts with an 8-byte little-endian header length and a JSON header; returns the header."""
    head = f.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    header: Any = None
    if 0 < length <= min(size - 8, 100 << 20):
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise InvalidInputError(f"{rel} is not a safetensors file (bad header)", param="files")
    return header


def check_causal_lm_dir(local_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """`models.hf.check_causal_lm` on a local directory (before anything is uploaded); returns its config."""
    root = Path(local_dir)
    if not root.is_dir():
        raise NotFoundError(f"{local_dir} is not a directory", param="dir")
    paths = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return check_causal_lm(paths, lambda path: (root / path).read_bytes(), lambda path: _check_safetensors(root / path, path))


def _copy_checked(src: BinaryIO, dest: BinaryIO, path: str, expected: dict[str, Any]) -> None:
    """Copy `src` to `dest`, refusing it (InvalidInputError naming `path`) unless size and sha256 match."""
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(1 << 20):
        size += len(chunk)
        if size > expected["size"]:
            raise InvalidInputError(f"{path}: more than the declared {expected['size']} bytes", param="size")
        digest.update(chunk)
        dest.write(chunk)
    if size != expected["size"]:
        raise InvalidInputError(f"{path}: {size} bytes received, {expected['size']} declared", param="size")
    if digest.hexdigest() != expected["sha256"]:
        raise InvalidInputError(f"{path}: sha256 {digest.hexdigest()} does not match the declared {expected['sha256']}", param="sha256")


def _check_owner(name: str, owner: str, public: bool, tenant: str | None, *, create: bool = False, param: str = "name") -> None:
    """Raise unless `tenant` (None: an admin) may change model `name`, owned by `owner`; see `check_writable`."""
    if tenant is None or owner == tenant:
        return
    if public:
        raise PermissionDeniedError(f"model {name!r} belongs to another tenant and is shared read-only", param=param)
    if create:
        raise AlreadyExistsError(f"the model name {name!r} is taken; choose another name", param=param)
    raise NotFoundError(f"no model named {name!r}", param=param)


def _parents(parent: str | None, parents: list[str] | tuple[str, ...] | None) -> list[str]:
    """Every parent in order from `register_version`'s two ways of naming them, each once (a model
    merged with itself has one parent).

    Raises:
        InvalidInputError: both given and `parent` is not the first of `parents`.
    """
    listed = list(parents or ())
    if parent and listed and listed[0] != parent:
        raise InvalidInputError(f"parent {parent!r} must be the first of parents {listed}", param="parent")
    return list(dict.fromkeys(listed or ([parent] if parent else [])))


def _derived_from(version_id: int) -> Any:
    """The WHERE clause of versions whose parents include `version_id`."""
    further = sa.select(model_version_parents.c.version_id).where(model_version_parents.c.parent_id == version_id)
    return sa.or_(model_versions.c.parent_id == version_id, model_versions.c.id.in_(further))


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise InvalidInputError(f"unknown task {task!r}; use one of {', '.join(TASKS)}", param="task")


def _owning_prefix(path: str) -> str:
    """`models/<name>/<upload id>` for any path under it, or for its staging directory."""
    parts = path.split("/")[:3]
    if len(parts) == 3 and parts[2].startswith("."):
        parts[2] = parts[2][1:].split(".staging-")[0].split(".tmp-")[0]
    return "/".join(parts)


def _is_temporary_path(path: str) -> bool:
    return any(p.startswith(".") and (".tmp-" in p or ".staging-" in p) for p in path.split("/"))


def _seen(version: ModelVersion, tenant: str | None) -> ModelVersion:
    """`version` as `tenant` sees it: another tenant's (public) version without its training lineage."""
    if tenant is None or version.tenant == tenant:
        return version
    return dataclasses.replace(version, dataset=None, dataset_sha256=None, run=None)


def _file_entry(version: ModelVersion, path: str) -> ModelFile:
    """The recorded file `path` of `version`; `NotFoundError` naming it when the version has none."""
    entry = next((f for f in version.files if f.path == path), None)
    if entry is None:
        raise NotFoundError(f"{version.ref} has no file {path!r}", param="path")
    return entry


def _sees(tenant: str | None, row: Any) -> bool:
    """Whether `tenant` may see the model of a `_versions_query` row."""
    return tenant is None or bool(row["public"]) or row["tenant"] == tenant


def _model(row: Any) -> RegisteredModel:
    return RegisteredModel(
        name=row["name"],
        tenant=row["tenant"],
        description=row["description"],
        tags=dict(row["tags"] or {}),
        created_at=row["created_at"],
        latest_version=row["last_version"],
        public=bool(row["public"]),
    )


def _hex_env(var: str) -> bytes | None:
    value = os.environ.get(var, "").strip()
    if not value:
        return None
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{var} must be a hex-encoded 32-byte key", param=var) from None
    if len(key) != 32:
        raise ConfigError(f"{var} must be a hex-encoded 32-byte key, not {len(key)} bytes", param=var)
    return key


def _encryption_key_from_env() -> bytes | None:
    key = _hex_env("LMAAS_ENCRYPTION_KEY")
    path = os.environ.get("LMAAS_ENCRYPTION_KEY_FILE", "").strip()
    if key is None and path:
        try:
            raw = Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise ConfigError(f"LMAAS_ENCRYPTION_KEY_FILE={path}: {exc.strerror}", param="LMAAS_ENCRYPTION_KEY_FILE") from None
        text = raw.strip()
        try:
            key = bytes.fromhex(text.decode()) if len(text) == 64 else raw
        except (ValueError, UnicodeDecodeError):
            key = raw
        if len(key) != 32:
            raise ConfigError(f"LMAAS_ENCRYPTION_KEY_FILE={path} must hold a 32-byte key (raw or 64 hex digits)", param="LMAAS_ENCRYPTION_KEY_FILE")
    return key


def _private_key(raw: bytes):  # noqa: ANN202 - cryptography type imported lazily
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(raw)


def _public_key(raw: bytes):  # noqa: ANN202
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(raw)


def _public_bytes(private) -> bytes:  # noqa: ANN001
    from cryptography.hazmat.primitives import serialization

    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_signing_key() -> tuple[str, str]:
    """A new Ed25519 key pair as hex strings: (private for LMAAS_SIGNING_KEY, public for LMAAS_VERIFY_KEY)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return private.hex(), _public_bytes(key).hex()


def _matches(data: bytes, entry: ModelFile) -> bool:
    """True when `data` has the size and sha256 recorded for `entry`."""
    return len(data) == entry.size and hashlib.sha256(data).hexdigest() == entry.sha256
