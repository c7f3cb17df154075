"""The OpenAI files API under `/v1/files`: a thin map onto `registry.files.FileStore`.

    POST   /v1/files                    multipart: `file` and `purpose` (fine-tune, batch, user_data) -> the file object
                                        (`batch_output` files are a batch's results, filed by lmaas: /v1/batches)
    GET    /v1/files                    the caller's files, newest first (`?purpose=&limit=&after=&order=`)
    GET    /v1/files/{id}               one file object
    GET    /v1/files/{id}/content       its bytes, checked against their sha256 as they stream
    DELETE /v1/files/{id}

The real `openai` client's `client.files.create/list/retrieve/content/delete` work unchanged.
Scopes follow what a purpose is for: `batch` and `batch_output` files need `inference` (reading and writing);
`fine-tune` and `user_data` files (training data, ingest sources) need `models:read` to read and
`models:write` to upload or delete. A key sees only its tenant's files: another tenant's is 404,
as one that does not exist; admins see every tenant's. An upload's content is checked for its
purpose as it streams (a bad line is 400 naming it) and counted against the tenant's storage quota
(413 past it, or past 512 MB).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.datastructures import UploadFile

from lmaas.auth import INFERENCE, MODELS_READ, MODELS_WRITE, Principal
from lmaas.errors import InvalidInputError, PermissionDeniedError
from lmaas.registry.files import OUTPUT_PURPOSES, PURPOSES, FileStore, StoredFile
from lmaas.serve.auth import authenticate
from lmaas.serve.protocol.files import FileDeleted, FileList, FileOut

router = APIRouter(prefix="/v1/files", tags=["files"])

READ_SCOPE = {"batch": INFERENCE, "batch_output": INFERENCE, "fine-tune": MODELS_READ, "user_data": MODELS_READ}
WRITE_SCOPE = {"batch": INFERENCE, "batch_output": INFERENCE, "fine-tune": MODELS_WRITE, "user_data": MODELS_WRITE}


def files_access(principal: Principal = Depends(authenticate)) -> Principal:
    """Any key that may read some purpose's files; each route checks the purpose's own scope."""
    if not any(principal.has(s) for s in (INFERENCE, MODELS_READ, MODELS_WRITE)):
        raise PermissionDeniedError("this API key lacks a scope the files API needs (inference, models:read or models:write)",
                                    param="authorization")
    return principal


def _store(request: Request, principal: Principal) -> FileStore:
    store: FileStore = request.app.state.files
    return store if principal.anonymous else store.as_actor(principal.actor)


def _check_scope(principal: Principal, purpose: str, scopes: dict[str, str]) -> None:
    scope = scopes[purpose]
    if not principal.has(scope):
        raise PermissionDeniedError(f"{purpose} files need the {scope!r} scope, which this API key lacks", param="purpose")


def _out(record: StoredFile) -> FileOut:
    return FileOut(**record.to_openai())


@router.post("", response_model=FileOut)
async def create_file(request: Request, principal: Principal = Depends(files_access)) -> FileOut:
    """Upload a file (multipart form: `file`, `purpose`); checked for its purpose before it is kept."""
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # noqa: BLE001 - a malformed form (the body limit's 413 is answered by its middleware)
        raise InvalidInputError(f"the body must be a multipart form with `file` and `purpose` ({exc})", param="file") from None
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if not isinstance(purpose, str) or purpose not in PURPOSES:
            raise InvalidInputError(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidInputError("file: a multipart file part named `file` is required", param="file")
        _check_scope(principal, purpose, WRITE_SCOPE)
        record = await run_in_threadpool(
            _store(request, principal).create, upload.file, filename=upload.filename or "", purpose=purpose, tenant=principal.tenant)
    finally:
        await form.close()
    return _out(record)


@router.get("", response_model=FileList)
def list_files(
    request: Request,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
    principal: Principal = Depends(files_access),
) -> FileList:
    """The caller's files (an admin's: every tenant's), newest first; only purposes its key may read."""
    if purpose is not None:
        if purpose not in (*PURPOSES, *OUTPUT_PURPOSES):
            raise InvalidInputError(f"purpose must be one of {', '.join((*PURPOSES, *OUTPUT_PURPOSES))}", param="purpose")
        _check_scope(principal, purpose, READ_SCOPE)
    readable = {p for p in (*PURPOSES, *OUTPUT_PURPOSES) if principal.has(READ_SCOPE[p])}
    found = _store(request, principal).list(tenant=principal.tenant_filter, purpose=purpose, limit=limit + 1, after=after, order=order)
    more = len(found) > limit
    data = [_out(f) for f in found[:limit] if f.purpose in readable]
    return FileList(data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)


def _readable(request: Request, principal: Principal, file_id: str) -> StoredFile:
    record = _store(request, principal).get(file_id, tenant=principal.tenant_filter)
    _check_scope(principal, record.purpose, READ_SCOPE)
    return record


@router.get("/{file_id}", response_model=FileOut)
def retrieve_file(request: Request, file_id: str, principal: Principal = Depends(files_access)) -> FileOut:
    return _out(_readable(request, principal, file_id))


@router.get("/{file_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes."}})
def file_content(request: Request, file_id: str, principal: Principal = Depends(files_access)) -> StreamingResponse:
    """The file's bytes, streamed; a stored file that no longer matches its sha256 is cut short (never served whole)."""
    record = _readable(request, principal, file_id)
    return StreamingResponse(iterate_in_threadpool(_store(request, principal).chunks(record)), media_type="application/octet-stream", headers={
        "Content-Length": str(record.bytes), "Content-Disposition": f'attachment; filename="{record.id}"'})


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(request: Request, file_id: str, principal: Principal = Depends(files_access)) -> FileDeleted:
    store = _store(request, principal)
    record = store.get(file_id, tenant=principal.tenant_filter)
    _check_scope(principal, record.purpose, WRITE_SCOPE)
    store.delete(record)
    return FileDeleted(id=file_id)
