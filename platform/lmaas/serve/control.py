"""Deployment changes requested over HTTP (`/api/v1/deployments`) or by a canary promotion, queued for the applier.

A gateway replica must not call `serve.run` itself: the new app may replace the very replica that
handles the request. It hands the change to the applier, one detached Ray actor per environment
that applies changes one at a time (`deployments.DeploymentApplier`: the same `deploy_models` /
`undeploy_model` as `lmaas deploy`), and answers 202 with the desired state; `GET /api/v1/deployments`
shows each change's status (pending, applying, done, failed) next to what runs.

This module is the gateway's side: `DeploymentControl` checks ownership and caps, audits each
request and queues it. The applier is passed in (`applier(env) -> actor handle`; the gateway is
given `deployments.applier`), as the code that applies a change builds the app this gateway runs in.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import ray

from lmaas import db
from lmaas.auth import Principal
from lmaas.errors import NotFoundError
from lmaas.serve.records import CapsConfig, DeploymentRecords


def _summary(change: dict[str, Any]) -> dict[str, Any]:
    return {k: change[k] for k in ("id", "op", "app", "name", "actor") if k in change} | {"requested_at": change.get("requested_at")}


def submit(change: dict[str, Any], applier: Callable[[dict[str, str]], Any]) -> dict[str, Any]:
    """Queue `change` on the applier (`applier(env)`, see `deployments.applier`) without waiting for it; returns its summary (status pending)."""
    change = {"id": uuid.uuid4().hex[:12], "requested_at": time.time()} | change
    actor = applier(change["env"])
    ray.get(actor.queue.remote(change))
    actor.apply.remote(change)  # fire and forget: the actor records the outcome
    return _summary(change) | {"status": "pending"}


def request_promotion(app: str, name: str, canary_ref: str, env: dict[str, str], applier: Callable[[dict[str, str]], Any]) -> None:
    """Ask for the redeploy that makes `name`'s canary its stable version (called by the replica that promoted)."""
    change = {"id": uuid.uuid4().hex[:12], "requested_at": time.time(), "op": "promote", "app": app, "name": name,
              "canary_ref": canary_ref, "env": env, "actor": "gateway"}
    applier(env).apply.remote(change)


class DeploymentControl:
    """The logic behind `/api/v1/deployments` in a gateway replica (no HTTP here).

    Args:
        app: the Serve app this gateway belongs to.
        args: its `ServeAppArgs` (the replica's view of the current config).
        applier: env -> the actor that applies changes (`deployments.applier`).
    """

    def __init__(self, app: str, args: Any, caps: CapsConfig | None = None, *, applier: Callable[[dict[str, str]], Any]) -> None:
        self.app, self.args = app, args
        self.applier = applier
        self.caps = caps or getattr(args, "tenant_caps", None) or CapsConfig()

    def served(self, name: str) -> Any:
        """The configured `ServedModel` named `name`.

        Raises:
            NotFoundError: nothing by that name is deployed.
        """
        for m in self.args.models:
            if m.name == name:
                return m
        raise NotFoundError(f"no deployment named {name!r}; see GET /api/v1/deployments", param="name")

    def check(self, principal: Principal, name: str, *, create: bool) -> None:
        """Refuse a change to served name `name` the caller's tenant does not own (see `serve.records`)."""
        current = next((m for m in self.args.models if m.name == name), None)
        self.records.check_change(self.app, name, principal.tenant_filter, create=create, current_ref=current.ref if current else None)

    @property
    def records(self) -> DeploymentRecords:
        """The deployment records of this replica's database (its environment is the app's `env`)."""
        return DeploymentRecords.from_settings()

    def submit(self, principal: Principal, op: str, name: str, served: Any = None) -> dict[str, Any]:
        """Check ownership and caps, audit the request and hand it to the applier; returns the change's summary.

        Raises:
            AlreadyExistsError: a deploy under a served name another tenant holds.
            NotFoundError: an undeploy of another tenant's deployment.
            PermissionDeniedError: a non-admin deployment over its tenant's caps (`tenant_caps`), or with custom resources.
        """
        self.check(principal, name, create=op == "deploy")
        if served is not None and principal.tenant_filter is not None:
            caps = self.caps.for_tenant(principal.tenant)
            caps.check(served)
            self.records.check_count(self.app, name, principal.tenant, caps)
        change = {"op": op, "app": self.app, "name": name, "env": dict(self.args.env), "actor": principal.actor,
                  "tenant": principal.tenant, "owner": principal.tenant_filter}
        if served is not None:
            change["served"] = served.model_dump(mode="json", exclude_unset=True)  # unset: `deploy_models` keeps the current `swapped`
        summary = submit(change, self.applier)
        from lmaas.config import load_settings

        db.record_event(
            db.connect(load_settings().database_url), actor=principal.actor, tenant=principal.tenant, action=f"deployment.{op}",
            target=f"{self.app}/{name}", outcome="accepted", detail={"change": summary["id"], **({"served": change["served"]} if served else {})},
        )
        return summary

    async def list(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(deployments as `lmaas deployments` lists them, recent changes)."""
        actor = self.applier(dict(self.args.env))
        return await actor.deployments.remote(self.app), await actor.changes.remote(self.app)
