"""Request and response schemas of the auth REST API: keys, tenants, usage, audit, feedback."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LimitsIn(BaseModel):
    """Rate limits; omitted or null means no limit."""

    rpm: int | None = Field(None, description="Requests per minute.")
    tpm: int | None = Field(None, description="Tokens (prompt + completion) per minute.")
    tpd: int | None = Field(None, description="Tokens per UTC day.")


class CreateKeyRequest(LimitsIn):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field("default", description="The tenant that owns the key (and what it creates).")
    scopes: list[str] = Field(..., description="Any of inference, models:read, models:write, deploy, admin.")
    name: str = Field("", description="A label for people (`ci`, `alice laptop`).")
    expires_in: str | None = Field(None, description="A duration such as `30d`, `12h`, `15m`; null: never expires.")


class KeyOut(BaseModel):
    object: str = "api_key"
    id: str
    tenant: str
    name: str
    scopes: list[str]
    created_at: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    rpm: int | None
    tpm: int | None
    tpd: int | None


class CreatedKeyOut(KeyOut):
    secret: str = Field(..., description="The key itself: shown this once, stored only as a hash.")


class KeyList(BaseModel):
    object: str = "list"
    data: list[KeyOut]


class CreateTenantRequest(LimitsIn):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="1-64 characters of a-z, 0-9, `_`, `-`.")


class TenantOut(BaseModel):
    object: str = "tenant"
    name: str
    created_at: float
    rpm: int | None
    tpm: int | None
    tpd: int | None
    storage_bytes: int | None = Field(None, description="The most its model versions and files may hold in the store (null: no limit).")


class StorageQuotaIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    storage_bytes: int | None = Field(..., description="Bytes its model versions and uploaded files may hold in the store; null: no limit.")


class TenantList(BaseModel):
    object: str = "list"
    data: list[TenantOut]


class UsageRow(BaseModel):
    tenant: str
    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    batch_requests: int = Field(0, description="Lines of batches (`/v1/batches`, `lmaas batch` jobs) answered.")
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0
    batch_total_tokens: int = 0
    billable_tokens: int = Field(0, description="total_tokens + batch_total_tokens x the batch discount (LMAAS_BATCH_TOKEN_DISCOUNT).")


class UsageOut(BaseModel):
    object: str = "usage"
    data: list[UsageRow]
    total: dict[str, int]


class AuditEvent(BaseModel):
    id: int
    created_at: float
    actor: str
    tenant: str | None
    action: str
    target: str
    outcome: str
    detail: dict[str, Any]


class AuditPage(BaseModel):
    object: str = "list"
    data: list[AuditEvent]
    has_more: bool
    next_offset: int | None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(..., min_length=1, max_length=100, description="The `id` of a completion or chat completion.")
    rating: int = Field(..., description="1 (bad) to 5 (good); thumbs up/down: 5/1.")
    comment: str = Field("", max_length=10_000)


class FeedbackOut(BaseModel):
    object: str = "feedback"
    id: int
    response_id: str
    model: str
    version: str | None
    rating: int
    comment: str
    created_at: float


class FeedbackSummaryRow(BaseModel):
    model: str
    version: str | None
    count: int
    mean_rating: float


class FeedbackSummary(BaseModel):
    object: str = "list"
    data: list[FeedbackSummaryRow]
