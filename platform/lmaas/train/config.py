"""`TrainConfig`: every knob of one training run, validated on construction."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmaas.data.config import NAME_RE
from lmaas.models import SIZES


def check_model_name(value: str | None) -> str | None:
    """A config's registry name field: None, or a valid model name (pydantic's ValueError otherwise)."""
    if value is not None and not NAME_RE.match(value):
        raise ValueError("use lowercase letters, digits, '.', '_' or '-' (at most 100), starting with a letter or digit")
    return value


class LoraSettings(BaseModel):
    """The adapter a `method: lora` run trains (PEFT's `LoraConfig`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(default=8, ge=1, le=1024)
    """Rank r of each low-rank update `B @ A`."""

    alpha: float = Field(default=16.0, gt=0)
    """Scale: the update is multiplied by alpha / rank."""

    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapter's input during training."""

    target_modules: list[str] | None = None
    """Names of the linear layers to adapt (e.g. `[q_proj, k_proj, v_proj, o_proj]`, or `[all-linear]`);
    None: PEFT's default for the architecture (the attention query and value projections)."""

    quantize_base: Literal["none", "nf4"] = "none"
    """QLoRA: hold the frozen base in 4-bit NF4 (bitsandbytes; GPUs only). `none`: the base's own dtype."""


class TrainConfig(BaseModel):
    """One training run (YAML: `jobs/configs/train_*.yaml`, `--set key=value` overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = "stdlib-demo"
    """Dataset reference `name` (newest version) or `name:N`, from `lmaas data ingest`."""

    model: str = "tiny"
    """Model size: `tiny`, `small`, `base` or `1b` (see `lmaas.models.SIZES`)."""

    init_from: str | None = None
    """Fine-tune: a registered causal LM (`name`, `name:N`, `name@alias`) whose architecture and
    weights replace `model`. The dataset must be tokenized with its tokenizer (`lmaas data ingest
    --tokenizer DIR` with the model's exported directory). The result records it as its parent."""

    method: Literal["full", "lora"] = "full"
    """`full`: train every weight. `lora`: freeze the `init_from` base and train a LoRA adapter
    (`lora`), registered as a version of its own (`task: adapter`, the base as its parent)."""

    lora: LoraSettings = Field(default_factory=LoraSettings)
    """The adapter of a `method: lora` run."""

    output_model: str | None = "tiny-lm"
    """Registry name the final model is registered under; None keeps it as a run artifact only."""

    alias: str | None = None
    """Alias (e.g. `staging`) to point at the registered version."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """`ddp`: replicate the model, all-reduce gradients. `fsdp`: shard parameters, gradients and
    optimizer state across workers (FSDP2 `fully_shard` per transformer block)."""

    num_workers: int = Field(default=2, ge=1)
    """Ray Train workers (one process each; one GPU each when `use_gpu`)."""

    use_gpu: bool = False
    """Train on GPUs (NCCL, bf16 autocast) instead of CPUs (gloo, fp32)."""

    cpus_per_worker: float = Field(default=0.5, gt=0)
    """CPUs each worker reserves. Leave some cluster CPUs free for the Ray Data tasks that feed it."""

    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each worker reserves besides its CPUs (and GPU): places workers on the
    nodes started with them (`ray start --resources '{"trainer": 1}'`)."""

    threads_per_worker: int = Field(default=1, ge=1)
    """torch intra-op threads per worker on CPU (Ray sets 1 for fractional CPUs)."""

    batch_size: int = Field(default=8, ge=1)
    """Sequences per worker per micro-batch."""

    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum x num_workers)."""

    max_steps: int = Field(default=60, ge=1)
    """Optimizer steps to train for."""

    lr: float = Field(default=3e-3)
    """Peak learning rate (AdamW), reached after `warmup_steps`, then cosine decay to `min_lr_ratio` x lr."""

    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, gt=0, lt=1)
    beta2: float = Field(default=0.95, gt=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this (0: no clipping)."""

    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`auto`: bf16 autocast on GPU, fp32 on CPU."""

    compile: bool = False
    """Wrap the model in `torch.compile`."""

    log_interval: int = Field(default=10, ge=1)
    """Steps between metric reports (each report is a barrier across workers; keep it >= 5)."""

    eval_interval: int = Field(default=20, ge=1)
    """Steps between validation-loss evaluations (also at the last step)."""

    eval_batches: int = Field(default=4, ge=1)
    """Validation batches (of `batch_size`) per worker in each evaluation."""

    checkpoint_interval: int = Field(default=20, ge=1)
    """Steps between checkpoints (also at the last step)."""

    keep_checkpoints: int = Field(default=2, ge=1)
    """Checkpoints kept in storage (older ones are deleted)."""

    poll_interval_s: float = Field(default=0.25, gt=0)
    """Seconds between Ray Train's polls of its workers (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, 2 s in
    Ray). A report waits for the next poll, so Ray's default holds a run of short steps for up to 2 s
    at every `log_interval`; the environment variable, when set, wins."""

    max_failures: int = Field(default=2, ge=0)
    """Worker-group restarts Ray Train attempts after a failure, each resuming from the last checkpoint."""

    seed: int = 0
    """Model initialization and data shuffling seed."""

    shuffle_buffer: int = Field(default=256, ge=0)
    """Rows in each worker's local shuffle buffer (0: no shuffling)."""

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if value not in SIZES:
            raise ValueError(f"unknown model size {value!r}; use one of {', '.join(SIZES)}")
        return value

    @field_validator("lr")
    @classmethod
    def _check_lr(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"learning rate must be above 0, got {value}")
        return value

    @field_validator("output_model")
    @classmethod
    def _check_output(cls, value: str | None) -> str | None:
        return check_model_name(value)

    @model_validator(mode="after")
    def _check_schedule(self) -> "TrainConfig":
        if self.warmup_steps >= self.max_steps and self.max_steps > 1:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if self.alias and not self.output_model:
            raise ValueError("alias needs output_model (the registered model it points into)")
        if self.method == "lora" and not self.init_from:
            raise ValueError("method lora adapts a pretrained model: set init_from (a registered causal LM)")
        if self.lora.quantize_base != "none" and not self.use_gpu:
            raise ValueError("lora.quantize_base nf4 (QLoRA) needs use_gpu: bitsandbytes' 4-bit kernels run on GPUs only")
        if self.lora.quantize_base != "none" and (self.method != "lora" or self.strategy != "ddp"):
            raise ValueError("lora.quantize_base nf4 (QLoRA) is for method lora with strategy ddp (FSDP does not shard 4-bit weights)")
        return self

    @property
    def precision(self) -> str:
        if self.mixed_precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.mixed_precision
