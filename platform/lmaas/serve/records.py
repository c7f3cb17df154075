"""Deployment records: which tenant owns each served name of a Serve app, and which references it serves.

The Serve app's own config says what runs; the `deployments` table says whose it is. A deploy
applied by the gateway's applier or by `lmaas deploy` writes the row, undeploy removes it. Every
change a tenant asks for is checked here (`check_change`), below the HTTP routers:

- a served name nobody holds may be taken by any tenant allowed to deploy;
- a name held by another tenant is refused: 409 to a deploy (the name is taken), 404 to a change
  or an undeploy (as if it did not exist);
- a non-admin deployment stays within its tenant's `TenantCaps` (replicas, CPUs and GPUs per replica,
  deployments per app; `tenant_caps` in the app's args sets them, per tenant if need be) and sets
  no custom Ray `resources` (they pin replicas to nodes: an operator's decision) and no vLLM `engine_kwargs`.

The registry reads the same table: a version a deployment names by number cannot be archived or
deleted, and `lineage()` lists the deployments of a version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pydantic import BaseModel, ConfigDict, Field

from lmaas import db
from lmaas.db.schema import deployments, registered_models
from lmaas.errors import AlreadyExistsError, NotFoundError, PermissionDeniedError


class TenantCaps(BaseModel):
    """What a non-admin tenant's deployments may ask for: per replica, replicas per deployment, deployments per app."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_replicas: int = Field(4, ge=0)
    """Replicas of one deployment (its `max_replicas`; a canary's own count separately)."""
    num_cpus: float = Field(4.0, ge=0)
    """CPUs per replica."""
    num_gpus: float = Field(1.0, ge=0)
    """GPUs per replica."""
    max_deployments: int = Field(8, ge=0)
    """Served names the tenant may hold in one app."""

    def check(self, served: Any, where: str = "") -> None:
        """Raise `PermissionDeniedError` naming the field a `ServedModel` (or its canary: `canary.<field>`) exceeds."""
        for field, limit in (("max_replicas", self.max_replicas), ("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus)):
            value = getattr(served, field)
            if value > limit:
                raise PermissionDeniedError(f"{where}{field} {value:g} is over this tenant's limit of {limit:g} per deployment; "
                                            "ask an admin", param=where + field)
        if served.resources:
            raise PermissionDeniedError("custom Ray resources pin replicas to nodes: only an admin sets them", param=where + "resources")
        if getattr(served, "colocated", False):
            raise PermissionDeniedError("a colocated engine runs inside the shared gateway: only an admin colocates a model",
                                        param="colocated")
        check_engine_kwargs(getattr(served, "engine", None), where + "engine.engine_kwargs")
        if not where and getattr(served, "canary", None) is not None:
            self.check(served.canary, "canary.")


def check_engine_kwargs(engine: Any, param: str) -> None:
    """Refuse a tenant's `EngineOptions.engine_kwargs`: they go to vLLM unchecked (a tokenizer path, remote code, a worker
    class to import), so only an admin sets them."""
    if engine is not None and engine.engine_kwargs:
        raise PermissionDeniedError(f"{param} passes arguments straight to vLLM (paths, code to import): only an admin sets them",
                                    param=param)


class CapsConfig(BaseModel):
    """`tenant_caps` of a Serve app's args: the caps of every non-admin tenant, and other caps for named tenants."""

    model_config = ConfigDict(extra="forbid")

    default: TenantCaps = Field(default_factory=TenantCaps)
    tenants: dict[str, TenantCaps] = Field(default_factory=dict)
    """Tenant name -> its caps instead of `default`."""

    def for_tenant(self, tenant: str) -> TenantCaps:
        return self.tenants.get(tenant, self.default)


@dataclass(frozen=True)
class DeploymentRecord:
    app: str
    name: str
    tenant: str
    ref: str
    canary_ref: str | None
    created_at: float
    updated_at: float


class DeploymentRecords:
    """The `deployments` table of one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_settings(cls, settings: Any = None) -> "DeploymentRecords":
        from lmaas.config import load_settings

        return cls(db.connect((settings or load_settings()).database_url))

    def get(self, app: str, name: str) -> DeploymentRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(deployments).where(deployments.c.app == app, deployments.c.name == name)).mappings().first()
        return _record(row) if row else None

    def list(self, app: str, *, tenant: str | None = None) -> dict[str, DeploymentRecord]:
        """Served name -> record, of `app` (`tenant`: only its own)."""
        query = sa.select(deployments).where(deployments.c.app == app)
        if tenant is not None:
            query = query.where(deployments.c.tenant == tenant)
        with self.engine.connect() as conn:
            return {r["name"]: _record(r) for r in conn.execute(query).mappings()}

    def owner(self, app: str, name: str, ref: str | None = None) -> str | None:
        """Who owns served name `name`: its record's tenant, else (a deployment from before records
        were kept) the owner of the model `ref` names, else nobody (None)."""
        record = self.get(app, name)
        if record is not None:
            return record.tenant
        if ref is None:
            return None
        with self.engine.connect() as conn:
            return _model_owner(conn, ref)

    def check_change(self, app: str, name: str, tenant: str | None, *, create: bool, current_ref: str | None = None) -> None:
        """Refuse a change to served name `name` unless `tenant` owns it (None: an admin may change any).

        Args:
            create: a deploy (which may take a free name); otherwise a change or an undeploy of a running one.
            current_ref: the running deployment's reference, for deployments without a record.

        Raises:
            AlreadyExistsError: a deploy of a name another tenant holds.
            NotFoundError: a change or undeploy of another tenant's deployment (as if it did not exist).
        """
        if tenant is None:
            return
        owner = self.owner(app, name, current_ref)
        if owner is None or owner == tenant:
            return
        if create:
            raise AlreadyExistsError(f"the deployment name {name!r} is taken; choose another name", param="name")
        raise NotFoundError(f"no deployment named {name!r}; see GET /api/v1/deployments", param="name")

    def check_count(self, app: str, name: str, tenant: str, caps: TenantCaps) -> None:
        """Refuse a new served name `name` for `tenant` once it holds `caps.max_deployments` in `app` (403 naming `name`)."""
        held = set(self.list(app, tenant=tenant))
        if name not in held and len(held) >= caps.max_deployments:
            raise PermissionDeniedError(f"tenant {tenant!r} holds {len(held)} deployments in this app, its limit; remove one "
                                        "or ask an admin", param="name")

    def record(self, app: str, name: str, *, tenant: str | None, ref: str, canary_ref: str | None) -> DeploymentRecord:
        """Write (or update) the record of a deploy that was applied; `tenant` None keeps the current owner
        (or, for a new record, takes the owner of the model `ref` names, else `default`)."""
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(deployments.c.id, deployments.c.tenant).where(deployments.c.app == app, deployments.c.name == name)).first()
            if row is not None:
                values = {"ref": ref, "canary_ref": canary_ref, "updated_at": now} | ({"tenant": tenant} if tenant else {})
                conn.execute(deployments.update().where(deployments.c.id == row.id).values(**values))
            else:  # (one connection: on SQLite every transaction holds the write lock, a second would wait on this one)
                owner = tenant or _model_owner(conn, ref) or "default"
                conn.execute(deployments.insert().values(app=app, name=name, tenant=owner, ref=ref, canary_ref=canary_ref,
                                                         created_at=now, updated_at=now))
        found = self.get(app, name)
        assert found is not None
        return found

    def reconcile(self, app: str, served: list[tuple[str, str, str | None]]) -> None:
        """Make `app`'s records those of `served`, its (name, ref, canary ref) now: what a gateway replica does as it starts.

        An app deployed without `deploy_models` (`serve deploy serve.yaml`) gets its records this way
        (each new name owned by its model's tenant, else `default`); a name no longer served loses its
        record; an existing record keeps its owner.
        """
        now = time.time()
        with self.engine.begin() as conn:
            rows = {r.name: r for r in conn.execute(sa.select(deployments.c.id, deployments.c.name, deployments.c.ref, deployments.c.canary_ref)
                                                   .where(deployments.c.app == app))}
            names = {name for name, _, _ in served}
            gone = [r.id for n, r in rows.items() if n not in names]
            if gone:
                conn.execute(deployments.delete().where(deployments.c.id.in_(gone)))
            for name, ref, canary_ref in served:
                row = rows.get(name)
                if row is None:
                    conn.execute(deployments.insert().values(app=app, name=name, tenant=_model_owner(conn, ref) or "default", ref=ref,
                                                             canary_ref=canary_ref, created_at=now, updated_at=now))
                elif (row.ref, row.canary_ref) != (ref, canary_ref):
                    conn.execute(deployments.update().where(deployments.c.id == row.id).values(ref=ref, canary_ref=canary_ref, updated_at=now))

    def remove(self, app: str, name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(deployments.delete().where(deployments.c.app == app, deployments.c.name == name))

    def remove_app(self, app: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(deployments.delete().where(deployments.c.app == app))


def _model_owner(conn: Any, ref: str) -> str | None:
    """The tenant owning the registry model `ref` names (None: not in the registry)."""
    from lmaas.registry import parse_ref

    return conn.execute(sa.select(registered_models.c.tenant).where(registered_models.c.name == parse_ref(ref).name)).scalar()


def _record(row: Any) -> DeploymentRecord:
    return DeploymentRecord(row["app"], row["name"], row["tenant"], row["ref"], row["canary_ref"], row["created_at"], row["updated_at"])
