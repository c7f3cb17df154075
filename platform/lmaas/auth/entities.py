"""What auth holds, as plain frozen data: tenants, API keys, the verified caller (`Principal`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INFERENCE = "inference"
MODELS_READ = "models:read"
MODELS_WRITE = "models:write"
DEPLOY = "deploy"
ADMIN = "admin"
SCOPES = (INFERENCE, MODELS_READ, MODELS_WRITE, DEPLOY, ADMIN)
"""What a key may do. `admin` implies every other scope, on every tenant."""
DEFAULT_TENANT = "default"
KEY_PREFIX = "lmaas_"
WINDOWS = {"rpm": 60, "tpm": 60, "tpd": 86400}
"""Quota windows and their lengths in seconds (fixed windows aligned to the epoch, UTC)."""


@dataclass(frozen=True)
class Limits:
    """Requests per minute, tokens per minute and tokens per day; None means no limit."""

    rpm: int | None = None
    tpm: int | None = None
    tpd: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return {"rpm": self.rpm, "tpm": self.tpm, "tpd": self.tpd}

    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.tpd))


@dataclass(frozen=True)
class Tenant:
    """Who owns models, datasets and keys, with tenant-wide limits."""

    name: str
    created_at: float
    limits: Limits = field(default_factory=Limits)
    storage_bytes: int | None = None
    """The most its model versions and uploaded files may hold in the artifact store (None: no limit)."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "created_at": self.created_at, **self.limits.to_dict(), "storage_bytes": self.storage_bytes}


@dataclass(frozen=True)
class ApiKey:
    """An API key's record (never its secret)."""

    id: str
    tenant: str
    name: str
    scopes: tuple[str, ...]
    created_at: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    limits: Limits = field(default_factory=Limits)

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "scopes": list(self.scopes),
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "last_used_at": self.last_used_at,
            **self.limits.to_dict(),
        }


@dataclass(frozen=True)
class Principal:
    """The caller behind a verified API key: its tenant, scopes and the limits that apply to it."""

    key_id: str
    tenant: str
    scopes: frozenset[str]
    expires_at: float | None = None
    key_limits: Limits = field(default_factory=Limits)
    tenant_limits: Limits = field(default_factory=Limits)
    anonymous: bool = False
    """True when auth is disabled: everything is allowed and nothing is metered."""

    @classmethod
    def unrestricted(cls) -> "Principal":
        """The caller of an app built without auth: an admin with no limits."""
        return cls(key_id="-", tenant=DEFAULT_TENANT, scopes=frozenset(SCOPES), anonymous=True)

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    @property
    def tenant_filter(self) -> str | None:
        """The tenant whose resources this caller sees (None: an admin sees every tenant's)."""
        return None if self.is_admin else self.tenant

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return "anonymous" if self.anonymous else f"key:{self.key_id}"

    def has(self, scope: str) -> bool:
        return scope in self.scopes or self.is_admin

    def metered(self) -> list[tuple[str, str, int]]:
        """(counter subject, window, limit) for every limit set on the key or its tenant."""
        out = []
        for subject, limits in ((f"key:{self.key_id}", self.key_limits), (f"tenant:{self.tenant}", self.tenant_limits)):
            for window in WINDOWS:
                limit = getattr(limits, window)
                if limit is not None:
                    out.append((subject, window, limit))
        return out
