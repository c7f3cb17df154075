"""`CompressConfig` (quantize, prune, export) and `DistillConfig` (distill, a training job): validated on construction."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmaas.data.config import NAME_RE
from lmaas.models import SIZES
from lmaas.train.config import TrainConfig

METHODS = ("int8-dynamic", "int8-weight", "int4-weight", "prune", "export", "distill")
Method = Literal["int8-dynamic", "int8-weight", "int4-weight", "prune", "export", "distill"]


class GateConfig(BaseModel):
    """Limits a variant must meet to stay `ready`; one that misses is registered, then archived."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_perplexity_increase: float | None = Field(default=None, ge=0)
    """Largest relative perplexity increase over the parent (0.05: at most +5%)."""

    min_agreement: float | None = Field(default=None, ge=0, le=1)
    """Smallest share of held-out positions where the greedy next token equals the parent's."""

    max_size_ratio: float | None = Field(default=None, gt=0)
    """Largest weights-file size relative to the parent (0.3: at most 30%)."""


class CompressConfig(BaseModel):
    """One compression run (YAML: `jobs/configs/compress_*.yaml`, `--set key=value` overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str = "tiny-lm"
    """The parent: `name`, `name:N` or `name@alias` of a registered causal LM."""

    method: Method = "int8-dynamic"
    """`int8-dynamic`, `int8-weight`, `int4-weight`, `prune`, `export` (`distill` takes a `DistillConfig`)."""

    output_name: str | None = None
    """Registry name of the variant; default `<parent name>-<method>` (a new model, so the parent's
    bare name keeps resolving to the parent)."""

    alias: str | None = None
    """Alias to point at the variant if it passes the gate (never set on a failing one)."""

    gate: GateConfig = GateConfig()

    # -- quantization
    group_size: int = Field(default=32, ge=2)
    """`int4-weight`: inputs sharing one scale (must divide every linear layer's input width)."""

    quantize_embeddings: bool = True
    """Also store the token embedding / LM head as int8 (per row)."""

    # -- pruning
    sparsity: float = 0.5
    """`prune`: share of each linear weight set to zero, strictly between 0 and 1
    (`pattern: 2:4` is always 0.5)."""

    pattern: Literal["unstructured", "2:4"] = "unstructured"
    """`unstructured`: smallest magnitudes per layer; `2:4`: the 2 smallest of every 4 inputs."""

    recovery_steps: int = Field(default=0, ge=0)
    """Fine-tune steps after pruning (masks kept), on the parent's training dataset."""

    recovery_lr: float | None = Field(default=None, gt=0)
    """AdamW learning rate of the recovery (constant). None: where the parent's training schedule
    ended (`lr x min_lr_ratio` of its lmaas training run), else 1e-4 (`prune.recovery_lr_of`)."""

    recovery_batch_size: int = Field(default=8, ge=1)

    # -- export
    formats: list[Literal["onnx", "torchscript"]] = ["onnx"]
    """`export`: ONNX goes into the registered version (checked in onnxruntime); TorchScript
    archives embed pickle, so they are written to `torchscript_dir` only, never registered."""

    torchscript_dir: str | None = None
    export_tolerance: float = Field(default=1e-3, gt=0)
    """Largest |logit difference| between onnxruntime and PyTorch that the export accepts."""

    # -- evaluation
    eval_tokens: int = Field(default=8192, ge=64)
    """Held-out tokens for perplexity and agreement (validation split, else a fixed text sample)."""

    eval_seq_len: int = Field(default=128, ge=8)
    decode_tokens: int = Field(default=32, ge=1)
    """Tokens generated per request when timing single-request latency and batched throughput."""

    batch_size: int = Field(default=8, ge=1)
    """Requests in the batched-throughput measurement."""

    timing_repeats: int = Field(default=3, ge=1)

    threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads for the whole run (None: torch's default). One thread is steadier,
    and on a busy machine faster, than threads contending for shared cores."""

    seed: int = 0

    @field_validator("output_name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not NAME_RE.match(value):
            raise ValueError(f"output_name {value!r} must match {NAME_RE.pattern}")
        return value

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(f"sparsity must be strictly between 0 and 1, got {value}")
        return value

    @model_validator(mode="after")
    def _method_fits(self) -> "CompressConfig":
        if self.method == "distill":
            raise ValueError("distill is a training job with its own settings: use DistillConfig "
                             "(lmaas compress REF --method distill, or jobs/distill.py)")
        if self.method == "prune" and self.pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError("pattern 2:4 prunes exactly half of each weight; leave sparsity at 0.5")
        if self.method == "export" and not self.formats:
            raise ValueError("export needs at least one format: onnx, torchscript")
        return self

    def parameters(self) -> dict[str, object]:
        """The method's own parameters, as recorded with the variant."""
        keys = {
            "int8-dynamic": ["quantize_embeddings"],
            "int8-weight": ["quantize_embeddings"],
            "int4-weight": ["group_size", "quantize_embeddings"],
            "prune": ["sparsity", "pattern", "recovery_steps", "recovery_lr", "recovery_batch_size"],
            "export": ["formats", "export_tolerance"],
        }[self.method]
        return {k: getattr(self, k) for k in keys}


STUDENT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                  "tie_word_embeddings")
"""The `LlamaConfig` fields `student_overrides` may change (vocabulary, context and special tokens come from the teacher)."""


class DistillConfig(TrainConfig):
    """Knowledge distillation of a registered causal LM into a smaller student (YAML: `jobs/configs/distill_*.yaml`).

    Every `TrainConfig` field applies to the student's training run (workers, DDP/FSDP, steps,
    checkpoints, `max_failures`); the student's size is `student` (TrainConfig's `model`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["distill"] = "distill"
    """Always `distill` (lets `lmaas compress --method distill` and YAML files name it)."""

    teacher: str = "tiny-lm"
    """The teacher: `name`, `name:N` or `name@alias` of a registered fp32 causal LM."""

    model: str = Field(default="tiny", alias="student")
    """`student:` the student's named size (`lmaas.models.SIZES`), before `student_overrides`."""

    student_overrides: dict[str, int | bool] = {}
    """Changes to that size, e.g. `{num_hidden_layers: 1, hidden_size: 32}` (see `STUDENT_FIELDS`)."""

    temperature: float = 2.0
    """Softens both distributions in the KL term (above 0; the KL is scaled by T^2)."""

    alpha: float = 0.5
    """Loss = alpha x KL(teacher || student) x T^2 + (1 - alpha) x LM cross-entropy; in [0, 1]."""

    dataset: str | None = None  # type: ignore[assignment]
    """Dataset to distill on (`name` or `name:N`); default: the one the teacher records."""

    output_model: str | None = None
    """Registry name of the student; default `<teacher name>-distilled` (a new model: the teacher's
    name keeps resolving to the teacher). Its `parent` is the teacher version."""

    gate: GateConfig = GateConfig()
    """Limits against the teacher; a student that misses is registered, then archived."""

    eval_tokens: int = Field(default=8192, ge=64)
    """Held-out tokens for perplexity and agreement (the dataset's validation split)."""

    eval_seq_len: int = Field(default=128, ge=8)
    decode_tokens: int = Field(default=32, ge=1)
    decode_batch_size: int = Field(default=8, ge=1)
    """Requests in the report's batched-throughput measurement."""

    timing_repeats: int = Field(default=3, ge=1)
    eval_threads: int | None = Field(default=None, ge=1)
    """torch threads of the evaluation on the driver (None: torch's default)."""

    @model_validator(mode="before")
    @classmethod
    def _default_output(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("output_model") is None and isinstance(data.get("teacher", "tiny-lm"), str):
            name = str(data.get("teacher", "tiny-lm")).split("@")[0].split(":")[0]
            return {**data, "output_model": f"{name}-distilled"}
        return data

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"temperature must be above 0, got {value}")
        return value

    @field_validator("alpha")
    @classmethod
    def _check_alpha(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError(f"alpha must be between 0 and 1 (the weight of the KL term), got {value}")
        return value

    @model_validator(mode="after")
    def _check_student(self) -> "DistillConfig":
        unknown = sorted(set(self.student_overrides) - set(STUDENT_FIELDS))
        if unknown:
            raise ValueError(f"student_overrides cannot set {', '.join(unknown)}; use {', '.join(STUDENT_FIELDS)}")
        size = SIZES[self.model]
        shape = {"hidden_size": size.hidden_size, "num_hidden_layers": size.num_layers, "num_attention_heads": size.num_heads,
                 "num_key_value_heads": size.num_kv_heads, "intermediate_size": size.intermediate_size, **self.student_overrides}
        if any(not isinstance(v, bool) and v < 1 for v in shape.values()):
            raise ValueError(f"student_overrides must be positive, got {self.student_overrides}")
        if shape["hidden_size"] % shape["num_attention_heads"] or shape["num_attention_heads"] % shape["num_key_value_heads"]:
            raise ValueError(f"student hidden_size {shape['hidden_size']} must be a multiple of num_attention_heads "
                             f"{shape['num_attention_heads']}, and that of num_key_value_heads {shape['num_key_value_heads']}")
        return self

    def train_config(self, dataset: str) -> TrainConfig:
        """The student's training run (registration is distillation's, after its evaluation)."""
        fields = {k: getattr(self, k) for k in TrainConfig.model_fields}
        # `method` is distillation's own here; the student trains every weight
        return TrainConfig(**{**fields, "dataset": dataset, "alias": None, "method": "full"})

    def parameters(self) -> dict[str, object]:
        """The method's parameters, as recorded with the student."""
        return {"student": self.model, "student_overrides": dict(self.student_overrides), "temperature": self.temperature,
                "alpha": self.alpha, "max_steps": self.max_steps, "lr": self.lr, "batch_size": self.batch_size,
                "strategy": self.strategy, "num_workers": self.num_workers}
