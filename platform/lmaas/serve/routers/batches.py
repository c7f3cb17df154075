"""The OpenAI Batch API under `/v1/batches`: a thin map onto the job queue's `batch` jobs (`lmaas.batch.job`).

    POST /v1/batches                    {"input_file_id", "endpoint", "completion_window", "metadata"} -> the batch object
    GET  /v1/batches                    the caller's, newest first (`?after=batch_N&limit=`)
    GET  /v1/batches/{id}               status, request_counts (completed / failed / total as it runs), output_file_id, ...
    POST /v1/batches/{id}/cancel        stops it; the lines answered by then are kept in its output files

The real `openai` client's `client.batches.create/retrieve/list/cancel` work unchanged, and the results are files:
`client.files.content(batch.output_file_id)` (the lines answered with status 200) and `error_file_id` (the others),
one line per input line, matched by `custom_id`. Creating reads the input file once (streamed): the lines must name
one model (`body.model`; lmaas runs a batch on one model version) unless `lmaas.model` names it. Each line is
answered by its own `url`, so one batch may mix completions and chat (OpenAI's refuse lines of another url than
`endpoint`). The queue then checks the job as the caller's tenant (the model must be one it may see) and
queues it at low priority: 4xx naming the field, nothing queued. The job runs as that tenant (`ops.queue.execute`).

A batch's tokens count as batch tokens in the tenant's usage (`/api/v1/usage`: `batch_*`, and `billable_tokens` at
`LMAAS_BATCH_TOKEN_DISCOUNT`, 0.5 by default), and that share of them against its per-day token quota; a tenant past
its quota gets 429 for new batches. Scopes as for batch files: `inference`. A key sees and cancels only its tenant's
batches (another tenant's is 404, as one that does not exist).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from lmaas.auth import INFERENCE, Principal
from lmaas.batch.job import batch_job_config, check_input_file, pick_model, survey
from lmaas.errors import InvalidInputError, LmaasError, NotFoundError
from lmaas.ops import queue
from lmaas.serve.auth import authenticate, require
from lmaas.serve.protocol.batches import (
    Batch,
    BatchError,
    BatchErrors,
    BatchList,
    BatchRequestCounts,
    BatchUsage,
    CreateBatchRequest,
)
from lmaas.serve.routers.jobs import PublicJobIds, _queue, job_report, reported_error

router = APIRouter(prefix="/v1/batches", tags=["batches"], dependencies=[require(INFERENCE)])

KIND = "batch"
IDS = PublicJobIds(KIND, "batch_", "batch", "/v1/batches", "batch_id")
WINDOW_S = 24 * 3600
CANCEL_GRACE_S = 150
"""After this long a cancelled batch whose driver never reported (killed before it could) shows `cancelled`."""
MAX_METADATA = 16


@router.post("", response_model=Batch)
async def create_batch(request: Request, body: CreateBatchRequest, principal: Principal = Depends(authenticate)) -> Batch:
    """Queue a batch of the requests in `input_file_id`, checked first (4xx naming the field, nothing queued)."""
    if body.completion_window != "24h":
        raise InvalidInputError("completion_window must be 24h", param="completion_window")
    if body.output_expires_after is not None:
        raise InvalidInputError("output_expires_after is not offered: a batch's output files are kept until deleted",
                                param="output_expires_after")
    if body.metadata and (len(body.metadata) > MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())):
        raise InvalidInputError(f"metadata holds at most {MAX_METADATA} pairs, keys of 64 and values of 512 characters", param="metadata")
    check_input_file(body.input_file_id)
    options = body.lmaas.model_dump(exclude_none=True, exclude={"priority", "model"}) if body.lmaas else {}
    auth = request.app.state.auth
    if auth is not None:
        await run_in_threadpool(auth.quotas.admit, principal)  # 429 while the tenant's token quota is spent
    job = await run_in_threadpool(_submit, request, body, principal, options)
    return _batch_out(job, job_report(request, job))


def _submit(request: Request, body: CreateBatchRequest, principal: Principal, options: dict[str, Any]) -> queue.QueuedJob:
    files = request.app.state.files
    try:
        record = files.get(body.input_file_id, tenant=principal.tenant)
    except NotFoundError:
        raise NotFoundError(f"no file {body.input_file_id!r}; upload one with purpose batch (POST /v1/files)", param="input_file_id") from None
    if record.purpose != "batch":
        raise InvalidInputError(f"input_file_id {record.id} was uploaded with purpose {record.purpose!r}; a batch reads files of purpose "
                                "'batch'", param="input_file_id")
    model = pick_model(survey(files.chunks(record)), body.endpoint, body.lmaas.model if body.lmaas else None)
    storage = request.app.state.registry.storage
    try:
        config = batch_job_config(tenant=principal.tenant, model=model, input_file_id=record.id, endpoint=body.endpoint,
                                  storage_url=storage.url, metadata=body.metadata or {},
                                  key_id=None if principal.anonymous else principal.key_id, **options)
    except ValueError as exc:  # pydantic's, of lmaas's options
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInputError(f"lmaas.{where}: {first['msg']}", param=f"lmaas.{where}" if where else "lmaas") from None
    try:
        return _queue(request).submit(kind=KIND, config=config.model_dump(mode="json"), tenant=principal.tenant, actor=principal.actor,
                                      privileged=principal.is_admin, priority=body.lmaas.priority if body.lmaas else "low")
    except LmaasError as exc:
        raise type(exc)(exc.message, param=_request_param(exc.param)) from None


def _request_param(param: str | None) -> str | None:
    """The request field a queue error's `config.<field>` is."""
    if param is None or not param.startswith("config"):
        return "lmaas.concurrency" if param == "resources" else param
    field = param.removeprefix("config").removeprefix(".")
    top = field.split(".")[0]
    if top == "model":
        return "model"  # a line's body.model, or lmaas.model
    if top == "input":
        return "input_file_id"
    return f"lmaas.{field}" if field else None


@router.get("", response_model=BatchList)
def list_batches(
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    principal: Principal = Depends(authenticate),
) -> BatchList:
    """The caller's batches (an admin's: every tenant's), newest first; `after`: the last id of the previous page."""
    jobs, more = IDS.page(request, principal, after, limit)
    data = [_batch_out(j, job_report(request, j)) for j in jobs]
    return BatchList(data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)


@router.get("/{batch_id}", response_model=Batch)
def retrieve_batch(request: Request, batch_id: str, principal: Principal = Depends(authenticate)) -> Batch:
    job = IDS.visible(request, principal, batch_id)
    return _batch_out(job, job_report(request, job))


@router.post("/{batch_id}/cancel", response_model=Batch)
def cancel_batch(request: Request, batch_id: str, principal: Principal = Depends(authenticate)) -> Batch:
    """Cancel a batch: a queued one never starts; a running one stops and keeps the lines answered so far (400 when it ended)."""
    job = IDS.cancel(request, principal, batch_id)
    return _batch_out(job, job_report(request, job))


# ---- queue rows and reports -> batch objects ----


def _status(job: queue.QueuedJob, result: dict[str, Any] | None) -> str:
    if job.state in ("queued", "submitted"):
        return "validating"
    if job.state == "running":
        return "in_progress"
    if job.state == "succeeded":
        return "completed"
    if job.state == "failed":
        return "failed"
    if result is not None or job.admitted_at is None or time.time() - (job.finished_at or 0) > CANCEL_GRACE_S:
        return "cancelled"
    return "cancelling"  # stopped: its driver is publishing the lines answered so far


def _batch_out(job: queue.QueuedJob, report: dict[str, Any]) -> Batch:
    config, result, progress = job.config, report.get("result"), report.get("progress") or {}
    status = _status(job, result)
    counts = result or progress
    request_counts = BatchRequestCounts(total=counts.get("total") or 0, completed=counts.get("completed", 0), failed=counts.get("failed", 0))
    usage = None
    if result is not None:
        usage = BatchUsage(input_tokens=result["prompt_tokens"], output_tokens=result["output_tokens"],
                           total_tokens=result["prompt_tokens"] + result["output_tokens"])
    errors = None
    if job.state == "failed":
        reported = reported_error(report)
        errors = BatchErrors(data=[BatchError(code="batch_failed", message=reported["message"] if reported else job.message or "the batch failed",
                                              param=reported["data"].get("param") if reported else None)])
    ended = int(job.finished_at) if job.finished_at else None
    return Batch(
        id=IDS.of(job), endpoint=config.get("endpoint") or "", model=(result or {}).get("model") or config["model"], errors=errors,
        input_file_id=config["input"], completion_window=config.get("completion_window", "24h"), status=status,
        output_file_id=(result or {}).get("output_file_id"), error_file_id=(result or {}).get("error_file_id"),
        created_at=int(job.created_at), in_progress_at=int(job.admitted_at) if job.admitted_at else None,
        expires_at=int(job.created_at) + WINDOW_S, completed_at=ended if status == "completed" else None,
        finalizing_at=ended if status == "completed" else None, failed_at=ended if status == "failed" else None,
        cancelling_at=ended if job.state == "cancelled" else None, cancelled_at=ended if status == "cancelled" else None,
        request_counts=request_counts, usage=usage, metadata=config.get("metadata") or None,
    )
