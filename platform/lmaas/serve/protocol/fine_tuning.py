"""Schemas of the OpenAI fine-tuning API (`/v1/fine_tuning/jobs`): the create request, the `fine_tuning.job`
object, its events and checkpoints, and their cursor pages."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | int = "auto"
    batch_size: Literal["auto"] | int = "auto"
    learning_rate_multiplier: Literal["auto"] | float = "auto"


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    """OpenAI's `method`: lmaas fine-tunes `supervised` (on chat or prompt/completion examples)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"] = Field(description="supervised (dpo and reinforcement are not offered).")
    supervised: SupervisedMethod | None = None


class LmaasOptions(BaseModel):
    """What lmaas adds to OpenAI's request: how to train (the `FineTuneConfig` fields OpenAI has no name for)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["lora", "full"] = Field("lora", description="lora: an adapter beside the frozen base; full: every weight.")
    lora: dict[str, Any] | None = Field(None, description="rank, alpha, dropout, target_modules, quantize_base.")
    output_model: str | None = Field(None, description="Registry name of the result (default `<base name>-<suffix>`).")
    block_size: int | None = Field(None, description="Tokens per example (default: the base's context, at most 1024).")
    train: dict[str, Any] | None = Field(None, description="Other TrainConfig fields: num_workers, cpus_per_worker, use_gpu, strategy, ...")


class CreateFineTuningJobRequest(BaseModel):
    """`POST /v1/fine_tuning/jobs`, as `client.fine_tuning.jobs.create` sends it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The base: a registered causal LM reference (`name`, `name:N`, `name@alias`).")
    training_file: str = Field(description="The id of a file uploaded with purpose fine-tune.")
    validation_file: str | None = Field(None, description="The id of a file uploaded with purpose fine-tune, held out for evaluation.")
    hyperparameters: Hyperparameters | None = Field(None, description="n_epochs, batch_size, learning_rate_multiplier (each `auto` or a value).")
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64, description="Part of the result's name: `<base name>-<suffix>`.")
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = Field(None, description="Not offered: send none (or an empty list).")
    lmaas: LmaasOptions | None = Field(None, description="lmaas's own training options (send with `extra_body`).")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str = Field(description="`ftjob-<queue job id>`: the job queue's job (`/api/v1/jobs/<id>`).")
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = Field(None, description="The registered result (`name:N`) once succeeded: a `model` for /v1/chat/completions.")
    organization_id: str = Field(description="The tenant.")
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    result_files: list[str] = Field(default_factory=list)
    trained_tokens: int | None = None
    error: JobError | None = None
    seed: int
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    estimated_finish: int | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] = Field(default_factory=dict)


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="The registered result for the last step; else `<run id>/<checkpoint>`, a run artifact.")
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
