"""`IngestConfig`: every knob of one ingest, validated on construction."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMATS = ("auto", "text", "lines", "jsonl", "parquet", "csv", "chat")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


class IngestConfig(BaseModel):
    """What to ingest and how (YAML: `jobs/configs/ingest_*.yaml`, `--set key=value` overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "stdlib"
    """Dataset name: lowercase letters, digits, `.`, `_`, `-`. Versions are numbered per name."""

    sources: list[str] = Field(default_factory=lambda: ["stdlib:200"])
    """Paths, directories, globs, `file://` or `s3://` URIs; `stdlib` / `stdlib:N` is the built-in
    corpus (this interpreter's standard library sources, optionally only the first N files)."""

    format: Literal["auto", "text", "lines", "jsonl", "parquet", "csv", "chat"] = "auto"
    """`text`: one document per file; `lines`: one per non-empty line; `jsonl`, `parquet`, `csv`:
    one per record, text in `text_field`. `auto` picks by file extension (else `text`). `chat`:
    fine-tuning examples, JSONL of OpenAI chat (`{"messages": [...]}`) or `{"prompt", "completion"}`
    lines (`data.chat`), one example per row, trained on the assistant turns only; needs `tokenizer`
    (the model's, whose chat template renders them)."""

    text_field: str = "text"
    """Field holding the document text (JSONL, Parquet, CSV)."""

    tokenizer: str | None = None
    """Existing Hugging Face tokenizer directory (with `tokenizer.json`); None trains a new one."""

    vocab_size: int = Field(default=4096, ge=260, le=1_000_000)
    """Vocabulary size of a newly trained byte-level BPE tokenizer (256 bytes + merges + EOS)."""

    tokenizer_sample_docs: int = Field(default=2000, ge=1)
    """Documents (the first ones, in source order) the tokenizer is trained on."""

    block_size: int = Field(default=256, ge=8, le=1_000_000)
    """Tokens per packed training sequence (at least 8)."""

    validation_percent: float = Field(default=5.0, ge=0.0, lt=100.0)
    """Share of documents, chosen by hash of their text, that go to the validation split."""

    rows_per_shard: int = Field(default=8192, ge=1)
    """Packed sequences per Parquet shard."""

    cpus_per_task: float = Field(default=0.5, gt=0.0, le=64.0)
    """CPUs reserved by each read/tokenize task (fractional leaves room beside training)."""

    batch_size: int = Field(default=64, ge=1)
    """Documents per tokenize batch."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("use lowercase letters, digits, '.', '_' or '-' (at most 100), starting with a letter or digit")
        return value

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, value: list[str]) -> list[str]:
        if not value or any(not s.strip() for s in value):
            raise ValueError("name at least one source, none empty")
        return value

    @model_validator(mode="after")
    def _check_chat(self) -> "IngestConfig":
        if self.format == "chat" and not self.tokenizer:
            raise ValueError("format chat needs tokenizer: the directory of the model to fine-tune (its tokenizer and chat template)")
        return self

    @field_validator("block_size", mode="before")
    @classmethod
    def _check_block_size(cls, value: object) -> object:
        if isinstance(value, int) and value < 8:
            raise ValueError(f"block_size {value} is below 8; a packed sequence needs at least 8 tokens")
        return value
