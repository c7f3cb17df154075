"""The job queue: admission control in front of the Ray Jobs API.

    lmaas jobs submit jobs/configs/train_tiny_cpu.yaml --priority high
    lmaas jobs submit --command "python my_eval.py" --cpus 1 --priority low
    lmaas jobs list / cancel ID / logs ID
    POST /api/v1/jobs, GET /api/v1/jobs[/ID[/logs]], POST /api/v1/jobs/ID/cancel   (the same, over REST)

Submitting many jobs at once with `ray job submit` starts every driver at once and overloads the
head (ray#41241). Here a submission is a row in the database (`queued_jobs`), validated before it
is queued; one admitter (`JobQueue`, a detached Ray actor, or `Admitter.tick` in-process) hands
jobs to the Ray Jobs API only when the resources they ask for are free:

- highest priority first, FIFO within a priority; a job that does not fit holds back the jobs
  behind it (no overtaking, so a big job is never starved by a stream of small ones);
- at most `max_running_per_tenant` jobs of one tenant run at once; the tenant's further jobs wait
  without blocking other tenants;
- "free" is the smaller of what Ray reports available now and the cluster total minus what
  admitted jobs asked for (a just-admitted job has not claimed its workers yet).

The database is the source of truth: a restarted admitter carries on where the last one stopped.
`ClusterQueue` is what `lmaas jobs` and `/api/v1/jobs` share: the queue plus the cluster it is
admitted to (capacity checked on submit, the admitter nudged, running jobs stopped and their logs
read through Ray's Jobs API).

Each lmaas job (train, ingest, compress, finetune, batch) runs as `python -m lmaas.ops.queue ID`, which
reads its validated config back from the database, so nothing has to be uploaded and any node can
run it. What a job reports besides its state (its result, and a fine-tune's progress events) is kept
in the artifact store as `jobs/<id>/report.json` (`JobReport`, `read_report`): what
`/v1/fine_tuning/jobs` and `/v1/batches` answer from.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from lmaas.db import record_event
from lmaas.db.schema import queued_jobs
from lmaas.errors import InvalidInputError, NotFoundError, PermissionDeniedError, UnreachableError
from lmaas.ops.metrics import JobMetrics

log = logging.getLogger("lmaas.queue")
_metrics = JobMetrics()

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
KINDS = ("train", "ingest", "compress", "finetune", "batch", "command")
ACTIVE = ("submitted", "running")
FINISHED = ("succeeded", "failed", "cancelled")
STATES = ("queued", *ACTIVE, *FINISHED)
ACTOR_NAMESPACE = "lmaas"
STOPPED = "stopped by request"
STOP_REQUESTED = "stop requested"
"""The message of a job cancelled while running by a process without Ray's Jobs API: the admitter stops it."""


@dataclass(frozen=True)
class QueuedJob:
    """One row of the queue."""

    id: int
    tenant: str
    kind: str
    priority: int
    state: str
    config: dict[str, Any]
    entrypoint: str | None
    resources: dict[str, float]
    submission_id: str | None
    created_at: float
    admitted_at: float | None
    finished_at: float | None
    message: str

    @property
    def priority_name(self) -> str:
        return {v: k for k, v in PRIORITIES.items()}[self.priority]

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON (`lmaas jobs list --json`, `/api/v1/jobs`), its priority by name."""
        return {**asdict(self), "priority": self.priority_name}


# ---- what a job asks for ----


def job_config(kind: str, config: dict[str, Any]) -> Any:
    """The validated config object of a `kind` job (pydantic raises on bad fields)."""
    if kind == "train":
        from lmaas.train.config import TrainConfig

        return TrainConfig.model_validate(config)
    if kind == "ingest":
        from lmaas.data.config import IngestConfig

        return IngestConfig.model_validate(config)
    if kind == "compress":
        from lmaas.compress import CompressConfig

        return CompressConfig.model_validate(config)
    if kind == "finetune":
        from lmaas.train.finetune import FineTuneConfig

        return FineTuneConfig.model_validate(config)
    if kind == "batch":
        from lmaas.batch.job import BatchJobConfig

        return BatchJobConfig.model_validate(config)
    raise InvalidInputError(f"unknown job kind {kind!r}; one of {', '.join(KINDS)}", param="kind")


def infer_kind(config: dict[str, Any]) -> str:
    """The one kind whose config schema has every field `config` sets, and `config` every field it requires
    (values are checked later).

    Raises:
        InvalidInputError: none or several have them (pass the kind explicitly).
    """
    from lmaas.batch.job import BatchJobConfig
    from lmaas.compress import CompressConfig
    from lmaas.data.config import IngestConfig
    from lmaas.train.config import TrainConfig
    from lmaas.train.finetune import FineTuneConfig

    schemas = {"train": TrainConfig, "ingest": IngestConfig, "compress": CompressConfig, "finetune": FineTuneConfig,
               "batch": BatchJobConfig}
    fits = [kind for kind, schema in schemas.items() if set(config) <= set(schema.model_fields)
            and {name for name, f in schema.model_fields.items() if f.is_required()} <= set(config)]
    if len(fits) != 1:
        what = "no job kind" if not fits else f"several job kinds ({', '.join(fits)})"
        raise InvalidInputError(f"the config's fields fit {what}; pass --kind {'|'.join(KINDS[:-1])}", param="kind")
    return fits[0]


def resources_for(kind: str, config: Any) -> dict[str, float]:
    """Logical Ray resources a job needs while it runs (what admission checks)."""
    if kind in ("train", "finetune"):
        from lmaas.train.run import DATA_CPUS

        if kind == "finetune":
            config = config.train_config(examples=1)  # the workers it asks for do not depend on the file
        gpus = config.num_workers if config.use_gpu else 0
        return {"CPU": config.num_workers * config.cpus_per_worker + DATA_CPUS, **({"GPU": float(gpus)} if gpus else {})}
    if kind == "batch":  # its model actors (one at least, when it takes as many as the cluster holds)
        actors = config.concurrency or 1
        return {"CPU": actors * config.num_cpus, **({"GPU": actors * config.num_gpus} if config.num_gpus else {})}
    return {"CPU": 1.0}


# ---- the queue in the database ----


def submit(
    engine: Engine,
    *,
    kind: str,
    config: dict[str, Any] | None = None,
    entrypoint: str | None = None,
    resources: dict[str, float] | None = None,
    priority: str = "normal",
    tenant: str = "default",
    capacity: dict[str, float] | None = None,
    actor: str = "queue",
    privileged: bool = False,
    storage: Any = None,
) -> QueuedJob:
    """Validate and queue one job; nothing runs until the admitter hands it to Ray.

    Args:
        kind: `train`, `ingest`, `compress`, `finetune`, `batch`, or `command` (any shell `entrypoint`).
        config: the job's config (validated now, stored as validated).
        entrypoint: `command` jobs only.
        resources: `command` jobs: `{"CPU": 1, "GPU": 0}` reserved for the entrypoint.
        capacity: the cluster's total resources; a job that could never fit is refused.
        actor: who submits it, as the audit log names them.
        privileged: an admin (or the operator's CLI) submits it. Everyone else's jobs run as
            `tenant` (see `execute`) and may not reach outside the platform's stores: ingest
            sources must be the tenant's own uploads (`lmaas.data.sources.check_tenant_source`,
            against `storage`), and paths on the job's node (`torchscript_dir`) are refused.
            A finetune job is checked as its tenant whoever submits it (`train.finetune.check_fine_tune`: the base
            model, the files and the output name), and a tenant's may name files by upload id or under its own area only.
            A batch job likewise (`batch.check_batch`: the model, the input and the outputs, as its tenant).
        storage: the artifact store jobs run against (`lmaas.storage.Storage`; needed unless privileged, and for finetune jobs).

    Raises:
        InvalidInputError: unknown kind or priority, a bad config (the message names the field),
            a job bigger than the cluster.
        PermissionDeniedError: an unprivileged job names a source or path it may not.
        NotFoundError: a finetune job's base model or file that its tenant cannot see (`param` `config.model`, ...).
    """
    from pydantic import ValidationError

    if priority not in PRIORITIES:
        raise InvalidInputError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}", param="priority")
    if not tenant or len(tenant) > 200:
        raise InvalidInputError("tenant must be 1 to 200 characters", param="tenant")
    if kind == "command":
        if not entrypoint or not entrypoint.strip():
            raise InvalidInputError("a command job needs a non-empty command", param="command")
        if config:
            raise InvalidInputError("a command job runs its command and takes no config", param="config")
        resources = {k: float(v) for k, v in (resources or {"CPU": 1.0}).items() if v}
        if any(v < 0 for v in resources.values()):
            raise InvalidInputError("resources must be >= 0", param="resources")
        stored: dict[str, Any] = {}
    else:
        if entrypoint:
            raise InvalidInputError(f"a {kind} job runs its config; a command (--command) is for command jobs", param="command")
        if kind == "ingest" and isinstance((config or {}).get("sources"), list):
            config = {**config, "sources": _file_sources(config["sources"], engine, storage, None if privileged else tenant)}
        try:
            validated = job_config(kind, config or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidInputError(f"{kind} config: {where or kind}: {first['msg']}", param=f"config.{where}" if where else "config") from None
        stored = validated.model_dump(mode="json")
        resources = resources_for(kind, validated)
        if not privileged:
            _check_unprivileged(kind, validated, storage, tenant)
        if kind in ("finetune", "batch"):
            _check_as_tenant(kind, validated, engine, storage, tenant)
    if capacity is not None:
        for name, amount in resources.items():
            if amount > capacity.get(name, 0.0) + 1e-9:
                raise InvalidInputError(
                    f"the job asks for {amount:g} {name} and the cluster has {capacity.get(name, 0.0):g}; "
                    "it could never start", param="resources")
    with engine.begin() as conn:
        job_id = conn.execute(
            queued_jobs.insert().values(
                tenant=tenant, kind=kind, priority=PRIORITIES[priority], state="queued", config=stored,
                entrypoint=entrypoint, resources=resources, created_at=time.time(), message="",
            )
        ).inserted_primary_key[0]
        record_event(conn, actor=actor, action="job.submit", target=f"job:{job_id}", tenant=tenant,
                     detail={"kind": kind, "priority": priority, "resources": resources})
    return get(engine, int(job_id))


def _file_sources(sources: list, engine: Engine, storage: Any, tenant: str | None) -> list:
    """Uploaded files named by id (`file-...`, see `registry.files`) as the paths of their bytes; 404 for another tenant's."""
    from lmaas.registry.files import FileStore, is_file_id, resolve_sources

    if not any(isinstance(s, str) and is_file_id(s) for s in sources):
        return sources
    storage = storage if storage is not None else _default_storage()
    try:
        return resolve_sources(sources, FileStore(storage, engine), tenant=tenant)
    except NotFoundError as exc:
        raise NotFoundError(exc.message, param="config.sources") from None


def _check_as_tenant(kind: str, config: Any, engine: Engine, storage: Any, tenant: str) -> None:
    """A finetune job's base, files and output name, or a batch job's model, input and outputs, as its tenant sees
    them (`train.finetune.check_fine_tune`, `batch.check_batch`; errors name `config.<field>`)."""
    from lmaas.errors import LmaasError

    storage = storage if storage is not None else _default_storage()
    try:
        if kind == "finetune":
            from lmaas.train.finetune import check_fine_tune

            check_fine_tune(config, storage=storage, engine=engine, tenant=tenant)
        else:
            from lmaas.batch import check_batch
            from lmaas.batch.job import base_config
            from lmaas.registry import ModelRegistry

            check_batch(base_config(config), registry=ModelRegistry(storage, engine), tenant=tenant)
    except LmaasError as exc:
        raise type(exc)(exc.message, param=f"config.{exc.param}" if exc.param else "config") from None


def _default_storage() -> Any:
    """The artifact store of this process's settings (a caller that passed none)."""
    from lmaas.config import load_settings
    from lmaas.storage import Storage

    return Storage.from_settings(load_settings())


def _check_unprivileged(kind: str, config: Any, storage: Any, tenant: str) -> None:
    """Refuse what only an admin's job may do: read arbitrary sources, write to the node's disk."""
    if kind == "ingest":
        from lmaas.data.sources import check_tenant_source

        if storage is None:
            raise PermissionDeniedError("a tenant's ingest job needs the artifact store to check its sources against", param="sources")
        for source in config.sources:
            check_tenant_source(source, storage, tenant)
    if kind == "finetune":
        from lmaas.data.sources import check_tenant_source
        from lmaas.registry.files import is_file_id

        if storage is None:
            raise PermissionDeniedError("a tenant's finetune job needs the artifact store to check its files against", param="config")
        for name in ("training_file", "validation_file"):
            value = getattr(config, name)
            if value and not is_file_id(value):
                try:
                    check_tenant_source(value, storage, tenant)
                except PermissionDeniedError as exc:
                    raise PermissionDeniedError(exc.message, param=f"config.{name}") from None
    if kind in ("train", "finetune"):
        train = config.train_config(examples=1) if kind == "finetune" else config
        if train.resources_per_worker:
            param = "config.train.resources_per_worker" if kind == "finetune" else "config.resources_per_worker"
            raise PermissionDeniedError("custom Ray resources pin workers to nodes: only an admin's job sets them", param=param)
    if kind == "batch":
        from lmaas.serve.records import check_engine_kwargs

        check_engine_kwargs(config.engine, "config.engine.engine_kwargs")
    if kind == "compress" and getattr(config, "torchscript_dir", None):
        raise PermissionDeniedError("torchscript_dir writes to the job's node: only an admin's job may set it", param="config.torchscript_dir")


def get(engine: Engine, job_id: int) -> QueuedJob:
    """One job. Raises `NotFoundError`."""
    with engine.connect() as conn:
        row = conn.execute(queued_jobs.select().where(queued_jobs.c.id == job_id)).mappings().first()
    if row is None:
        raise NotFoundError(f"no job {job_id}; see `lmaas jobs list`", param="id")
    return _job(row)


def list_jobs(engine: Engine, *, states: Iterable[str] | None = None, tenant: str | None = None, limit: int = 200,
              kind: str | None = None, before: int | None = None) -> list[QueuedJob]:
    """Jobs, newest first.

    Args:
        kind: only jobs of this kind.
        before: only jobs with a smaller id (the page after job `before`).

    Raises:
        InvalidInputError: an unknown state.
    """
    if states is not None:
        states = list(states)
        unknown = [s for s in states if s not in STATES]
        if unknown:
            raise InvalidInputError(f"unknown job state {unknown[0]!r}; one of {', '.join(STATES)}", param="state")
    query = queued_jobs.select().order_by(queued_jobs.c.id.desc()).limit(limit)
    if states is not None:
        query = query.where(queued_jobs.c.state.in_(list(states)))
    if tenant is not None:
        query = query.where(queued_jobs.c.tenant == tenant)
    if kind is not None:
        query = query.where(queued_jobs.c.kind == kind)
    if before is not None:
        query = query.where(queued_jobs.c.id < before)
    with engine.connect() as conn:
        return [_job(r) for r in conn.execute(query).mappings()]


def cancel(engine: Engine, job_id: int, jobs_api: "JobsApi | None" = None, *, actor: str = "queue") -> QueuedJob:
    """Cancel a job: a queued one never starts; a running one is stopped through `jobs_api`, or, without one (this
    process cannot reach Ray's Jobs API), marked `STOP_REQUESTED` for the admitter to stop at its next round.

    Either way the job is `cancelled` from now on; its driver gets SIGTERM (a batch publishes what it answered).

    Args:
        actor: who cancels it, as the audit log names them.

    Raises:
        NotFoundError: no such job.
        InvalidInputError: it already finished.
    """
    job = get(engine, job_id)
    if job.state in FINISHED:
        raise InvalidInputError(f"job {job_id} already {job.state}", param="id")
    if job.state == "queued":
        with engine.begin() as conn:
            done = conn.execute(
                queued_jobs.update().where(queued_jobs.c.id == job_id, queued_jobs.c.state == "queued")
                .values(state="cancelled", finished_at=time.time(), message="cancelled before it started")
            ).rowcount
            if done:
                record_event(conn, actor=actor, action="job.cancel", target=f"job:{job_id}", tenant=job.tenant,
                             detail={"state": "queued"})
        if done:
            return get(engine, job_id)
        job = get(engine, job_id)  # admitted meanwhile: stop it below
    if jobs_api is not None:
        jobs_api.stop(job.submission_id)
    with engine.begin() as conn:
        conn.execute(queued_jobs.update().where(queued_jobs.c.id == job_id, queued_jobs.c.state.in_(ACTIVE))
                     .values(state="cancelled", finished_at=time.time(), message=STOPPED if jobs_api is not None else STOP_REQUESTED))
        record_event(conn, actor=actor, action="job.cancel", target=f"job:{job_id}", tenant=job.tenant,
                     detail={"state": job.state, "submission_id": job.submission_id})
    return get(engine, job_id)


def _job(row: Any) -> QueuedJob:
    return QueuedJob(**{c.name: row[c.name] for c in queued_jobs.columns})


# ---- admission ----


def plan(queued: list[QueuedJob], active: list[QueuedJob], free: dict[str, float], max_running_per_tenant: int) -> list[QueuedJob]:
    """The queued jobs to admit now, in order (pure: no Ray, no database).

    Highest priority first, FIFO within one; a job that does not fit in `free` stops admission
    (jobs behind it wait their turn); a tenant at its running limit is skipped without blocking.
    """
    free = dict(free)
    running: dict[str, int] = {}
    for job in active:
        running[job.tenant] = running.get(job.tenant, 0) + 1
    admit = []
    for job in sorted(queued, key=lambda j: (j.priority, j.id)):
        if running.get(job.tenant, 0) >= max_running_per_tenant:
            continue
        if any(amount > free.get(name, 0.0) + 1e-9 for name, amount in job.resources.items()):
            break
        for name, amount in job.resources.items():
            free[name] = free.get(name, 0.0) - amount
        running[job.tenant] = running.get(job.tenant, 0) + 1
        admit.append(job)
    return admit


class JobsApi(Protocol):
    """What the admitter needs from Ray's Jobs API (`RayJobsApi`)."""

    def submit(self, job: QueuedJob, submission_id: str) -> None: ...
    def status(self, submission_id: str) -> tuple[str, str]: ...
    def stop(self, submission_id: str) -> None: ...
    def logs(self, submission_id: str) -> str: ...


STOP_GRACE = {"batch": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}
"""Seconds Ray's Jobs API waits after a stop's SIGTERM before SIGKILL (default 3): a cancelled batch uses them to
finish the block in hand and publish the lines answered so far."""


class RayJobsApi:
    """`JobsApi` over `ray.job_submission.JobSubmissionClient` (the dashboard's HTTP API).

    Args:
        address: the dashboard URL (None: found the way `ray job submit` finds it).
        env: environment variables of every job (the lmaas settings: store, database).
    """

    STATES = {"PENDING": "submitted", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "cancelled"}

    def __init__(self, address: str | None, env: dict[str, str]) -> None:
        from ray.job_submission import JobSubmissionClient

        self.client, self.env = JobSubmissionClient(address), dict(env)
        """What every job's runtime_env sets: `Settings.env(secrets=False)` (no passwords or cloud keys: Ray shows it)."""

    def submit(self, job: QueuedJob, submission_id: str) -> None:
        if job.kind == "command":
            entrypoint = job.entrypoint
            reserve = {"entrypoint_num_cpus": job.resources.get("CPU", 0), "entrypoint_num_gpus": job.resources.get("GPU", 0)}
        else:
            entrypoint = f"{sys.executable} -m lmaas.ops.queue {job.id}"
            reserve = {}  # the job's Ray Train / Data workers claim its resources, not its driver
        env = {**self.env, **STOP_GRACE.get(job.kind, {})}
        self.client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env={"env_vars": env},
                               metadata={"lmaas_job": str(job.id), "tenant": job.tenant, "kind": job.kind}, **reserve)

    def status(self, submission_id: str) -> tuple[str, str]:
        info = self.client.get_job_info(submission_id)
        state = self.STATES.get(str(getattr(info.status, "value", info.status)), "running")
        message = info.message or ""
        if state == "failed":
            lines = [line for line in self.logs(submission_id).splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("error:")]
            message = (errors or lines or [message])[-1][:500]
        return state, message

    def stop(self, submission_id: str) -> None:
        self.client.stop_job(submission_id)

    def logs(self, submission_id: str) -> str:
        return self.client.get_job_logs(submission_id)


@dataclass
class Admitter:
    """Moves the queue forward: syncs admitted jobs' states from Ray, then admits what fits.

    Args:
        engine: the queue's database.
        jobs_api: Ray's Jobs API (`RayJobsApi`).
        resources: () -> (total, available) logical resources of the cluster now.
        max_running_per_tenant: jobs of one tenant admitted at once.
    """

    engine: Engine
    jobs_api: JobsApi
    resources: Callable[[], tuple[dict[str, float], dict[str, float]]]
    max_running_per_tenant: int = 4
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def tick(self) -> list[int]:
        """One round; returns the ids admitted."""
        with self._lock:
            self._sync()
            admitted = self._admit()
            self._record_counts()
            return admitted

    def _record_counts(self) -> None:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(queued_jobs.c.state, sa.func.count()).where(queued_jobs.c.state.in_(("queued", *ACTIVE)))
                                .group_by(queued_jobs.c.state)).all()
        _metrics.counts({state: int(n) for state, n in rows})

    def _sync(self) -> None:
        with self.engine.connect() as conn:
            to_stop = [_job(r) for r in conn.execute(queued_jobs.select().where(
                queued_jobs.c.state == "cancelled", queued_jobs.c.message == STOP_REQUESTED)).mappings()]
        for job in to_stop:
            if job.submission_id:
                try:
                    self.jobs_api.stop(job.submission_id)
                except Exception as exc:  # noqa: BLE001 - the dashboard restarting: try again next tick
                    log.warning("job %s: could not stop it (%s)", job.id, exc)
                    continue
                with self.engine.begin() as conn:
                    conn.execute(queued_jobs.update().where(queued_jobs.c.id == job.id, queued_jobs.c.message == STOP_REQUESTED)
                                 .values(message=STOPPED))
        for job in list_jobs(self.engine, states=ACTIVE):
            try:
                state, message = self.jobs_api.status(job.submission_id)
            except Exception as exc:  # noqa: BLE001 - the dashboard restarting: try again next tick
                log.warning("job %s: status unavailable (%s)", job.id, exc)
                continue
            if state == job.state:
                continue
            values: dict[str, Any] = {"state": state, "message": message}
            if state in FINISHED:
                values["finished_at"] = time.time()
            with self.engine.begin() as conn:
                changed = conn.execute(queued_jobs.update().where(queued_jobs.c.id == job.id, queued_jobs.c.state == job.state)
                                       .values(**values)).rowcount
                if changed and state in FINISHED:
                    _metrics.finished(job.kind, state)
                    record_event(conn, actor="queue", action=f"job.{state}", target=f"job:{job.id}", tenant=job.tenant,
                                 outcome="ok" if state == "succeeded" else state, detail={"message": message})

    def _admit(self) -> list[int]:
        queued = list_jobs(self.engine, states=["queued"], limit=10_000)
        if not queued:
            return []
        active = list_jobs(self.engine, states=ACTIVE, limit=10_000)
        total, available = self.resources()
        reserved: dict[str, float] = {}
        for job in active:
            for name, amount in job.resources.items():
                reserved[name] = reserved.get(name, 0.0) + amount
        free = {name: min(available.get(name, 0.0), amount - reserved.get(name, 0.0)) for name, amount in total.items()}
        admitted = []
        for job in plan(queued, active, free, self.max_running_per_tenant):
            submission_id = f"lmaas-job-{job.id}-{int(time.time() * 1000) % 100000:05d}"
            with self.engine.begin() as conn:  # claim it first: a concurrent cancel wins or loses cleanly
                claimed = conn.execute(
                    queued_jobs.update().where(queued_jobs.c.id == job.id, queued_jobs.c.state == "queued")
                    .values(state="submitted", submission_id=submission_id, admitted_at=time.time())
                ).rowcount
            if not claimed:
                continue
            try:
                self.jobs_api.submit(job, submission_id)
            except Exception as exc:  # noqa: BLE001 - refused by Ray: record why, keep admitting others
                with self.engine.begin() as conn:
                    conn.execute(queued_jobs.update().where(queued_jobs.c.id == job.id)
                                 .values(state="failed", finished_at=time.time(), message=f"Ray refused the job: {exc}"[:500]))
                _metrics.finished(job.kind, "failed")
                continue
            admitted.append(job.id)
        return admitted


def ray_resources() -> tuple[dict[str, float], dict[str, float]]:
    """(total, available) CPU/GPU of the connected cluster."""
    import ray

    def pick(resources: dict[str, float]) -> dict[str, float]:
        return {k: float(v) for k, v in resources.items() if k in ("CPU", "GPU")}

    return pick(ray.cluster_resources()), pick(ray.available_resources())


# ---- the admitter as a detached actor on the cluster ----


class JobQueue:
    """A queue database's one admitter (a detached, CPU-less actor, see `queue_actor`); ticks every `interval_s`."""

    def __init__(self, database_url: str, dashboard_url: str | None, env: dict[str, str], max_running_per_tenant: int,
                 interval_s: float = 0.5) -> None:
        from lmaas import db

        self.admitter = Admitter(db.connect(database_url), RayJobsApi(dashboard_url, env), ray_resources, max_running_per_tenant)
        self.interval_s = interval_s
        self._wake = threading.Event()
        threading.Thread(target=self._loop, name="lmaas-queue", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                self.admitter.tick()
            except Exception:  # noqa: BLE001 - the database restarting: log, try again next tick
                log.exception("queue tick failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def nudge(self) -> None:
        """Tick now (a job was submitted or cancelled)."""
        self._wake.set()

    def stop(self, submission_id: str) -> None:
        self.admitter.jobs_api.stop(submission_id)

    def logs(self, submission_id: str) -> str:
        return self.admitter.jobs_api.logs(submission_id)


def queue_actor(settings: Any, dashboard_url: str | None, max_running_per_tenant: int = 4) -> Any:
    """The `JobQueue` actor of this database on the cluster, started if none runs (Ray must be connected).

    One admitter per queue database: its name carries a hash of the database URL, so lmaas
    installations with their own databases can share a Ray cluster.
    """
    import hashlib

    import ray

    name = "lmaas-job-queue-" + hashlib.sha256(settings.database_url.encode()).hexdigest()[:12]
    actor = ray.remote(JobQueue).options(
        name=name, namespace=ACTOR_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=-1, max_concurrency=4, runtime_env={"env_vars": settings.worker_env()},
    )
    return actor.remote(settings.database_url, dashboard_url, settings.env(secrets=False), max_running_per_tenant)


# ---- the queue as users drive it: `lmaas jobs` and `/api/v1/jobs` ----


@dataclass
class ClusterQueue:
    """The queue of one database plus the Ray cluster it is admitted to.

    Args:
        settings: the lmaas settings (the admitter actor runs with them).
        engine: the queue's database.
        cluster: () -> the connected cluster's `lmaas.cluster.ClusterInfo`, or None where this process
            has no cluster (jobs are queued unchecked for the admitter on the cluster; running jobs
            cannot be stopped or read from here). The CLI's raises instead: it insists on a cluster.
    """

    settings: Any
    engine: Engine
    cluster: Callable[[], Any]

    def submit(self, **job: Any) -> QueuedJob:
        """`submit` (same arguments but `capacity`) checked against the cluster's size, then the admitter is nudged."""
        info = self.cluster()
        capacity = {k: v for k, v in info.resources.items() if k in ("CPU", "GPU")} if info is not None else None
        if not job.get("privileged") and job.get("storage") is None:
            from lmaas.storage import Storage

            job["storage"] = Storage.from_settings(self.settings)
        queued = submit(self.engine, capacity=capacity, **job)
        if info is not None and info.dashboard_url:  # the admitter needs the Jobs API (the dashboard) to admit anything
            queue_actor(self.settings, info.dashboard_url, self.settings.max_running_jobs_per_tenant).nudge.remote()
        return queued

    def cancel(self, job_id: int, *, actor: str = "queue") -> QueuedJob:
        """`cancel`, stopping a running job through the cluster's Jobs API."""
        api = self.jobs_api() if get(self.engine, job_id).state in ACTIVE else None
        return cancel(self.engine, job_id, api, actor=actor)

    def logs(self, job_id: int) -> str:
        """A job's output so far (its Ray job's driver log).

        Raises:
            InvalidInputError: the job has not started.
            UnreachableError: no cluster to read it from.
        """
        job = get(self.engine, job_id)
        if job.submission_id is None:
            raise InvalidInputError(f"job {job_id} is {job.state} and has not started; no logs yet", param="id")
        api = self.jobs_api()
        if api is None:
            raise UnreachableError(f"job {job_id}'s logs are on the Ray cluster and this process has none; set RAY_ADDRESS")
        return api.logs(job.submission_id)

    def jobs_api(self) -> "RayJobsApi | None":
        """Ray's Jobs API of the cluster, or None where this process has no cluster or cannot reach its dashboard."""
        info = self.cluster()
        if info is None or not info.dashboard_url:
            return None
        try:
            return RayJobsApi(info.dashboard_url, self.settings.env(secrets=False))
        except ConnectionError:  # a cluster started without its dashboard (`include_dashboard=False`), or a dashboard down
            return None


def cluster_if_any(settings: Any) -> Any:
    """The cluster this process is part of (a Serve replica) or `RAY_ADDRESS` names, else None (never starts one)."""
    import ray

    from lmaas import cluster

    if ray.is_initialized() or settings.ray_address:
        return cluster.connect(settings)
    return None


# ---- running one job (the Ray job's entrypoint) ----

REPORTS_PREFIX = "jobs"
REPORT_FILE = "report.json"


class JobReport:
    """What a running job reports besides its state, rewritten whole (atomically) at each change:
    `{"events": [...], "result": {...} | None}` in `jobs/<id>/report.json` of the artifact store.

    Jobs write it, `read_report` reads it; a tenant reads it only through the job's own row (the
    routes check the row's tenant), and tenants' ingest jobs cannot name it (it is outside `uploads/`).
    """

    def __init__(self, storage: Any, job_id: int) -> None:
        self.storage, self.path = storage, f"{REPORTS_PREFIX}/{job_id}/{REPORT_FILE}"
        self.events: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None
        self.state: dict[str, Any] | None = None
        """Where a running job stands, replaced at each report (a batch's line counts)."""
        self._lock = threading.Lock()  # events arrive from a training run's progress thread too

    def event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)
            self._write()

    def progress(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.state = state
            self._write()

    def finish(self, result: dict[str, Any]) -> None:
        with self._lock:
            self.result = result
            self._write()

    def _write(self) -> None:
        import json

        self.storage.write_text(self.path, json.dumps({"events": self.events, "result": self.result, "progress": self.state}))


def read_report(storage: Any, job_id: int) -> dict[str, Any]:
    """A job's report (see `JobReport`): no events, no result and no progress before it started."""
    import json

    path = f"{REPORTS_PREFIX}/{job_id}/{REPORT_FILE}"
    if not storage.exists(path):
        return {"events": [], "result": None, "progress": None}
    return {"progress": None, **json.loads(storage.read_text(path))}



def execute(job_id: int) -> int:
    """Run queued job `job_id` in this process (its Ray job's driver); returns an exit status.

    The job acts as its tenant throughout: models, datasets, teachers and `init_from` resolve as
    that tenant sees them, and what it registers or ingests belongs to that tenant (another
    tenant's model or dataset name is refused). Signing and encryption keys come from the
    environment (`ModelRegistry.configured`).
    """
    import json

    from lmaas import cluster, db
    from lmaas.config import load_settings
    from lmaas.errors import LmaasError
    from lmaas.registry import ModelRegistry
    from lmaas.storage import Storage

    settings = load_settings()
    engine = db.connect(settings.database_url)
    job = get(engine, job_id)
    config = job_config(job.kind, job.config)
    storage = Storage.from_settings(settings)
    registry = ModelRegistry.configured(storage, engine).acting_for(job.tenant).as_actor(f"job:{job.id}")
    print(f"lmaas job {job.id}: {job.kind} for tenant {job.tenant}", flush=True)
    report = JobReport(storage, job.id)
    try:
        cluster.connect(settings)
        if job.kind == "train":
            from lmaas.train.run import train

            result = train(config, storage=storage, engine=engine, tenant=job.tenant, progress=lambda m: print(
                f"step {m['step']}/{config.max_steps} loss {m['loss']:.3f} {m['tokens_per_s']:,.0f} tokens/s", flush=True))
            out = {"run_id": result.run_id, "model": result.model_version.ref if result.model_version else None}
        elif job.kind == "ingest":
            from lmaas.data.ingest import ingest

            v = ingest(config, storage=storage, engine=engine, endpoint_url=settings.s3_endpoint_url, tenant=job.tenant).version
            out = {"dataset": v.ref, "tokens": v.tokens}
        elif job.kind == "finetune":
            from lmaas.train.finetune import fine_tune

            def progress(event: dict[str, Any]) -> None:
                report.event(event)
                print(event["message"], flush=True)

            out = fine_tune(config, storage=storage, engine=engine, tenant=job.tenant, progress=progress,
                            endpoint_url=settings.s3_endpoint_url).to_dict()
        elif job.kind == "batch":
            from lmaas.batch.job import run_batch_job

            out = run_batch_job(config, registry=registry, tenant=job.tenant, report=report, endpoint_url=settings.s3_endpoint_url,
                                batch_discount=settings.batch_token_discount)
        else:
            from lmaas.compress import compress

            result = compress(config, registry, progress=lambda line: print(line, flush=True))
            out = {"model": result.version.ref, "passed": result.passed}
    except LmaasError as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        print(f"error: {exc.message}", flush=True)  # the job log's last line: what `lmaas jobs list` shows
        report.event({"type": "message", "level": "error", "message": exc.message, "data": {"param": exc.param}, "created_at": time.time()})
        return 1
    report.finish(out)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(execute(int(sys.argv[1])))
