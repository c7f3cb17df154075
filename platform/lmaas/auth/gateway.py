"""`Auth`: what the HTTP apps ask of auth on each request, with the caches that keep it cheap.

    auth = Auth(db.connect(url), registry=registry)          # or Auth.from_settings(settings)
    principal = auth.authenticate(request.headers.get("authorization"))
    auth.quotas.admit(principal)                              # 429 past a limit
    auth.visible_model(principal, "tiny@production")          # 404 for another tenant's model

No HTTP here: `lmaas.serve.auth` maps it onto FastAPI dependencies.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine

from lmaas.auth.entities import Principal
from lmaas.auth.keys import KeyStore
from lmaas.auth.quotas import Quotas, UsageWriter
from lmaas.errors import AuthenticationError, InvalidInputError, NotFoundError

ADMIN_KEY_ENV = "LMAAS_ADMIN_KEY"


class AuthConfig(BaseModel):
    """Auth of an HTTP app (the `auth:` section of the Serve app's args)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Require `Authorization: Bearer <key>` on every /v1 and /api/v1 route (not /healthz)."""
    cache_ttl_s: float = Field(2.0, gt=0, le=60)
    """A verified key (and a model's owner) is trusted this long per replica: revocation takes effect within it."""
    last_used_interval_s: float = Field(60.0, ge=0)
    """Write a key's `last_used_at` at most this often per replica."""
    bootstrap: bool = True
    """On start, create tenant `default` and an admin key if none exists (printed once, or `LMAAS_ADMIN_KEY`)."""


class Auth:
    """Keys, quotas and model visibility over one metadata database.

    Args:
        engine: the metadata database every replica shares.
        registry: the model registry (`lmaas.registry.ModelRegistry`); None: served models are
            not in a registry, so every tenant may call them and responses record no version.
        config: TTLs.
    """

    def __init__(self, engine: Engine, *, registry: Any = None, config: AuthConfig | None = None) -> None:
        self.config = config or AuthConfig()
        self.engine = engine
        self.keys = KeyStore(engine, cache_ttl_s=self.config.cache_ttl_s, last_used_interval_s=self.config.last_used_interval_s)
        self.quotas = Quotas(engine)
        self.usage = UsageWriter(self.quotas)
        """Finished requests' usage, group-committed from the gateway's event loop."""
        self.registry = registry
        self._models: dict[str, tuple[float, Any]] = {}
        self._versions: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any, config: AuthConfig | None = None) -> "Auth":
        """`Auth` over the database and registry of `lmaas.config.Settings`."""
        from lmaas import db
        from lmaas.registry import ModelRegistry

        registry = ModelRegistry.from_settings(settings)
        return cls(db.connect(settings.database_url), registry=registry, config=config)

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of an `Authorization` header value.

        Raises:
            AuthenticationError (401): missing, not `Bearer`, or an invalid key.
        """
        return self.keys.verify(_bearer(authorization))

    def authenticate_cached(self, authorization: str | None) -> Principal | None:
        """`authenticate` answered from this replica's key cache alone (None: it needs the database)."""
        return self.keys.verify_cached(_bearer(authorization))

    def visible_model_cached(self, principal: Principal, name: str) -> bool | None:
        """`visible_model` from the cache alone (None: it needs the database)."""
        if self.registry is None:
            return True
        hit, model = self._peek(self._models, name)
        return _visible_to(model, principal) if hit else None

    async def version_of_async(self, ref: str) -> str | None:
        """`version_of` for an event loop: a cached answer without a thread hop."""
        hit, version = self.version_of_cached(ref)
        return version if hit else await asyncio.to_thread(self.version_of, ref)

    def version_of_cached(self, ref: str) -> tuple[bool, str | None]:
        """`version_of` from the cache alone: (found, value)."""
        return (True, None) if self.registry is None else self._peek(self._versions, ref)

    @staticmethod
    def _peek(cache: dict[str, tuple[float, Any]], key: str) -> tuple[bool, Any]:
        hit = cache.get(key)
        return (True, hit[1]) if hit is not None and hit[0] > time.monotonic() else (False, None)

    def model_owner(self, name: str) -> Any:
        """The registered model `name` (cached for the TTL), or None when it is not in the registry."""
        if self.registry is None:
            return None
        return self._cached(self._models, name, self.registry.get_model)

    def visible_model(self, principal: Principal, name: str) -> bool:
        """Whether `principal` may see and call the registry model `name` (True when it is not registered)."""
        return _visible_to(self.model_owner(name), principal)

    def version_of(self, ref: str) -> str | None:
        """`name:version` a reference names now (cached for the TTL), or None outside the registry."""
        if self.registry is None:
            return None
        return self._cached(self._versions, ref, lambda r: self.registry.resolve(r).ref)

    def _cached(self, cache: dict[str, tuple[float, Any]], key: str, compute: Callable[[str], Any]) -> Any:
        """`compute(key)`, remembered for the TTL; an unknown name or a malformed reference is remembered as None.

        Other errors (the database unreachable) propagate: an outage must not make private models look unregistered.
        """
        hit, value = self._peek(cache, key)
        if hit:
            return value
        try:
            value = compute(key)
        except (NotFoundError, InvalidInputError):
            value = None
        with self._lock:
            if len(cache) >= 10_000:
                cache.clear()
            cache[key] = (time.monotonic() + self.config.cache_ttl_s, value)
        return value


def _visible_to(model: Any, principal: Principal) -> bool:
    """Whether `principal` may see the registry model `model` (None: not registered, so anyone may)."""
    return model is None or model.visible_to(principal.tenant_filter)


def _bearer(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header value (None when there is no header).

    Raises:
        AuthenticationError (401): not `Bearer`, or no key after it.
    """
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("malformed Authorization header: send `Authorization: Bearer <key>`")
    return token.strip()
