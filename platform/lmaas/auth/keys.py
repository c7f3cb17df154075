"""Tenants and API keys: create, list, revoke, and verify a presented key (cached for a short TTL).

A key is `lmaas_<id>_<secret>`: the id names it in lists and logs, the secret is 32 random bytes
(`secrets.token_urlsafe`). Only the sha256 of the whole string is stored; since the string is
high-entropy, a plain hash is enough (no password-style slow hash), and a key is found by its hash.

Verified keys are cached per process for `cache_ttl_s` (2 s by default), so a limit change
reaches every gateway replica within that time without a database query per request. A
revocation is faster: each replica reads the newest `revoked_at` at most every
`revocation_sync_s` (0.5 s) and drops its whole cache when it moved, so a key revoked anywhere
is refused everywhere within about that time; a verify that was reading the database while a
revocation landed does not put its (stale) answer in the cache.

The caches are bounded LRUs, one for valid keys and a smaller one for refused secrets, so a flood
of random keys evicts only other refusals. Database lookups of unknown keys are rate limited per
process (`failed_lookups_per_s`): past the limit an uncached key gets 429 without a query.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from lmaas import db
from lmaas.auth.entities import ADMIN, DEFAULT_TENANT, KEY_PREFIX, SCOPES, WINDOWS, ApiKey, Limits, Principal, Tenant
from lmaas.db.schema import api_keys, tenants
from lmaas.errors import AlreadyExistsError, AuthenticationError, ConfigError, InvalidInputError, NotFoundError, RateLimitError

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_CACHE_MAX = 10_000
_REFUSED_MAX = 2_000
_ADVISORY_LOCK_KEY = 0x1A_AA6  # bootstrap: one admin key even when replicas start together


def validate_tenant_name(name: str) -> str:
    """Raises `InvalidInputError` unless `name` is 1-64 of a-z, 0-9, `_`, `-` (starting with a letter or digit)."""
    if not isinstance(name, str) or not TENANT_NAME.match(name):
        raise InvalidInputError(f"tenant name {name!r} must be 1-64 characters of a-z, 0-9, '_' or '-'", param="tenant")
    return name


def validate_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The scopes, deduplicated and in canonical order. Raises `InvalidInputError` naming an unknown one."""
    if not scopes:
        raise InvalidInputError(f"a key needs at least one scope: {', '.join(SCOPES)}", param="scopes")
    for scope in scopes:
        if scope not in SCOPES:
            raise InvalidInputError(f"unknown scope {scope!r}; use {', '.join(SCOPES)}", param="scopes")
    return tuple(s for s in SCOPES if s in scopes)


def validate_limits(limits: Limits) -> Limits:
    """Raises `InvalidInputError` naming a negative (or non-integer) limit."""
    for window in WINDOWS:
        value = getattr(limits, window)
        top = db.MAX_BIGINT if window == "tpd" else db.MAX_INT  # the column's type (lmaas.db.schema)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top):
            raise InvalidInputError(f"{window} must be a whole number from 0 to {top} (or unset for no limit), not {value!r}", param=window)
    return limits


def parse_duration(text: str, *, param: str = "expires") -> float:
    """`30d`, `12h`, `15m`, `3600s`, `2w` -> seconds. Raises `InvalidInputError` naming `param`."""
    match = DURATION.match(str(text).strip().lower())
    if not match or int(match.group(1)) <= 0:
        raise InvalidInputError(f"{param} {text!r} is not a duration like 30d, 12h, 15m or 3600s", param=param)
    return int(match.group(1)) * _UNITS[match.group(2)]


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> tuple[str, str]:
    """(key id, full secret `lmaas_<id>_<random>`)."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


class KeyStore:
    """Tenants and API keys in the metadata database.

    Args:
        engine: the migrated metadata database (see `lmaas.db.connect`).
        cache_ttl_s: how long a verified key (or a refusal) is trusted without asking the database;
            revocation takes effect on every replica within this time.
        last_used_interval_s: `last_used_at` is written at most this often per key and process.
        revocation_sync_s: how often (at most) this process checks the database for new revocations.
        failed_lookups_per_s: database lookups of unknown keys allowed per second (bursts of 10x).
    """

    def __init__(self, engine: Engine, *, cache_ttl_s: float = 2.0, last_used_interval_s: float = 60.0,
                 revocation_sync_s: float = 0.5, failed_lookups_per_s: float = 20.0) -> None:
        self.engine = engine
        self.cache_ttl_s = cache_ttl_s
        self.last_used_interval_s = last_used_interval_s
        self.revocation_sync_s = revocation_sync_s
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._refused: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0
        """Bumped whenever the cache is dropped for a revocation: a lookup begun before it is not cached."""
        self._synced_at = float("-inf")
        self._last_revoked: float | None = None
        self._failures = _Bucket(failed_lookups_per_s, burst=10 * failed_lookups_per_s)

    # -- tenants -------------------------------------------------------------------------
    def create_tenant(self, name: str, limits: Limits = Limits(), *, actor: str = "cli") -> Tenant:
        """Raises `AlreadyExistsError` (409) if it exists, `InvalidInputError` for a bad name or limit."""
        validate_tenant_name(name)
        validate_limits(limits)
        with self.engine.begin() as conn:
            if conn.execute(sa.select(tenants.c.name).where(tenants.c.name == name)).first():
                raise AlreadyExistsError(f"tenant {name!r} already exists", param="name")
            self._insert_tenant(conn, name, limits)
            db.record_event(conn, actor=actor, action="tenant.create", target=name, tenant=name, detail=limits.to_dict())
        return self.get_tenant(name)

    def _insert_tenant(self, conn: Connection, name: str, limits: Limits = Limits()) -> None:
        conn.execute(tenants.insert().values(name=name, created_at=time.time(), **limits.to_dict()))

    def get_tenant(self, name: str) -> Tenant:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(tenants).where(tenants.c.name == name)).mappings().first()
        if row is None:
            raise NotFoundError(f"no tenant named {name!r}", param="tenant")
        return _tenant(row)

    def list_tenants(self) -> list[Tenant]:
        with self.engine.connect() as conn:
            return [_tenant(r) for r in conn.execute(sa.select(tenants).order_by(tenants.c.name)).mappings()]

    def set_tenant_limits(self, name: str, limits: Limits, *, actor: str = "cli") -> Tenant:
        """Replace a tenant's limits (None: no limit). Takes effect within the key cache TTL."""
        validate_limits(limits)
        with self.engine.begin() as conn:
            if not conn.execute(tenants.update().where(tenants.c.name == name).values(**limits.to_dict())).rowcount:
                raise NotFoundError(f"no tenant named {name!r}", param="tenant")
            db.record_event(conn, actor=actor, action="tenant.limits", target=name, tenant=name, detail=limits.to_dict())
        return self.get_tenant(name)

    def set_storage_quota(self, name: str, storage_bytes: int | None, *, actor: str = "cli") -> Tenant:
        """Set the most a tenant's model versions and files may hold in the store (None: no limit).

        What it holds already stays; new versions and uploads past the quota are refused (413).
        """
        if storage_bytes is not None and (isinstance(storage_bytes, bool) or not 0 <= storage_bytes <= db.MAX_BIGINT):
            raise InvalidInputError(f"storage_bytes must be between 0 and {db.MAX_BIGINT}, or none", param="storage_bytes")
        with self.engine.begin() as conn:
            if not conn.execute(tenants.update().where(tenants.c.name == name).values(storage_bytes=storage_bytes)).rowcount:
                raise NotFoundError(f"no tenant named {name!r}", param="tenant")
            db.record_event(conn, actor=actor, action="tenant.storage_quota", target=name, tenant=name, detail={"storage_bytes": storage_bytes})
        return self.get_tenant(name)

    # -- keys ----------------------------------------------------------------------------
    def create_key(
        self,
        tenant: str,
        scopes: list[str] | tuple[str, ...],
        *,
        name: str = "",
        expires_in: str | float | None = None,
        limits: Limits = Limits(),
        actor: str = "cli",
        create_tenant: bool = False,
        secret: str | None = None,
    ) -> tuple[ApiKey, str]:
        """Create a key; the secret is returned here and never again.

        Args:
            tenant: the owning tenant.
            scopes: any of `SCOPES`.
            name: a label for people (`ci`, `alice laptop`).
            expires_in: a duration (`30d`, `12h`, or seconds); None: never expires.
            limits: the key's own rpm/tpm/tpd (its tenant's limits apply as well).
            actor: who creates it, for the audit log.
            create_tenant: create a missing tenant instead of refusing.
            secret: use this secret instead of a random one (the bootstrap key from `LMAAS_ADMIN_KEY`).

        Returns:
            (the key's record, the secret to hand to its user).

        Raises:
            InvalidInputError: bad tenant name, unknown scope, negative limit, bad expiry.
            NotFoundError: no such tenant (and not `create_tenant`).
        """
        validate_tenant_name(tenant)
        scopes = validate_scopes(scopes)
        validate_limits(limits)
        if len(name) > 200:
            raise InvalidInputError("the key name is longer than 200 characters", param="name")
        now = time.time()
        expires_at = None
        if expires_in is not None:
            seconds = parse_duration(expires_in) if isinstance(expires_in, str) else float(expires_in)
            if not seconds > 0:
                raise InvalidInputError(f"expires {expires_in!r} must be a positive duration", param="expires")
            expires_at = now + seconds
        with self.engine.begin() as conn:
            key_id, secret = self._insert_key(conn, tenant, scopes, name, expires_at, limits, actor, create_tenant, secret)
        return self.get_key(key_id), secret

    def _insert_key(
        self, conn: Connection, tenant: str, scopes: tuple[str, ...], name: str, expires_at: float | None,
        limits: Limits, actor: str, create_tenant: bool, secret: str | None,
    ) -> tuple[str, str]:
        key_id, generated = new_secret()
        secret = secret or generated
        if not conn.execute(sa.select(tenants.c.name).where(tenants.c.name == tenant)).first():
            if not create_tenant:
                raise NotFoundError(f"no tenant named {tenant!r}; create it first", param="tenant")
            self._insert_tenant(conn, tenant)
            db.record_event(conn, actor=actor, action="tenant.create", target=tenant, tenant=tenant, detail={})
        conn.execute(
            api_keys.insert().values(
                id=key_id,
                tenant=tenant,
                name=name,
                secret_sha256=secret_sha256(secret),
                scopes=list(scopes),
                created_at=time.time(),
                created_by=actor,
                expires_at=expires_at,
                **limits.to_dict(),
            )
        )
        db.record_event(
            conn, actor=actor, action="key.create", target=f"key:{key_id}", tenant=tenant,
            detail={"scopes": list(scopes), "expires_at": expires_at, **limits.to_dict()},
        )
        return key_id, secret

    def get_key(self, key_id: str, *, tenant: str | None = None) -> ApiKey:
        """Raises `NotFoundError` for an unknown key (or, with `tenant`, another tenant's)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).mappings().first()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise NotFoundError(f"no API key {key_id!r}", param="id")
        return _key(row)

    def list_keys(self, *, tenant: str | None = None, include_revoked: bool = True) -> list[ApiKey]:
        query = sa.select(api_keys).order_by(api_keys.c.tenant, api_keys.c.created_at)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [_key(r) for r in conn.execute(query).mappings()]

    def revoke_key(self, key_id: str, *, actor: str = "cli", tenant: str | None = None) -> ApiKey:
        """Revoke a key; every replica refuses it within `cache_ttl_s`. Revoking twice is a no-op."""
        key = self.get_key(key_id, tenant=tenant)
        if key.revoked_at is None:
            with self.engine.begin() as conn:
                conn.execute(api_keys.update().where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)).values(revoked_at=time.time()))
                db.record_event(conn, actor=actor, action="key.revoke", target=f"key:{key_id}", tenant=key.tenant)
        with self._lock:
            self._cache = OrderedDict((h, v) for h, v in self._cache.items() if v[1].key_id != key_id)
            self._generation += 1
        return self.get_key(key_id)

    def set_key_limits(self, key_id: str, limits: Limits, *, actor: str = "cli") -> ApiKey:
        validate_limits(limits)
        key = self.get_key(key_id)
        with self.engine.begin() as conn:
            conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(**limits.to_dict()))
            db.record_event(conn, actor=actor, action="key.limits", target=f"key:{key_id}", tenant=key.tenant, detail=limits.to_dict())
        return self.get_key(key_id)

    # -- verification --------------------------------------------------------------------
    def verify(self, secret: str | None) -> Principal:
        """The caller a presented key stands for.

        Raises:
            AuthenticationError (401): no key, or an unknown, expired or revoked one.
        """
        if not secret:
            raise AuthenticationError("missing API key: send the header `Authorization: Bearer <key>`")
        self._sync_revocations()
        found = self.verify_cached(secret)
        if found is not None:
            return found
        digest, now = secret_sha256(secret), time.time()
        if not self._failures.has_room():
            raise RateLimitError("too many requests with unknown API keys; try again shortly", retry_after=1, param="authorization")
        generation = self._generation
        principal = self._load(digest, now)
        expires = time.monotonic() + self.cache_ttl_s
        with self._lock:
            if principal is None:
                self._failures.take()
                _remember(self._refused, digest, expires, _REFUSED_MAX)
            elif generation == self._generation:  # no revocation landed while this lookup ran
                _remember(self._cache, digest, (expires, principal), _CACHE_MAX)
        return self._valid(principal, now)

    def verify_cached(self, secret: str | None) -> Principal | None:
        """`verify` answered without the database: the caller, or None when this replica's cache cannot
        say (or it is time to look for new revocations, which `verify` does).

        Raises:
            AuthenticationError (401): no key, or one the cache knows is unknown, expired or revoked.
        """
        if not secret:
            raise AuthenticationError("missing API key: send the header `Authorization: Bearer <key>`")
        if time.monotonic() - self._synced_at >= self.revocation_sync_s:
            return None
        digest, now = secret_sha256(secret), time.monotonic()
        refused = self._refused.get(digest)
        if refused is not None and refused > now:
            raise AuthenticationError("invalid API key: unknown, expired or revoked")
        cached = self._cache.get(digest)
        if cached is None or cached[0] <= now:
            return None
        with self._lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
        return self._valid(cached[1], time.time())

    def _sync_revocations(self) -> None:
        """Drop the cache if a key was revoked (anywhere) since the last look, at most every `revocation_sync_s`."""
        now = time.monotonic()
        if now - self._synced_at < self.revocation_sync_s:
            return
        with self.engine.connect() as conn:
            newest = conn.execute(sa.select(sa.func.max(api_keys.c.revoked_at))).scalar()
        with self._lock:
            if newest != self._last_revoked:
                if self._last_revoked is not None or newest is not None:
                    self._cache.clear()
                    self._generation += 1
                self._last_revoked = newest
            self._synced_at = now

    def cache_sizes(self) -> tuple[int, int]:
        """(valid keys, refused secrets) cached in this process."""
        return len(self._cache), len(self._refused)

    @staticmethod
    def _valid(principal: Principal | None, now: float) -> Principal:
        if principal is None or (principal.expires_at is not None and principal.expires_at <= now):
            raise AuthenticationError("invalid API key: unknown, expired or revoked")
        return principal

    def _load(self, digest: str, now: float) -> Principal | None:
        query = (
            sa.select(api_keys, tenants.c.rpm.label("t_rpm"), tenants.c.tpm.label("t_tpm"), tenants.c.tpd.label("t_tpd"))
            .join(tenants, tenants.c.name == api_keys.c.tenant)
            .where(api_keys.c.secret_sha256 == digest)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        if row is None or not hmac.compare_digest(row["secret_sha256"], digest):
            return None
        key = _key(row)
        if not key.active(now):
            return None
        if key.last_used_at is None or now - key.last_used_at > self.last_used_interval_s:
            with self.engine.begin() as conn:
                conn.execute(api_keys.update().where(api_keys.c.id == key.id).values(last_used_at=now))
        return Principal(
            key_id=key.id,
            tenant=key.tenant,
            scopes=frozenset(key.scopes),
            expires_at=key.expires_at,
            key_limits=key.limits,
            tenant_limits=Limits(row["t_rpm"], row["t_tpm"], row["t_tpd"]),
        )

    # -- bootstrap -----------------------------------------------------------------------
    def bootstrap(self, *, secret: str | None = None, actor: str = "bootstrap") -> str | None:
        """Make sure an admin key exists, creating tenant `default` and one if none does.

        Args:
            secret: the admin key to install (from `LMAAS_ADMIN_KEY`); it is created once and
                never re-created after a revocation.

        Returns:
            A newly generated admin secret to print once, or None (one existed, or `secret` was given).

        Raises:
            ConfigError: `secret` is shorter than 24 characters.
        """
        if secret is not None and len(secret) < 24:
            raise ConfigError("LMAAS_ADMIN_KEY must be at least 24 characters (use `lmaas keys create` to make one)", param="LMAAS_ADMIN_KEY")
        now = time.time()
        with self.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE serializes bootstraps
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"select pg_advisory_xact_lock({_ADVISORY_LOCK_KEY})")
            if secret is not None:
                if conn.execute(sa.select(api_keys.c.id).where(api_keys.c.secret_sha256 == secret_sha256(secret))).first():
                    return None
            else:
                for row in conn.execute(sa.select(api_keys).where(api_keys.c.revoked_at.is_(None))).mappings():
                    if ADMIN in row["scopes"] and _key(row).active(now):
                        return None
            _, created = self._insert_key(conn, DEFAULT_TENANT, (ADMIN,), "bootstrap admin", None, Limits(), actor, True, secret)
        return None if secret is not None else created


def _tenant(row: Any) -> Tenant:
    return Tenant(name=row["name"], created_at=row["created_at"], limits=Limits(row["rpm"], row["tpm"], row["tpd"]),
                  storage_bytes=row["storage_bytes"])


def _key(row: Any) -> ApiKey:
    return ApiKey(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        scopes=tuple(row["scopes"]),
        created_at=row["created_at"],
        created_by=row["created_by"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
        limits=Limits(row["rpm"], row["tpm"], row["tpd"]),
    )


def _remember(cache: OrderedDict, key: str, value: Any, limit: int) -> None:
    """Put `key` in an LRU of at most `limit` entries (the caller holds the lock)."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


class _Bucket:
    """A token bucket: `rate` tokens a second, holding at most `burst`."""

    def __init__(self, rate: float, *, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = burst, time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def has_room(self) -> bool:
        self._refill()
        return self._tokens >= 1

    def take(self) -> None:
        self._refill()
        self._tokens = max(0.0, self._tokens - 1)
