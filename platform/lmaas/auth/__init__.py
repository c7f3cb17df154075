"""Tenants, API keys, scopes, quotas, usage, feedback and the audit log (no HTTP here).

`Auth` (in `gateway`) is what the HTTP apps use per request; `KeyStore` (in `keys`) manages
tenants and keys; `Quotas` (in `quotas`) enforces limits shared by every replica through the
database; `audit.list_events` reads the append-only audit log. `lmaas.serve.auth` turns these
into FastAPI dependencies.
"""

from lmaas.auth.entities import ADMIN, DEFAULT_TENANT, DEPLOY, INFERENCE, MODELS_READ, MODELS_WRITE, SCOPES, ApiKey, Limits, Principal, Tenant
from lmaas.auth.gateway import ADMIN_KEY_ENV, Auth, AuthConfig
from lmaas.auth.keys import KeyStore, parse_duration
from lmaas.auth.quotas import Quotas

__all__ = [
    "ADMIN",
    "ADMIN_KEY_ENV",
    "DEFAULT_TENANT",
    "DEPLOY",
    "INFERENCE",
    "MODELS_READ",
    "MODELS_WRITE",
    "SCOPES",
    "ApiKey",
    "Auth",
    "AuthConfig",
    "KeyStore",
    "Limits",
    "Principal",
    "Quotas",
    "Tenant",
    "parse_duration",
]
