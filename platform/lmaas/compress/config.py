"""`CompressConfig`: one compression of one registered version, validated on construction."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmaas.data.config import NAME_RE

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
    """`int8-dynamic`, `int8-weight`, `int4-weight`, `prune`, `export` (`distill` runs as its own job)."""

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

    recovery_lr: float = Field(default=1e-3, gt=0)
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
            raise ValueError("distill is a training job: run jobs/distill.py (it needs the training loop), not compress")
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
