"""The OpenAI fine-tuning API under `/v1/fine_tuning/jobs`: a thin map onto the job queue's `finetune` jobs.

    POST /v1/fine_tuning/jobs                       {"model", "training_file", "validation_file", "hyperparameters", "suffix", ...}
    GET  /v1/fine_tuning/jobs                       the caller's, newest first (`?after=ftjob-N&limit=`)
    GET  /v1/fine_tuning/jobs/{id}
    POST /v1/fine_tuning/jobs/{id}/cancel
    GET  /v1/fine_tuning/jobs/{id}/events           newest first (`?after=&limit=`): progress messages and step metrics
    GET  /v1/fine_tuning/jobs/{id}/checkpoints      newest first: the run's kept checkpoints (one per epoch) with their metrics

The real `openai` client's `client.fine_tuning.jobs.create/list/retrieve/cancel/list_events` and
`client.fine_tuning.jobs.checkpoints.list` work unchanged. A fine-tuning job is a queue job of kind
`finetune` (`ftjob-7` is `/api/v1/jobs/7`) whose config is a `train.finetune.FineTuneConfig`; the
queue checks it as the caller's tenant before queueing it (the base model and both files must be
the tenant's to read, a file an upload of purpose `fine-tune`, the result's name free or the
tenant's: 4xx naming the field, nothing queued) and runs it as that tenant. Once it succeeded,
`fine_tuned_model` (`<base name>-<suffix>:N`, a LoRA adapter version whose parent is the base) is a
`model` for `/v1/chat/completions` wherever a deployment of the base takes adapters.

What lmaas adds to OpenAI's request rides in `lmaas` (`extra_body={"lmaas": {...}}`): `method`
(lora or full), `lora`, `output_model`, `block_size` and `train` (other TrainConfig fields, e.g.
`num_workers`, `use_gpu`).

Scopes as for `/api/v1/jobs`: reading needs `models:read`, creating and cancelling `models:write`.
A key sees and cancels only its tenant's jobs (another tenant's is 404, as one that does not exist).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from lmaas.auth import MODELS_READ, MODELS_WRITE, Principal
from lmaas.errors import InvalidInputError, LmaasError
from lmaas.ops import queue
from lmaas.serve.auth import authenticate, require
from lmaas.serve.protocol.fine_tuning import (
    CheckpointMetrics,
    CreateFineTuningJobRequest,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    JobError,
)
from lmaas.serve.routers.jobs import PublicJobIds, _queue, job_report, reported_error

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], dependencies=[require(MODELS_READ)])

KIND = "finetune"
IDS = PublicJobIds(KIND, "ftjob-", "fine-tuning job", "/v1/fine_tuning/jobs", "fine_tuning_job_id")
STATUS = {"queued": "queued", "submitted": "running", "running": "running", "succeeded": "succeeded", "failed": "failed",
          "cancelled": "cancelled"}
"""Queue state -> OpenAI status (the files are validated before a job is queued, so none is `validating_files`)."""
LMAAS_OPTIONS = ("method", "lora", "output_model", "block_size", "train")


@router.post("", response_model=FineTuningJob, dependencies=[require(MODELS_WRITE)])
def create_job(request: Request, body: CreateFineTuningJobRequest, principal: Principal = Depends(authenticate)) -> FineTuningJob:
    """Queue a fine-tune of `model` on `training_file`, checked first (4xx naming the field, nothing queued)."""
    if body.integrations:
        raise InvalidInputError("integrations are not offered; the metrics are in the job's events and checkpoints", param="integrations")
    from_method = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    if body.hyperparameters is not None and from_method is not None:
        raise InvalidInputError("send hyperparameters once: in method.supervised.hyperparameters (or the older hyperparameters)",
                                param="hyperparameters")
    hyperparameters = body.hyperparameters or from_method
    config: dict[str, Any] = {"model": body.model, "training_file": body.training_file, "validation_file": body.validation_file,
                              "suffix": body.suffix, "metadata": body.metadata or {}}
    if hyperparameters is not None:
        config["hyperparameters"] = hyperparameters.model_dump()
    if body.seed is not None:
        config["seed"] = body.seed
    if body.lmaas is not None:
        config.update({k: v for k, v in body.lmaas.model_dump().items() if v is not None})
    try:
        job = _queue(request).submit(kind=KIND, config=config, tenant=principal.tenant, actor=principal.actor,
                                     privileged=principal.is_admin)
    except LmaasError as exc:
        raise type(exc)(exc.message, param=_request_param(exc.param, body)) from None
    return _job_out(job, job_report(request, job))


def _request_param(param: str | None, body: CreateFineTuningJobRequest) -> str | None:
    """The request field a queue error's `config.<field>` is (lmaas's own options live under `lmaas`)."""
    if param == "resources":
        return "lmaas.train"
    if param is None or not param.startswith("config"):
        return param
    field = param.removeprefix("config").removeprefix(".") or None
    if field is None:
        return None
    top = field.split(".")[0]
    if top == "output_model" and not (body.lmaas and body.lmaas.output_model):
        return "suffix"  # the default name is made of the base's name and the suffix
    return f"lmaas.{field}" if top in LMAAS_OPTIONS else field


@router.get("", response_model=FineTuningJobList)
def list_jobs(
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    principal: Principal = Depends(authenticate),
) -> FineTuningJobList:
    """The caller's fine-tuning jobs (an admin's: every tenant's), newest first; `after`: the last id of the previous page."""
    jobs, more = IDS.page(request, principal, after, limit)
    return FineTuningJobList(data=[_job_out(j, job_report(request, j)) for j in jobs], has_more=more)


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob)
def retrieve_job(request: Request, fine_tuning_job_id: str, principal: Principal = Depends(authenticate)) -> FineTuningJob:
    job = IDS.visible(request, principal, fine_tuning_job_id)
    return _job_out(job, job_report(request, job))


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob, dependencies=[require(MODELS_WRITE)])
def cancel_job(request: Request, fine_tuning_job_id: str, principal: Principal = Depends(authenticate)) -> FineTuningJob:
    """Cancel a job: a queued one never starts, a running one is stopped (400 when it already finished)."""
    job = IDS.cancel(request, principal, fine_tuning_job_id)
    return _job_out(job, job_report(request, job))


@router.get("/{fine_tuning_job_id}/events", response_model=FineTuningJobEventList)
def list_events(
    request: Request,
    fine_tuning_job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    principal: Principal = Depends(authenticate),
) -> FineTuningJobEventList:
    """The job's events, newest first: created, each message and step's metrics as the job reports them, how it ended."""
    job = IDS.visible(request, principal, fine_tuning_job_id)
    events = _events(job, job_report(request, job))[::-1]
    page, more = _page(events, after, limit)
    return FineTuningJobEventList(data=page, has_more=more)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=FineTuningJobCheckpointList)
def list_checkpoints(
    request: Request,
    fine_tuning_job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    principal: Principal = Depends(authenticate),
) -> FineTuningJobCheckpointList:
    """The run's kept checkpoints, newest first, once the job succeeded (the last is `fine_tuned_model`)."""
    job = IDS.visible(request, principal, fine_tuning_job_id)
    points = _checkpoints(job, job_report(request, job))[::-1]
    page, more = _page(points, after, limit)
    return FineTuningJobCheckpointList(data=page, has_more=more, first_id=page[0].id if page else None,
                                       last_id=page[-1].id if page else None)


# ---- queue rows and reports -> OpenAI objects ----


def _job_out(job: queue.QueuedJob, report: dict[str, Any]) -> FineTuningJob:
    config, result = job.config, report.get("result") or {}
    hyperparameters = result.get("hyperparameters") or config["hyperparameters"]
    error = None
    if job.state == "failed":
        reported = reported_error(report)
        error = JobError(code="job_failed", message=reported["message"] if reported else job.message or "the job failed",
                         param=(reported["data"].get("param") if reported else None))
    return FineTuningJob(
        id=f"ftjob-{job.id}", created_at=int(job.created_at), finished_at=int(job.finished_at) if job.finished_at else None,
        model=config["model"], fine_tuned_model=result.get("model") if job.state == "succeeded" else None, organization_id=job.tenant,
        status=STATUS[job.state], training_file=config["training_file"], validation_file=config.get("validation_file"),
        hyperparameters=hyperparameters, method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        trained_tokens=result.get("trained_tokens") if job.state == "succeeded" else None, error=error, seed=config["seed"],
        suffix=config.get("suffix"), metadata=config.get("metadata") or None,
    )


def _events(job: queue.QueuedJob, report: dict[str, Any]) -> list[FineTuningJobEvent]:
    """Oldest first: the job's creation, what it reported, and a cancellation or failure it could not report itself."""
    events = [FineTuningJobEvent(id=f"ftevent-{job.id}-0", created_at=int(job.created_at), level="info",
                                 message=f"Created fine-tuning job: ftjob-{job.id}")]
    for i, e in enumerate(report["events"], start=1):
        events.append(FineTuningJobEvent(id=f"ftevent-{job.id}-{i}", created_at=int(e["created_at"]), level=e["level"],
                                         message=e["message"], type=e["type"], data=e.get("data") or {}))
    reported_error = any(e["level"] == "error" for e in report["events"])
    if job.state == "cancelled" or (job.state == "failed" and not reported_error):
        message = "The job was cancelled" if job.state == "cancelled" else f"The job failed: {job.message or 'see its logs'}"
        events.append(FineTuningJobEvent(id=f"ftevent-{job.id}-end", created_at=int(job.finished_at or job.created_at),
                                         level="warn" if job.state == "cancelled" else "error", message=message))
    return events


def _checkpoints(job: queue.QueuedJob, report: dict[str, Any]) -> list[FineTuningJobCheckpoint]:
    """Oldest first; each dated by the metrics event of its step. The last one carries the validation file's metrics."""
    result = report.get("result") or {}
    if job.state != "succeeded" or not result.get("checkpoints"):
        return []
    reported_at = {e["data"].get("step"): e["created_at"] for e in report["events"] if e["type"] == "metrics"}
    final = {k: result["metrics"][k] for k in ("full_valid_loss", "full_valid_mean_token_accuracy") if k in result.get("metrics", {})}
    points = result["checkpoints"]
    return [
        FineTuningJobCheckpoint(
            id=f"ftckpt-{job.id}-{p['step']}", created_at=int(reported_at.get(p["step"], job.finished_at or job.created_at)),
            fine_tuned_model_checkpoint=p["checkpoint"], fine_tuning_job_id=f"ftjob-{job.id}", step_number=p["step"],
            metrics=CheckpointMetrics(**p["metrics"], **(final if i == len(points) - 1 else {})),
        )
        for i, p in enumerate(points)
    ]


def _page(items: list[Any], after: str | None, limit: int) -> tuple[list[Any], bool]:
    """The `limit` items following the one whose id is `after` (from the start without it), and whether more follow."""
    start = 0
    if after is not None:
        ids = [item.id for item in items]
        if after not in ids:
            raise InvalidInputError(f"after: {after!r} is not one of this job's ids", param="after")
        start = ids.index(after) + 1
    return items[start : start + limit], len(items) > start + limit
