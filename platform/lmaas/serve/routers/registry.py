"""Model registry REST API under `/api/v1/`: a thin map from HTTP to `ModelRegistry` calls.

Upload a version as multipart form data: one `files` part per file, its filename the path inside
the version (`1_Pooling/config.json`), plus `task` and optionally `sha256` (JSON `{path: hex}`:
the upload is refused if a file does not match), `parent`, `dataset`, `run`, `metrics` (JSON).

Tenancy (with auth on): reading needs `models:read`, changing `models:write`; a caller sees its
tenant's models and public ones (another tenant's private model is 404, as if it did not exist),
changes only its tenant's (a public model of another tenant is read-only: 403), and a new model
belongs to the caller's tenant. Admins see and change everything; only they make a model public.
`ModelRegistry` itself enforces all of this (each call takes the caller's tenant); model names
are global, so a name another tenant holds is 409 (taken) to a new registration.

Or in two steps, for large files and clients that stream (presigned-style):

    POST   /api/v1/models/{name}/uploads      {"files": [{"path", "size", "sha256"}]} -> id, one PUT url per file
    PUT    /api/v1/uploads/{id}/files/{path}  the raw bytes (checked against size and sha256 as they land)
    POST   /api/v1/uploads/{id}/commit        {"task", "parent", "dataset", "metrics", ...} -> the new version
    DELETE /api/v1/uploads/{id}               abort; an upload never committed is collected by gc
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import anyio.from_thread
from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from lmaas import db
from lmaas.auth import Principal
from lmaas.errors import InvalidInputError
from lmaas.registry import ModelRegistry
from lmaas.registry.entities import ModelFile, RegisteredModel
from lmaas.registry.refs import validate_file_path, validate_model_name
from lmaas.serve.auth import admin_only, authenticate, registry_access
from lmaas.serve.protocol.registry import (
    AliasOut,
    CommitUploadRequest,
    CreateUploadRequest,
    DeletedOut,
    LineageOut,
    ModelList,
    ModelVersionOut,
    RegisteredModelOut,
    SetAliasRequest,
    UpdateModelRequest,
    UploadOut,
    UploadTargetOut,
    ModelFileOut,
    VersionPage,
    version_out,
)

router = APIRouter(prefix="/api/v1", tags=["registry"], dependencies=[Depends(registry_access)])


def _registry(request: Request) -> ModelRegistry:
    """The registry, recording the caller as the actor of what it changes."""
    registry: ModelRegistry = request.app.state.registry
    principal = authenticate(request)
    return registry if principal.anonymous else registry.as_actor(principal.actor)


def _tenant(request: Request) -> str | None:
    """The tenant filter of the caller (None: an admin, or auth off)."""
    return authenticate(request).tenant_filter


def _owner(request: Request) -> str:
    """Who a model the caller creates belongs to: its key's tenant (admins' too)."""
    return authenticate(request).tenant


@router.get("/models", response_model=ModelList)
def list_models(
    request: Request, search: str | None = None, offset: Annotated[int, Query(ge=0, le=db.MAX_INT)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> ModelList:
    """List (or search by name substring) registered models."""
    registry, tenant = _registry(request), _tenant(request)
    models = registry.list_models(search=search, tenant=tenant, offset=offset, limit=limit)
    return ModelList(data=[_model_out(registry, m, tenant) for m in models])


@router.get("/models/{name}", response_model=RegisteredModelOut)
def get_model(request: Request, name: str) -> RegisteredModelOut:
    registry, tenant = _registry(request), _tenant(request)
    return _model_out(registry, registry.get_model(name, tenant=tenant), tenant)


def _model_out(registry: ModelRegistry, model: RegisteredModel, tenant: str | None) -> RegisteredModelOut:
    """A model with its aliases ({alias: version})."""
    aliases = {a.alias: a.version for a in registry.aliases(model.name, tenant=tenant)}
    return RegisteredModelOut(**model.to_dict(), aliases=aliases)


@router.patch("/models/{name}", response_model=RegisteredModelOut)
def update_model(request: Request, name: str, body: UpdateModelRequest, _admin: Principal = Depends(admin_only)) -> RegisteredModelOut:
    """Share a model with every tenant (`public: true`; read and inference only), or make it private again. Admins only."""
    registry = _registry(request)
    return _model_out(registry, registry.set_public(name, body.public), None)


@router.get("/models/{name}/versions", response_model=VersionPage)
def list_versions(
    request: Request,
    name: str,
    offset: Annotated[int, Query(ge=0, le=db.MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    status: str | None = None,
) -> VersionPage:
    """A page of a model's versions, newest first."""
    found = _registry(request).list_versions(name, offset=offset, limit=limit + 1, status=status, tenant=_tenant(request))
    more = len(found) > limit
    return VersionPage(
        data=[version_out(v) for v in found[:limit]], offset=offset, limit=limit, has_more=more, next_offset=offset + limit if more else None
    )


@router.post("/models/{name}/versions", response_model=ModelVersionOut, status_code=201)
def upload_version(
    request: Request,
    name: str,
    files: list[UploadFile],
    task: Annotated[str, Form()],
    sha256: Annotated[str | None, Form()] = None,
    parent: Annotated[str | None, Form()] = None,
    dataset: Annotated[str | None, Form()] = None,
    dataset_sha256: Annotated[str | None, Form()] = None,
    run: Annotated[str | None, Form()] = None,
    metrics: Annotated[str | None, Form()] = None,
    description: Annotated[str, Form()] = "",
) -> ModelVersionOut:
    """Upload files as the next version of `name` (all checked before anything is registered)."""
    validate_model_name(name)
    _registry(request).check_writable(name, tenant=_tenant(request), create=True)  # before reading the body
    expected = _json_form(sha256, "sha256")
    parsed_metrics = _json_form(metrics, "metrics")
    tmp = Path(tempfile.mkdtemp(prefix="lmaas-upload-"))
    try:
        seen = set()
        for upload in files:
            rel = validate_file_path(upload.filename or "")
            if rel in seen:
                raise InvalidInputError(f"file {rel!r} uploaded twice", param="files")
            seen.add(rel)
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
        version = _registry(request).register_version(
            name,
            tmp,
            task=task,
            parent=parent or None,
            dataset=dataset or None,
            dataset_sha256=dataset_sha256 or None,
            run=run or None,
            metrics=parsed_metrics,
            description=description,
            expected_sha256=expected,
            tenant=_tenant(request),
            owner=_owner(request),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return version_out(version)


@router.post("/models/{name}/uploads", response_model=UploadOut, status_code=201)
def begin_upload(request: Request, name: str, body: CreateUploadRequest) -> UploadOut:
    """Open a two-step upload of the next version of `name`: declare its files, get one PUT url each."""
    files = [ModelFile(f.path, f.sha256.lower(), f.size) for f in body.files]
    upload_id = _registry(request).begin_upload(name, files, tenant=_tenant(request))
    targets = [
        UploadTargetOut(path=f.path, size=f.size, sha256=f.sha256, url=str(request.url_for("put_upload_file", upload_id=upload_id, path=f.path)))
        for f in files
    ]
    return UploadOut(id=upload_id, name=name, files=targets, commit_url=str(request.url_for("commit_upload", upload_id=upload_id)))


@router.put("/uploads/{upload_id}/files/{path:path}", response_model=ModelFileOut)
async def put_upload_file(request: Request, upload_id: str, path: str) -> ModelFileOut:
    """The bytes of one declared file; 400 naming the file if its size or sha256 differs from the declared ones."""
    registry = _registry(request)
    tenant = _tenant(request)
    await run_in_threadpool(registry.upload_name, upload_id, tenant=tenant)  # 404 before reading the body
    # the store call blocks, so it runs in a worker thread that pulls the body from the event loop as it reads
    stored = await run_in_threadpool(registry.put_upload_file, upload_id, path, _BodyReader(request), tenant=tenant)
    return ModelFileOut(**stored.to_dict())


class _BodyReader(io.RawIOBase):
    """A blocking, read-only file over a request body, for code running in a worker thread."""

    def __init__(self, request: Request) -> None:
        self._chunks = request.stream().__aiter__()
        self._pending = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer
        while not self._pending and not self._done:
            try:
                self._pending = anyio.from_thread.run(self._chunks.__anext__)
            except StopAsyncIteration:
                self._done = True
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


@router.post("/uploads/{upload_id}/commit", response_model=ModelVersionOut, status_code=201)
def commit_upload(request: Request, upload_id: str, body: CommitUploadRequest) -> ModelVersionOut:
    """Verify every declared file arrived and register the upload as the next version, atomically."""
    details = body.model_dump()
    task = details.pop("task")
    return version_out(_registry(request).commit_upload(upload_id, task=task, tenant=_tenant(request), owner=_owner(request), **details))


@router.delete("/uploads/{upload_id}", response_model=DeletedOut)
def abort_upload(request: Request, upload_id: str) -> DeletedOut:
    """Abort an open upload and delete its files."""
    _registry(request).abort_upload(upload_id, tenant=_tenant(request))
    return DeletedOut(object="model.upload", id=upload_id)


def _json_form(value: str | None, param: str) -> dict | None:
    if not value:
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        raise InvalidInputError(f"{param} must be a JSON object", param=param) from None
    if not isinstance(parsed, dict):
        raise InvalidInputError(f"{param} must be a JSON object", param=param)
    return parsed


@router.get("/models/{name}/versions/{version}", response_model=ModelVersionOut)
def get_version(request: Request, name: str, version: int) -> ModelVersionOut:
    return version_out(_registry(request).get_version(name, version, tenant=_tenant(request)))


@router.get("/resolve", response_model=ModelVersionOut)
def resolve(request: Request, ref: str) -> ModelVersionOut:
    """The version a reference (`name`, `name:7`, `name@alias`) names."""
    return version_out(_registry(request).resolve(ref, tenant=_tenant(request)))


@router.get("/models/{name}/versions/{version}/files/{path:path}")
def download_file(request: Request, name: str, version: int, path: str) -> StreamingResponse:
    """One file of a version, verified against its sha256: before it is sent, or (8 MiB and more) as it streams,
    the connection breaking off if the stored bytes turn out altered (`X-Sha256` lets clients check too)."""
    validate_file_path(path)
    _, entry, chunks = _registry(request).stream_file(f"{validate_model_name(name)}:{version}", path, tenant=_tenant(request))
    headers = {"X-Sha256": entry.sha256, "Content-Length": str(entry.size)}
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)


@router.put("/models/{name}/aliases/{alias}", response_model=AliasOut)
def set_alias(request: Request, name: str, alias: str, body: SetAliasRequest) -> AliasOut:
    return AliasOut(**_registry(request).set_alias(name, alias, body.version, tenant=_tenant(request)).to_dict())


@router.delete("/models/{name}/aliases/{alias}", response_model=DeletedOut)
def delete_alias(request: Request, name: str, alias: str) -> DeletedOut:
    _registry(request).delete_alias(name, alias, tenant=_tenant(request))
    return DeletedOut(object="model.alias", id=f"{name}@{alias}")


@router.post("/models/{name}/versions/{version}/archive", response_model=ModelVersionOut)
def archive(request: Request, name: str, version: int) -> ModelVersionOut:
    return version_out(_registry(request).archive(f"{validate_model_name(name)}:{version}", tenant=_tenant(request)))


@router.post("/models/{name}/versions/{version}/restore", response_model=ModelVersionOut)
def restore(request: Request, name: str, version: int) -> ModelVersionOut:
    return version_out(_registry(request).restore(f"{validate_model_name(name)}:{version}", tenant=_tenant(request)))


@router.delete("/models/{name}/versions/{version}", response_model=DeletedOut)
def delete_version(request: Request, name: str, version: int) -> DeletedOut:
    """Delete a version; 409 while an alias, a deployment or a derived version points at it."""
    deleted = _registry(request).delete_version(f"{validate_model_name(name)}:{version}", tenant=_tenant(request))
    return DeletedOut(object="model.version", id=deleted.ref)


@router.get("/models/{name}/versions/{version}/lineage", response_model=LineageOut)
def lineage(request: Request, name: str, version: int) -> LineageOut:
    """Where a version came from and what derives from it (versions of models the caller cannot see are left out)."""
    return LineageOut(**_registry(request).lineage(f"{validate_model_name(name)}:{version}", tenant=_tenant(request)).to_dict())


@router.get("/lineage", response_model=VersionPage)
def trained_on(request: Request, dataset: str) -> VersionPage:
    """Every model version trained on a dataset version."""
    found = _registry(request).trained_on(dataset, tenant=_tenant(request))
    return VersionPage(data=[version_out(v) for v in found], offset=0, limit=len(found), has_more=False, next_offset=None)
