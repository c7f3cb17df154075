"""Deployment changes requested over HTTP (`/api/v1/deployments`) or by a canary promotion, applied off the request path.

A gateway replica must not call `serve.run` itself: the new app may replace the very replica that
handles the request. It hands the change to `DeploymentApplier`, one detached Ray actor per
environment that applies changes one at a time (the same `deploy_models` / `undeploy_model` as
`lmaas deploy`), and answers 202 with the desired state; `GET /api/v1/deployments` shows each
change's status (pending, applying, done, failed) next to what runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from typing import Any

import ray

from lmaas import db
from lmaas.auth import Principal
from lmaas.errors import NotFoundError
from lmaas.serve.records import CapsConfig, DeploymentRecords

log = logging.getLogger("lmaas.serve")

APPLIER_NAMESPACE = "lmaas"
KEPT_CHANGES = 100


@ray.remote(num_cpus=0, max_concurrency=4)
class DeploymentApplier:
    """Applies deployment changes in order (one at a time) and remembers how each went."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changes: dict[str, dict[str, Any]] = {}

    def apply(self, change: dict[str, Any]) -> dict[str, Any]:
        """Apply one change: `{"id", "op": "deploy" | "undeploy" | "promote", "app", "env", ...}`."""
        record = self._changes.setdefault(change["id"], _summary(change) | {"status": "pending"})
        with self._lock:
            record.update(status="applying", started_at=time.time())
            try:
                record["result"] = _apply_retrying(change)
                record["status"] = "done"
            except Exception as exc:  # noqa: BLE001 - reported in the change's status
                log.exception("deployment change %s failed", change["id"])
                record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            record["finished_at"] = time.time()
            _audit_applied(change, record)
        while len(self._changes) > KEPT_CHANGES:
            self._changes.pop(next(iter(self._changes)))
        return record

    def queue(self, change: dict[str, Any]) -> None:
        self._changes[change["id"]] = _summary(change) | {"status": "pending"}

    def changes(self, app: str) -> list[dict[str, Any]]:
        """This app's recent changes, oldest first."""
        return [dict(c) for c in self._changes.values() if c["app"] == app]

    def deployments(self, app: str) -> list[dict[str, Any]]:
        """What `lmaas deployments` lists, as dicts."""
        from dataclasses import asdict

        from lmaas.serve.deployments import list_deployments

        return [asdict(d) for d in list_deployments(app)]


def _summary(change: dict[str, Any]) -> dict[str, Any]:
    return {k: change[k] for k in ("id", "op", "app", "name", "actor") if k in change} | {"requested_at": change.get("requested_at")}


PICKLE_RACE = "is not registered for pickle by value"
PICKLE_RACE_ATTEMPTS = 3


def _apply_retrying(change: dict[str, Any]) -> Any:
    """`_apply`, tried again when Ray Serve's unguarded pickle registry trips over another thread of this actor.

    Ray Serve 2.60 registers and unregisters `ray.serve.autoscaling_policy` for pickle-by-value around
    each `AutoscalingConfig` it builds (`ray/serve/config.py`, `serialize_policy`), with no lock: when
    another thread of the process builds one at the same time, the second unregister raises ValueError
    and `serve.run` fails before it sends anything. The same config applied again is harmless.
    """
    for attempt in range(1, PICKLE_RACE_ATTEMPTS + 1):
        try:
            return _apply(change)
        except ValueError as exc:
            if PICKLE_RACE not in str(exc) or attempt == PICKLE_RACE_ATTEMPTS:
                raise
            log.warning("deployment change %s: Ray's pickle registry race (%s); trying again", change["id"], exc)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def _apply(change: dict[str, Any]) -> Any:
    from lmaas.serve.deployments import ServedModel, _current_args, deploy_models, undeploy_model

    op, app = change["op"], change["app"]
    if op == "deploy":
        served = ServedModel.model_validate(change["served"])
        return deploy_models([served], env=change["env"], app_name=app, grpc_port=None, owner=change.get("owner"))
    if op == "undeploy":
        undeploy_model(change["name"], app_name=app)
        return None
    if op == "promote":
        args = _current_args(app)
        current = next((m for m in (args.models if args else []) if m.name == change["name"]), None)
        if current is None or current.canary is None or current.canary.ref != change["canary_ref"]:
            return "skipped: the deployment changed since the promotion"
        # the canary's deployment (and its running replicas) becomes the stable one: the old version's goes
        promoted = current.model_copy(update={"ref": current.canary.ref, "canary": None, "swapped": not current.swapped})
        return deploy_models([promoted], env=args.env, app_name=app, grpc_port=None)
    raise ValueError(f"unknown deployment change {op!r}")


def _audit_applied(change: dict[str, Any], record: dict[str, Any]) -> None:
    try:
        from lmaas.config import load_settings

        db.record_event(
            db.connect(load_settings().database_url), actor=change.get("actor", "gateway"), tenant=change.get("tenant"),
            action="deployment.applied", target=f"{change['app']}/{change.get('name', '')}",
            outcome="ok" if record["status"] == "done" else "error",
            detail={"change": change["id"], "op": change["op"], "error": record.get("error")},
        )
    except Exception:  # noqa: BLE001 - the change happened (or not) either way
        log.exception("could not audit deployment change %s", change["id"])


def applier(env: dict[str, str]) -> Any:
    """The `DeploymentApplier` for replicas with environment `env` (created on first use, detached)."""
    digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]
    options: dict[str, Any] = {"name": f"lmaas-deployments-{digest}", "namespace": APPLIER_NAMESPACE, "lifetime": "detached", "get_if_exists": True}
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    return DeploymentApplier.options(**options).remote()


def submit(change: dict[str, Any]) -> dict[str, Any]:
    """Queue `change` on the applier without waiting for it; returns its summary (status pending)."""
    change = {"id": uuid.uuid4().hex[:12], "requested_at": time.time()} | change
    actor = applier(change["env"])
    ray.get(actor.queue.remote(change))
    actor.apply.remote(change)  # fire and forget: the actor records the outcome
    return _summary(change) | {"status": "pending"}


def request_promotion(app: str, name: str, canary_ref: str, env: dict[str, str]) -> None:
    """Ask for the redeploy that makes `name`'s canary its stable version (called by the replica that promoted)."""
    change = {"id": uuid.uuid4().hex[:12], "requested_at": time.time(), "op": "promote", "app": app, "name": name,
              "canary_ref": canary_ref, "env": env, "actor": "gateway"}
    applier(env).apply.remote(change)


class DeploymentControl:
    """The logic behind `/api/v1/deployments` in a gateway replica (no HTTP here).

    Args:
        app: the Serve app this gateway belongs to.
        args: its `ServeAppArgs` (the replica's view of the current config).
    """

    def __init__(self, app: str, args: Any, caps: CapsConfig | None = None) -> None:
        self.app, self.args = app, args
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
        summary = submit(change)
        from lmaas.config import load_settings

        db.record_event(
            db.connect(load_settings().database_url), actor=principal.actor, tenant=principal.tenant, action=f"deployment.{op}",
            target=f"{self.app}/{name}", outcome="accepted", detail={"change": summary["id"], **({"served": change["served"]} if served else {})},
        )
        return summary

    async def list(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(deployments as `lmaas deployments` lists them, recent changes)."""
        actor = applier(dict(self.args.env))
        return await actor.deployments.remote(self.app), await actor.changes.remote(self.app)
