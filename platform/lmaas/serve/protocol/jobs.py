"""Request and response schemas of the job queue REST API (`/api/v1/jobs`): what `lmaas jobs submit` takes, as JSON."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SubmitJobRequest(BaseModel):
    """A job for the queue: a `config` of a train, ingest or compress job, or a `command` (admins only)."""

    model_config = ConfigDict(extra="forbid")

    kind: str | None = Field(None, description="train, ingest, compress, finetune, batch or command (default: the kind `config` fits, or command with `command`).")
    config: dict[str, Any] | None = Field(None, description="The job's config, as in jobs/configs/*.yaml (validated against its kind's schema).")
    command: str | None = Field(None, min_length=1, max_length=10_000, description="A shell command to run instead of a config.")
    cpus: float = Field(1.0, ge=0, le=4096, description="Command jobs: CPUs reserved while it runs.")
    gpus: float = Field(0.0, ge=0, le=1024, description="Command jobs: GPUs reserved while it runs.")
    priority: str = Field("normal", description="high, normal or low.")
    tenant: str | None = Field(None, description="Whose job it is (default: the caller's tenant; another tenant's: admins only).")


class JobOut(BaseModel):
    object: str = "job"
    id: int
    tenant: str
    kind: str
    priority: str
    state: str = Field(description="queued -> submitted -> running -> succeeded | failed | cancelled.")
    config: dict[str, Any]
    entrypoint: str | None
    resources: dict[str, float]
    submission_id: str | None = Field(description="The Ray job's submission id once admitted.")
    created_at: float
    admitted_at: float | None
    finished_at: float | None
    message: str


class JobList(BaseModel):
    object: str = "list"
    data: list[JobOut]
