"""Schemas of the OpenAI Batch API (`/v1/batches`): the create request, the `batch` object and its list page."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmaas.serve.options import EngineOptions


class LmaasBatchOptions(BaseModel):
    """What lmaas adds to OpenAI's request (send with `extra_body={"lmaas": {...}}`): how the batch runs."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="The registry reference every line runs on (default: the one model the lines name).")
    concurrency: int | None = Field(None, ge=1, description="Model actors (default: as many as the cluster's CPUs hold).")
    num_cpus: float | None = Field(None, gt=0, description="CPUs per actor (default 1).")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor (default 0).")
    lines_per_block: int | None = Field(None, ge=1, le=4096, description="Lines one actor is handed at a time (default 256).")
    engine: EngineOptions | None = Field(None, description="Engine options, as a served model's (`engine`, `max_batch_size`, ...).")
    priority: Literal["high", "normal", "low"] = Field("low", description="Its place in the job queue (batches wait for capacity).")


class CreateBatchRequest(BaseModel):
    """`POST /v1/batches`, as `client.batches.create` sends it."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(description="A file uploaded with purpose batch: one request per line.")
    endpoint: str = Field(description="/v1/completions, /v1/chat/completions or /v1/embeddings: every line's url.")
    completion_window: str = Field(description="24h (the only window offered).")
    metadata: dict[str, str] | None = Field(None, description="Up to 16 pairs, kept with the batch.")
    output_expires_after: dict[str, Any] | None = Field(None, description="Not offered: outputs are kept until deleted.")
    lmaas: LmaasBatchOptions | None = None


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchUsage(BaseModel):
    """Tokens of the lines answered so far (counted as batch tokens: see `/api/v1/usage`'s `batch_*`)."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})


class Batch(BaseModel):
    id: str = Field(description="`batch_<queue job id>`: the job queue's job (`/api/v1/jobs/<id>`).")
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = Field(None, description="The model every line runs on.")
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]
    output_file_id: str | None = Field(None, description="The answered lines (status 200), once the batch ended.")
    error_file_id: str | None = Field(None, description="The lines answered with an error, once the batch ended (none: null).")
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool
