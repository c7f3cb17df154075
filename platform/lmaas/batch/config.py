"""`BatchConfig`: every knob of one offline batch, validated on construction."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmaas.serve.options import EngineOptions


class BatchConfig(BaseModel):
    """What to run and how (`lmaas batch INPUT --model REF --output OUTPUT`, `--set key=value` overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(min_length=1)
    """JSONL of OpenAI batch lines (`custom_id`, `method`, `url`, `body`): a path, a directory or glob of files,
    a `file://` or `s3://` URI, or the id of a file uploaded with purpose `batch` (`file-...`)."""

    model: str = Field(min_length=1)
    """The registry reference every line runs on (`name`, `name:3`, `name@alias`), resolved once when the batch
    starts, so every line gets the same version. A line's `body.model` may be left out; given, it must be this
    reference or the `name:version` it resolves to (OpenAI's batches also run one model)."""

    output: str = Field(min_length=1)
    """Where the result JSONL goes: a path or an `s3://` URI. It appears whole when the batch ends, never half-written."""

    error_output: str | None = Field(None, min_length=1)
    """Where the lines answered with an error go instead (a path or `s3://` URI, as `output`; OpenAI's batches split
    their results so, into `output_file_id` and `error_file_id`). None: every line goes to `output`."""

    overwrite: bool = False
    """Replace an existing output (else the batch refuses to start)."""

    concurrency: int | None = Field(None, ge=1)
    """Model actors (Ray Data's actor pool), each with its own engine. None: as many as the cluster's CPUs
    (`num_gpus` > 0: its GPUs) hold at `num_cpus` (`num_gpus`) each."""

    num_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per actor; its engine runs that many torch threads (at least 1) unless `engine.num_threads` says.
    Small models make more tokens/s from more actors of fewer threads (each engine's scheduler is one Python loop):
    on 2 cores two 1-CPU actors made 1.5x the steady tokens/s of one 2-CPU actor (bench/batch.py); a large model
    wants fewer, wider actors (each holds its own copy)."""

    num_gpus: float = Field(0.0, ge=0)
    """GPUs per actor (> 0: the engine runs on `cuda`)."""

    lines_per_block: int = Field(256, ge=1, le=4096)
    """Lines per block: what Ray Data hands one actor at a time (all of them in flight in its engine together,
    so continuous batching fills), runs again when the actor dies, and writes out when done."""

    max_block_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """A block also ends after this many input bytes (long lines make fewer lines per block)."""

    blocks_per_actor: int = Field(2, ge=1, le=16)
    """Blocks one actor works on at once: the next block's requests join the engine while the last ones of the
    current block finish, so the engine's batch does not drain at block boundaries."""

    max_retries: int = Field(3, ge=0)
    """How often a dead actor is restarted (and its blocks run again) before the batch fails: a line that kills its
    engine every time fails the batch after this many tries instead of forever."""

    engine: EngineOptions = Field(default_factory=EngineOptions)
    """Which engine each actor runs and how, as a served model's (`engine: auto|vllm|lmaas`, `max_batch_size`, ...):
    `auto` is vLLM where it is installed and loads the version, else lmaas's engine; embedding models get the
    embedding engine. Adapters (`max_adapters`) are not served in batches."""

    @model_validator(mode="after")
    def _engine(self) -> BatchConfig:
        if self.engine.max_adapters:
            raise ValueError("engine.max_adapters: a batch runs one model version; adapters are not served in batches")
        if self.num_gpus > 0 and self.engine.device == "cpu":
            object.__setattr__(self, "engine", self.engine.model_copy(update={"device": "cuda"}))
        return self
