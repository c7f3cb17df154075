"""`lmaas jobs`: the priority queue in front of `ray job submit` (see `lmaas.ops.queue`).

    export RAY_ADDRESS=auto                          # the queue's admitter lives on the cluster
    lmaas jobs submit jobs/configs/train_tiny_cpu.yaml --priority high --set max_steps=200
    lmaas jobs submit jobs/configs/ingest_stdlib.yaml --tenant research
    lmaas jobs submit --command "python eval.py" --cpus 1 --priority low
    lmaas jobs list
    lmaas jobs logs 3
    lmaas jobs cancel 4
"""

from __future__ import annotations

import json
import time

import typer
from rich.console import Console
from rich.table import Table

from lmaas import db
from lmaas.config import load_settings
from lmaas.errors import ConfigError

app = typer.Typer(help="Queue jobs for the cluster: priorities, admission when resources are free, per-tenant limits.",
                  no_args_is_help=True)
console = Console(highlight=False)


def _queue():  # noqa: ANN202 - a queue.ClusterQueue
    """The queue of this installation's database, on the cluster RAY_ADDRESS names (required: the admitter lives there)."""
    from lmaas import cluster
    from lmaas.ops import queue

    settings = load_settings()

    def connected():  # noqa: ANN202 - ClusterInfo
        if not settings.ray_address:
            raise ConfigError("the job queue needs a running Ray cluster that outlives this command: run `ray start --head` "
                              "and set RAY_ADDRESS=auto (or the head's address)", param="RAY_ADDRESS")
        return cluster.connect(settings)

    return queue.ClusterQueue(settings, db.connect(settings.database_url), connected)


@app.command()
def submit(
    config: str = typer.Argument(None, help="A job config YAML (jobs/configs/*.yaml): train, ingest or compress."),
    kind: str = typer.Option(None, "--kind", help="train, ingest, compress, finetune or batch (default: the one the config fits)."),
    overrides: list[str] = typer.Option([], "--set", help="key=value override of any config field."),
    command: str = typer.Option(None, "--command", help="Queue a shell command instead of a config (a `command` job)."),
    cpus: float = typer.Option(1.0, "--cpus", help="Command jobs: CPUs reserved while it runs."),
    gpus: float = typer.Option(0.0, "--gpus", help="Command jobs: GPUs reserved while it runs."),
    priority: str = typer.Option("normal", "--priority", help="high, normal or low."),
    tenant: str = typer.Option("default", "--tenant", help="Whose job it is (per-tenant running limits apply)."),
    as_json: bool = typer.Option(False, "--json", help="Print the queued job as JSON."),
) -> None:
    """Queue a job; it starts when the cluster has room, highest priority first."""
    from lmaas.config import load_config
    from lmaas.errors import InvalidInputError
    from lmaas.ops import queue

    if (config is None) == (command is None):
        raise InvalidInputError("pass a job config file or --command, not both or neither", param="config")
    values: dict = {}
    if config is not None:
        from pydantic import BaseModel, ConfigDict

        class Raw(BaseModel):  # the file and the overrides, parsed; the job's own schema validates them
            model_config = ConfigDict(extra="allow")

        values = load_config(Raw, config, overrides).model_dump()
        kind = kind or queue.infer_kind(values)
    job = _queue().submit(kind=kind or "command", config=values, entrypoint=command,
                          resources={"CPU": cpus, "GPU": gpus} if command else None, priority=priority, tenant=tenant, actor="cli",
                          privileged=True)  # the CLI runs with the operator's own database and store
    if as_json:
        print(json.dumps(job.to_dict(), indent=1))
        return
    needs = ", ".join(f"{v:g} {k}" for k, v in job.resources.items())
    console.print(f"queued job {job.id}: {job.kind}, priority {job.priority_name}, tenant {job.tenant}, needs {needs}; "
                  f"`lmaas jobs list` shows its state")


@app.command(name="list")
def list_(
    state: list[str] = typer.Option(None, "--state", help="Only these states (queued, submitted, running, succeeded, failed, cancelled)."),
    tenant: str = typer.Option(None, "--tenant"),
    limit: int = typer.Option(50, "--limit", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Jobs in the queue, newest first."""
    from lmaas.ops import queue

    jobs = queue.list_jobs(db.connect(load_settings().database_url), states=state or None, tenant=tenant, limit=limit)
    if as_json:
        print(json.dumps([j.to_dict() for j in jobs], indent=1))
        return
    if not jobs:
        console.print("no jobs; `lmaas jobs submit CONFIG` queues one")
        return
    table = Table("id", "tenant", "kind", "priority", "state", "needs", "waited", "ran", "message")
    now = time.time()
    for j in jobs:
        waited = (j.admitted_at or now) - j.created_at
        ran = ((j.finished_at or now) - j.admitted_at) if j.admitted_at else None
        table.add_row(str(j.id), j.tenant, j.kind, j.priority_name, j.state, ", ".join(f"{v:g} {k}" for k, v in j.resources.items()),
                      f"{waited:.0f}s", f"{ran:.0f}s" if ran is not None else "", j.message[:80])
    console.print(table)


@app.command()
def cancel(job_id: int = typer.Argument(..., help="The job's id (`lmaas jobs list`).")) -> None:
    """Cancel a job: a queued one never starts, a running one is stopped."""
    job = _queue().cancel(job_id, actor="cli")
    console.print(f"job {job.id} {job.state}")


@app.command()
def logs(job_id: int = typer.Argument(..., help="The job's id (`lmaas jobs list`).")) -> None:
    """Print a job's output (its Ray job's driver log)."""
    print(_queue().logs(job_id), end="")
