"""Request and response schemas of the model registry REST API (`/api/v1/models...`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from lmaas.registry.refs import MAX_VERSION


class ModelFileOut(BaseModel):
    path: str
    sha256: str
    size: int


class RegisteredModelOut(BaseModel):
    object: str = "model"
    name: str
    tenant: str
    description: str
    tags: dict[str, str]
    created_at: float
    latest_version: int
    public: bool = False
    aliases: dict[str, int] = Field(default_factory=dict, description="Every alias of the model and the version it points at.")


class ModelVersionOut(BaseModel):
    object: str = "model.version"
    name: str
    version: int
    ref: str
    task: str
    status: str
    size: int
    files: list[ModelFileOut]
    manifest_sha256: str
    created_at: float
    run: str | None
    dataset: str | None
    dataset_sha256: str | None
    parent: str | None
    metrics: dict[str, float]
    description: str
    signed: bool
    encrypted: bool
    tenant: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[RegisteredModelOut]


class VersionPage(BaseModel):
    """One page of versions, newest first; fetch the next with `offset=next_offset`."""

    object: str = "list"
    data: list[ModelVersionOut]
    offset: int
    limit: int
    has_more: bool
    next_offset: int | None


class SetAliasRequest(BaseModel):
    version: int = Field(..., ge=1, le=MAX_VERSION, description="The version the alias should point at.")


class UpdateModelRequest(BaseModel):
    public: bool = Field(..., description="Share with every tenant (read and inference), or keep private to its owner.")


class AliasOut(BaseModel):
    object: str = "model.alias"
    name: str
    alias: str
    version: int
    updated_at: float


class LineageOut(BaseModel):
    object: str = "model.lineage"
    ref: str
    dataset: str | None
    dataset_sha256: str | None
    run: str | None
    parent: str | None
    children: list[str]
    aliases: list[str]
    deployments: list[str]


class UploadFileIn(BaseModel):
    path: str = Field(..., description="The file's path inside the version, e.g. `1_Pooling/config.json`.")
    size: int = Field(..., ge=0, le=2**63 - 1, description="Its size in bytes.")
    sha256: str = Field(..., pattern="^[0-9a-fA-F]{64}$", description="Its sha256, hex.")


class CreateUploadRequest(BaseModel):
    files: list[UploadFileIn] = Field(..., min_length=1, description="Every file of the version.")


class UploadTargetOut(BaseModel):
    path: str
    size: int
    sha256: str
    url: str = Field(..., description="Where to PUT the file's bytes.")
    method: str = "PUT"


class UploadOut(BaseModel):
    """An open two-step upload: PUT each file to its `url`, then POST `commit_url`."""

    object: str = "model.upload"
    id: str
    name: str
    files: list[UploadTargetOut]
    commit_url: str


class CommitUploadRequest(BaseModel):
    task: str = Field(..., description="`causal-lm`, `embedding`, ...")
    parent: str | None = Field(None, description="Reference of the version this one derives from.")
    dataset: str | None = None
    dataset_sha256: str | None = None
    run: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    description: str = ""


class DeletedOut(BaseModel):
    object: str
    id: str
    deleted: bool = True


def version_out(version: Any) -> ModelVersionOut:
    """A `ModelVersion` entity as its response schema."""
    return ModelVersionOut(**version.to_dict())
