"""Auth REST API under `/api/v1/`: keys, tenants, usage, audit log, feedback (a thin map onto `lmaas.auth`).

    POST   /api/v1/keys            {"tenant", "scopes", "expires_in", "rpm", ...} -> the key with its secret (once)
    GET    /api/v1/keys            keys without secrets (`?tenant=`)
    DELETE /api/v1/keys/{id}       revoke: every replica refuses it within the key cache TTL (2 s)
    POST   /api/v1/tenants         {"name", "rpm", "tpm", "tpd"};  GET /api/v1/tenants;  PATCH /api/v1/tenants/{name}
    PUT    /api/v1/tenants/{name}/storage-quota   {"storage_bytes": N | null}: what its models and files may hold
    GET    /api/v1/usage           requests and tokens per tenant, key and model (`?since=2026-01-01&until=...`)
    GET    /api/v1/audit           the audit log, newest first (`?action=key.*&tenant=...`)
    POST   /api/v1/feedback        {"response_id", "rating", "comment"}: stored against the version that answered
    GET    /api/v1/feedback        ratings per model version

Keys, tenants and the audit log are for admins; usage and feedback for any key (scoped to its tenant).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from lmaas import db
from lmaas.auth import Auth, Limits, Principal
from lmaas.auth.audit import list_events
from lmaas.auth.feedback import feedback_summary, record_feedback
from lmaas.errors import ConfigError, InvalidInputError
from lmaas.serve.auth import admin_only, authenticate, get_auth
from lmaas.serve.protocol.auth import (
    AuditEvent,
    AuditPage,
    CreatedKeyOut,
    CreateKeyRequest,
    CreateTenantRequest,
    FeedbackOut,
    FeedbackRequest,
    FeedbackSummary,
    FeedbackSummaryRow,
    KeyList,
    KeyOut,
    LimitsIn,
    StorageQuotaIn,
    TenantList,
    TenantOut,
    UsageOut,
    UsageRow,
)

router = APIRouter(prefix="/api/v1", tags=["auth"], dependencies=[Depends(authenticate)])


def _auth(request: Request) -> Auth:
    auth = get_auth(request)
    if auth is None:
        raise ConfigError("this app runs without auth: keys, tenants, usage and audit are not available", param="auth")
    return auth


def _limits(body: LimitsIn) -> Limits:
    return Limits(body.rpm, body.tpm, body.tpd)


# -- keys ------------------------------------------------------------------------------
@router.post("/keys", response_model=CreatedKeyOut, status_code=201)
def create_key(request: Request, body: CreateKeyRequest, principal: Principal = Depends(admin_only)) -> CreatedKeyOut:
    """Create an API key; its secret is in this response and nowhere else, ever."""
    key, secret = _auth(request).keys.create_key(
        body.tenant, body.scopes, name=body.name, expires_in=body.expires_in, limits=_limits(body), actor=principal.actor
    )
    return CreatedKeyOut(**key.to_dict(), secret=secret)


@router.get("/keys", response_model=KeyList)
def list_keys(request: Request, tenant: str | None = None, _admin: Principal = Depends(admin_only)) -> KeyList:
    return KeyList(data=[KeyOut(**k.to_dict()) for k in _auth(request).keys.list_keys(tenant=tenant)])


@router.get("/keys/{key_id}", response_model=KeyOut)
def get_key(request: Request, key_id: str, _admin: Principal = Depends(admin_only)) -> KeyOut:
    return KeyOut(**_auth(request).keys.get_key(key_id).to_dict())


@router.delete("/keys/{key_id}", response_model=KeyOut)
def revoke_key(request: Request, key_id: str, principal: Principal = Depends(admin_only)) -> KeyOut:
    """Revoke a key (kept, marked revoked, for the audit trail)."""
    return KeyOut(**_auth(request).keys.revoke_key(key_id, actor=principal.actor).to_dict())


# -- tenants ---------------------------------------------------------------------------
@router.post("/tenants", response_model=TenantOut, status_code=201)
def create_tenant(request: Request, body: CreateTenantRequest, principal: Principal = Depends(admin_only)) -> TenantOut:
    return TenantOut(**_auth(request).keys.create_tenant(body.name, _limits(body), actor=principal.actor).to_dict())


@router.get("/tenants", response_model=TenantList)
def list_tenants(request: Request, _admin: Principal = Depends(admin_only)) -> TenantList:
    return TenantList(data=[TenantOut(**t.to_dict()) for t in _auth(request).keys.list_tenants()])


@router.patch("/tenants/{name}", response_model=TenantOut)
def set_tenant_limits(request: Request, name: str, body: LimitsIn, principal: Principal = Depends(admin_only)) -> TenantOut:
    """Replace a tenant's limits (omitted or null: no limit)."""
    return TenantOut(**_auth(request).keys.set_tenant_limits(name, _limits(body), actor=principal.actor).to_dict())


@router.put("/tenants/{name}/storage-quota", response_model=TenantOut)
def set_storage_quota(request: Request, name: str, body: StorageQuotaIn, principal: Principal = Depends(admin_only)) -> TenantOut:
    """Set the bytes a tenant's model versions and files may hold (null: no limit); uploads past it get 413."""
    return TenantOut(**_auth(request).keys.set_storage_quota(name, body.storage_bytes, actor=principal.actor).to_dict())


# -- usage -----------------------------------------------------------------------------
@router.get("/usage", response_model=UsageOut)
def get_usage(
    request: Request,
    tenant: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
    since: dt.date | None = Query(None, description="First UTC day, YYYY-MM-DD."),
    until: dt.date | None = Query(None, description="Last UTC day, YYYY-MM-DD."),
) -> UsageOut:
    """Requests and tokens per tenant, key and model; admins see every tenant, other keys their own."""
    principal = authenticate(request)
    if principal.tenant_filter is not None:
        tenant = principal.tenant
    if since and until and since > until:
        raise InvalidInputError("since must not be after until", param="since")
    from lmaas.config import load_settings

    rows = _auth(request).quotas.usage(tenant=tenant, key_id=key_id, model=model, since=since, until=until,
                                       batch_discount=load_settings().batch_token_discount)
    fields = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "batch_requests", "batch_prompt_tokens",
              "batch_completion_tokens", "batch_total_tokens", "billable_tokens")
    return UsageOut(data=[UsageRow(**r) for r in rows], total={f: sum(r[f] for r in rows) for f in fields})


# -- audit -----------------------------------------------------------------------------
@router.get("/audit", response_model=AuditPage)
def get_audit(
    request: Request,
    tenant: str | None = None,
    actor: str | None = None,
    action: str | None = Query(None, description="Exact, or a prefix ending in `*` (`key.*`)."),
    target: str | None = None,
    outcome: str | None = None,
    since: float | None = Query(None, description="Epoch seconds."),
    until: float | None = Query(None, description="Epoch seconds."),
    offset: Annotated[int, Query(ge=0, le=db.MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    _admin: Principal = Depends(admin_only),
) -> AuditPage:
    """The audit log, newest first. Admins only."""
    rows = list_events(
        _auth(request).engine, tenant=tenant, actor=actor, action=action, target=target, outcome=outcome,
        since=since, until=until, offset=offset, limit=limit + 1,
    )
    more = len(rows) > limit
    return AuditPage(data=[AuditEvent(**r) for r in rows[:limit]], has_more=more, next_offset=offset + limit if more else None)


# -- feedback --------------------------------------------------------------------------
@router.post("/feedback", response_model=FeedbackOut, status_code=201)
def create_feedback(request: Request, body: FeedbackRequest) -> FeedbackOut:
    """Rate a response by its `id`; stored against the model version that produced it (404 for another tenant's)."""
    stored = record_feedback(_auth(request).engine, authenticate(request), body.response_id, body.rating, body.comment)
    return FeedbackOut(**stored)


@router.get("/feedback", response_model=FeedbackSummary)
def get_feedback(request: Request, model: str | None = None) -> FeedbackSummary:
    """Ratings per model version (count, mean): the caller's tenant's, or every tenant's for an admin."""
    rows = feedback_summary(_auth(request).engine, tenant=authenticate(request).tenant_filter, model=model)
    return FeedbackSummary(data=[FeedbackSummaryRow(**r) for r in rows])
