"""Job queue REST API under `/api/v1/jobs`: the same operations as `lmaas jobs` (a thin map onto `ops.queue.ClusterQueue`).

    POST /api/v1/jobs                {"config": {...}, "kind", "priority", "tenant"} or {"command", "cpus", "gpus"} -> 201
    GET  /api/v1/jobs                newest first (`?state=queued&state=running&tenant=...&limit=`)
    GET  /api/v1/jobs/{id}
    POST /api/v1/jobs/{id}/cancel    a queued job never starts; a running one is stopped
    GET  /api/v1/jobs/{id}/logs      its Ray job's driver log (text/plain)

Scopes: reading needs `models:read`; submitting and cancelling a train, ingest or compress job
needs `models:write` (those jobs write datasets and model versions); a `command` job runs any
shell command on the cluster, so submitting one needs `admin`. A key sees and cancels only its own
tenant's jobs (another tenant's is 404, as if it did not exist) and submits for its own tenant;
admins see every tenant's and may submit for any. Submit and cancel are in the audit log
(`job.submit`, `job.cancel`), with the key as actor.

The gateway is part of the Ray cluster: a job is checked against the cluster's size and the
admitter is nudged at once. A standalone management app without `RAY_ADDRESS` queues it for the
admitter on the cluster and cannot read running jobs' logs (503); a running job it cancels (as one
cancelled where the dashboard is unreachable) is marked `stop requested` and stopped by the admitter
at its next round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse

from lmaas.auth import ADMIN, MODELS_READ, MODELS_WRITE, Principal
from lmaas.errors import InvalidInputError, LmaasError, NotFoundError, PermissionDeniedError
from lmaas.ops import queue
from lmaas.serve.auth import authenticate, require
from lmaas.serve.protocol.jobs import JobList, JobOut, SubmitJobRequest

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], dependencies=[require(MODELS_READ)])


def _queue(request: Request) -> queue.ClusterQueue:
    found = getattr(request.app.state, "jobs", None)
    if found is None:
        from lmaas.config import load_settings

        settings = load_settings()
        found = request.app.state.jobs = queue.ClusterQueue(settings, request.app.state.registry.engine,
                                                            lambda: queue.cluster_if_any(settings))
    return found


def _visible_job(request: Request, principal: Principal, job_id: int) -> queue.QueuedJob:
    """The job, or 404 when it is not the caller's tenant's (the same answer as for no such job)."""
    job = queue.get(_queue(request).engine, job_id)
    if principal.tenant_filter not in (None, job.tenant):
        raise NotFoundError(f"no job {job_id}; see GET /api/v1/jobs", param="id")
    return job


@dataclass(frozen=True)
class PublicJobIds:
    """How an OpenAI-shaped API names the queue's jobs of one kind (`ftjob-7`, `batch_7` for queue job 7) and finds
    them for a caller: another tenant's job, or one of another kind, is 404 exactly as one that does not exist."""

    kind: str
    prefix: str
    """`ftjob-`, `batch_`: the id is the prefix and the queue job's number."""
    what: str
    """What the API calls one, in messages: "fine-tuning job", "batch"."""
    route: str
    """Where the caller lists them: "/v1/fine_tuning/jobs"."""
    param: str
    """The path parameter's name: "fine_tuning_job_id"."""

    def of(self, job: queue.QueuedJob) -> str:
        return f"{self.prefix}{job.id}"

    def number(self, public_id: str, param: str) -> int:
        """The queue id in `public_id` (400 naming `after` when that is the param, else 404)."""
        number = public_id.removeprefix(self.prefix)
        if not public_id.startswith(self.prefix) or not number.isdigit():
            if param == "after":
                raise InvalidInputError(f"after must be a {self.what} id ({self.prefix}...), not {public_id!r}", param="after")
            raise NotFoundError(f"no {self.what} {public_id!r}; see GET {self.route}", param=param)
        return int(number)

    def visible(self, request: Request, principal: Principal, public_id: str) -> queue.QueuedJob:
        """The job, or 404 when it is not one of this kind of the caller's tenant."""
        missing = NotFoundError(f"no {self.what} {public_id!r}; see GET {self.route}", param=self.param)
        try:
            job = queue.get(_queue(request).engine, self.number(public_id, self.param))
        except NotFoundError:
            raise missing from None
        if job.kind != self.kind or principal.tenant_filter not in (None, job.tenant):
            raise missing
        return job


    def page(self, request: Request, principal: Principal, after: str | None, limit: int) -> tuple[list[queue.QueuedJob], bool]:
        """The caller's jobs of this kind (an admin's: every tenant's), newest first, after the one `after` names;
        and whether more follow."""
        before = self.number(after, "after") if after is not None else None
        jobs = queue.list_jobs(_queue(request).engine, kind=self.kind, tenant=principal.tenant_filter, before=before, limit=limit + 1)
        return jobs[:limit], len(jobs) > limit

    def cancel(self, request: Request, principal: Principal, public_id: str) -> queue.QueuedJob:
        """Cancel the caller's job `public_id` (`ops.queue.ClusterQueue.cancel`); errors name it by its public id."""
        job = self.visible(request, principal, public_id)
        try:
            return _queue(request).cancel(job.id, actor=principal.actor)
        except LmaasError as exc:
            raise type(exc)(exc.message.replace(f"job {job.id}", public_id), param=self.param) from None


def reported_error(report: dict[str, Any]) -> dict[str, Any] | None:
    """The last error event a job reported (`ops.queue.JobReport`), if any."""
    return next((e for e in reversed(report["events"]) if e["level"] == "error"), None)


def job_report(request: Request, job: queue.QueuedJob) -> dict[str, Any]:
    """What the job reported (`ops.queue.read_report`): events, progress, result."""
    return queue.read_report(request.app.state.registry.storage, job.id)


def _out(job: queue.QueuedJob) -> JobOut:
    return JobOut(**job.to_dict())


@router.post("", response_model=JobOut, status_code=201)
def submit_job(request: Request, body: SubmitJobRequest, principal: Principal = Depends(authenticate)) -> JobOut:
    """Queue a job; it starts when the cluster has room, highest priority first."""
    kind = body.kind or ("command" if body.command is not None else None)
    if kind is None and body.config is not None:
        kind = queue.infer_kind(body.config)
    if kind is None:
        raise InvalidInputError("send a job `config` (with its `kind`) or a `command`", param="config")
    needs = ADMIN if kind == "command" else MODELS_WRITE
    if not principal.has(needs):
        raise PermissionDeniedError(f"this API key lacks the {needs!r} scope ({kind} jobs need it)", param="authorization")
    tenant = body.tenant or principal.tenant
    if principal.tenant_filter not in (None, tenant):
        raise PermissionDeniedError(f"this API key submits jobs for tenant {principal.tenant!r} only", param="tenant")
    job = _queue(request).submit(
        kind=kind, config=body.config, entrypoint=body.command,
        resources={"CPU": body.cpus, "GPU": body.gpus} if kind == "command" else None,
        priority=body.priority, tenant=tenant, actor=principal.actor, privileged=principal.is_admin,
    )
    return _out(job)


@router.get("", response_model=JobList)
def list_jobs(
    request: Request,
    state: Annotated[list[str] | None, Query(description="Only these states (repeat the parameter for several).")] = None,
    tenant: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    principal: Principal = Depends(authenticate),
) -> JobList:
    """Jobs, newest first: the caller's tenant's, or every tenant's (or `tenant`'s) for an admin."""
    if principal.tenant_filter is not None:
        tenant = principal.tenant
    jobs = queue.list_jobs(_queue(request).engine, states=state or None, tenant=tenant, limit=limit)
    return JobList(data=[_out(j) for j in jobs])


@router.get("/{job_id}", response_model=JobOut)
def get_job(request: Request, job_id: int, principal: Principal = Depends(authenticate)) -> JobOut:
    return _out(_visible_job(request, principal, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, dependencies=[require(MODELS_WRITE)])
def cancel_job(request: Request, job_id: int, principal: Principal = Depends(authenticate)) -> JobOut:
    """Cancel a job: a queued one never starts, a running one is stopped (400 when it already finished)."""
    _visible_job(request, principal, job_id)
    return _out(_queue(request).cancel(job_id, actor=principal.actor))


@router.get("/{job_id}/logs", response_class=PlainTextResponse)
def job_logs(request: Request, job_id: int, principal: Principal = Depends(authenticate)) -> PlainTextResponse:
    """The job's output so far (400 before it started)."""
    _visible_job(request, principal, job_id)
    return PlainTextResponse(_queue(request).logs(job_id))
