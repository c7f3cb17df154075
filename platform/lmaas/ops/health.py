"""Health of the three things every lmaas component needs: artifact store, database, Ray.

`self_check` is the end-to-end version: tasks spread over the cluster's workers each write an
object to the artifact store and a row to the database using the settings they received
through the runtime environment, and the driver publishes a summary directory atomically and
verifies it. If it passes, training jobs and Serve replicas on those workers will find the
store and the database too.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine

from lmaas import cluster, db
from lmaas.config import Settings, redact_url
from lmaas.db.schema import events
from lmaas.errors import IntegrityError, LmaasError
from lmaas.storage import Storage


@dataclass(frozen=True)
class ComponentStatus:
    """One line of `lmaas status`: a component, where it is, and whether it answers."""

    name: str
    target: str
    ok: bool
    detail: str


def check_storage(settings: Settings) -> ComponentStatus:
    """Reach the artifact store (fails within seconds when the endpoint is down)."""
    storage = Storage.from_settings(settings, connect_timeout=3.0, max_attempts=1)
    where = storage.uri + (f" via {settings.s3_endpoint_url}" if settings.s3_endpoint_url and not storage.is_local else "")
    try:
        storage.check()
    except LmaasError as exc:
        return ComponentStatus("storage", where, False, exc.message)
    return ComponentStatus("storage", where, True, "local directory, writable" if storage.is_local else "bucket reachable")


def check_database(settings: Settings, *, migrate: bool = True) -> ComponentStatus:
    """Reach the database and (with `migrate`) bring its schema up to date."""
    target = redact_url(settings.database_url)
    try:
        engine = db.connect(settings.database_url, connect_timeout=3.0, migrate=migrate)
        version = db.ping(engine)
        revision = db.current_revision(engine)
    except LmaasError as exc:
        return ComponentStatus("database", target, False, exc.message)
    return ComponentStatus("database", target, True, f"{version}, schema {revision}")


def check_ray(settings: Settings) -> ComponentStatus:
    """Join `RAY_ADDRESS` and read its resources; without one, report whether a local cluster runs."""
    if not settings.ray_address:
        import ray._private.services as services

        running = services.find_bootstrap_address(None)
        if running:
            return ComponentStatus("ray", "local", True, f"a cluster runs here at {running}; join it with RAY_ADDRESS=auto")
        return ComponentStatus("ray", "local", True, "not running; commands start a local cluster on demand")
    try:
        info = cluster.connect(settings)
    except LmaasError as exc:
        return ComponentStatus("ray", settings.ray_address, False, exc.message)
    try:
        detail = (
            f"{info.nodes} node(s), {info.cpus:g} CPU, {info.gpus:g} GPU"
            + (f", dashboard {info.dashboard_url}" if info.dashboard_url else "")
        )
        return ComponentStatus("ray", info.address, True, detail)
    finally:
        cluster.disconnect()


def readiness(settings: Settings, replicas: Callable[[], dict[str, str]] | None = None) -> tuple[bool, dict[str, str]]:
    """What `GET /readyz` answers: is every served model, the database and the artifact store able to serve now?

    Args:
        settings: the database and store the gateway uses.
        replicas: () -> served name -> "ok" or why it has no replica to answer (None: no models to check).

    Returns:
        (all ready, component -> "ok" or the problem): `database`, `storage`, and `model:NAME` per served model.
    """
    checks: dict[str, str] = {}
    for status in (check_database(settings, migrate=False), check_storage(settings)):
        checks[status.name] = "ok" if status.ok else status.detail
    if replicas is not None:
        try:
            checks |= {f"model:{name}": problem for name, problem in replicas().items()}
        except Exception as exc:  # noqa: BLE001 - Serve's controller not answering is itself "not ready"
            checks["models"] = f"cannot read replica states: {type(exc).__name__}: {exc}"
    return all(v == "ok" for v in checks.values()), checks


def database_and_storage(engine: Engine, storage: Storage) -> tuple[bool, dict[str, str]]:
    """`readiness` of an app that holds its own engine and store (the management app): (all ok, component -> "ok" or the problem)."""
    checks: dict[str, str] = {}
    for name, check in (("database", lambda: db.ping(engine)), ("storage", storage.check)):
        try:
            check()
            checks[name] = "ok"
        except LmaasError as exc:
            checks[name] = exc.message
    return all(v == "ok" for v in checks.values()), checks


class SelfCheckConfig(BaseModel):
    """Config of the self-check job (`jobs/selfcheck.py`)."""

    tasks: int = Field(4, ge=1, le=1024)
    """Ray tasks to spread over the cluster (SPREAD: one per node where possible)."""

    cpus_per_task: float = Field(0.25, gt=0, le=16)
    """CPU share of each task; small, so it fits beside running work."""


@dataclass(frozen=True)
class WorkerReport:
    """What one self-check task did."""

    index: int
    host: str
    pid: int
    object_path: str
    sha256: str
    event_id: int


@dataclass(frozen=True)
class SelfCheckReport:
    """The outcome of `self_check`."""

    check_id: str
    prefix: str
    workers: list[WorkerReport]
    manifest_sha256: str
    events_recorded: int
    seconds: float
    hosts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _worker_task(settings: Settings, check_id: str, index: int) -> WorkerReport:
    storage = Storage.from_settings(settings)
    host, pid = socket.gethostname(), os.getpid()
    payload = json.dumps({"check": check_id, "index": index, "host": host, "pid": pid, "time": time.time()})
    path = f"selfcheck/{check_id}/workers/{index}.json"
    digest = storage.write_text(path, payload, overwrite=False)
    event_id = db.record_event(
        db.connect(settings.database_url),
        actor=f"worker:{host}:{pid}",
        action="selfcheck.worker",
        target=storage.url(path),
        detail={"check": check_id, "index": index, "sha256": digest},
    )
    return WorkerReport(index, host, pid, path, digest, event_id)


def self_check(settings: Settings, *, tasks: int = 4, cpus_per_task: float = 0.25) -> SelfCheckReport:
    """Run the end-to-end self-check on the connected Ray cluster.

    Args:
        settings: the store and database the workers must reach.
        tasks: how many Ray tasks to spread (SPREAD scheduling: one per node where possible).
        cpus_per_task: CPU share of each task, small so it fits beside running work.

    Returns:
        What each worker wrote and the published summary.

    Raises:
        IntegrityError: an object read back does not match the hash its writer reported.
        UnreachableError: a worker could not reach the store or the database.
    """
    import ray

    started = time.perf_counter()
    check_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    remote = ray.remote(num_cpus=cpus_per_task, scheduling_strategy="SPREAD", max_retries=0)(_worker_task)
    workers = ray.get([remote.remote(settings, check_id, i) for i in range(tasks)])

    storage = Storage.from_settings(settings)
    for report in workers:
        if storage.sha256(report.object_path) != report.sha256:
            raise IntegrityError(f"self-check object {storage.url(report.object_path)} changed after it was written")
    prefix = f"selfcheck/{check_id}/summary"
    with tempfile.TemporaryDirectory() as tmp:
        summary = {"check": check_id, "workers": [asdict(w) for w in workers]}
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        manifest = storage.publish_dir(tmp, prefix)
    storage.verify(prefix)

    engine = db.connect(settings.database_url)
    with engine.connect() as conn:
        recorded = conn.execute(
            sa.select(sa.func.count()).select_from(events).where(events.c.id.in_([w.event_id for w in workers]))
        ).scalar_one()
    db.record_event(
        engine,
        actor=f"driver:{socket.gethostname()}",
        action="selfcheck",
        target=storage.url(prefix),
        detail={"check": check_id, "workers": len(workers), "manifest_sha256": manifest.sha256},
    )
    return SelfCheckReport(
        check_id=check_id,
        prefix=prefix,
        workers=workers,
        manifest_sha256=manifest.sha256,
        events_recorded=int(recorded),
        seconds=time.perf_counter() - started,
        hosts=sorted({w.host for w in workers}),
    )
