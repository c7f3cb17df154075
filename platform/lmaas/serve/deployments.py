"""The deployment control plane: the lmaas Serve app on a running cluster (`lmaas deploy`, `/api/v1/deployments`).

    serve run deployments/serve.yaml                 # every scaling knob lives in that YAML
    app = build_app({"models": [{"ref": "tiny-lm@production", "min_replicas": 0}]})
    serve.run(app, name="lmaas", route_prefix="/")       # or run_app(app): the same, watched every 0.1 s

`build_app` is `app.build_app` with this module's `applier` behind the gateway's deployment changes
(`serve run lmaas.serve.deployments:build_app` in deployments/serve.yaml). `run_app` and `delete_app`
start and delete an app and wait for it; `deploy_model(s)`, `undeploy_model` and `list_deployments`
change and read the app on the connected cluster; `DeploymentApplier` is the detached actor that
applies, one at a time, the changes gateways queue (`serve.control`).

Under it, lowest first: `options` (the Serve YAML's `args`), `replica` (model replicas and their
client in the gateway), `ingress` (the gateway), `app` (the builder). Imports go one way, down that
list; nothing in `lmaas.serve` imports this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from lmaas import db
from lmaas.serve import app as app_builder
from lmaas.serve.control import _summary

# re-exported, so that the names users reach through `lmaas.serve.deployments` keep working (the argument types of
# `build_app` and `deploy_model(s)`, the deployments the README names); their code lives in `ingress`, `options`, `replica`
from lmaas.serve.ingress import INGRESS_NAME, OpenAIIngress, _running_replicas
from lmaas.serve.options import (
    CanaryOptions,
    EngineOptions,
    IngressOptions,
    MultiplexOptions,
    ScalingOptions,
    ServeAppArgs,
    ServedModel,
    canary_deployment_name,
    deployment_name,
)
from lmaas.serve.replica import MULTIPLEX_NAME, ModelServer, MultiplexedModelServer

__all__ = [  # this module's own names, then the re-exported ones
    "APP_NAME", "DEFAULT_GRPC_PORT", "GRPC_SERVICER", "DeploymentApplier", "DeploymentSummary", "applier", "build_app", "delete_app",
    "deploy_model", "deploy_models", "grpc_options", "http_port", "list_deployments", "run_app", "undeploy_model",
] + [
    "INGRESS_NAME", "MULTIPLEX_NAME", "CanaryOptions", "EngineOptions", "IngressOptions", "ModelServer", "MultiplexOptions",
    "MultiplexedModelServer", "OpenAIIngress", "ScalingOptions", "ServeAppArgs", "ServedModel", "canary_deployment_name", "deployment_name",
]

log = logging.getLogger("lmaas.serve")

GRPC_SERVICER = "lmaas.serve.protocol.lmaas_pb2_grpc.add_InferenceServicer_to_server"
"""What Serve's gRPC proxy registers (`grpc_options.grpc_servicer_functions`) to serve `lmaas.v1.Inference`."""
DEFAULT_GRPC_PORT = 9000


def build_app(args: dict | ServeAppArgs) -> serve.Application:
    """The lmaas Serve application for `args` (`ServeAppArgs`): `serve run lmaas.serve.deployments:build_app` and
    `serve deploy deployments/serve.yaml` call this (Serve takes a builder of exactly one parameter).

    `app.build_app` with `applier` behind the gateway's `/api/v1/deployments` and canary promotions.

    Raises:
        pydantic.ValidationError: bad arguments (the message names the field).
    """
    return app_builder.build_app(args, applier=applier)


# ---- managing the app on a running cluster (the `lmaas deploy` commands) ----

APP_NAME = "lmaas"


@dataclass(frozen=True)
class DeploymentSummary:
    """One served model as `lmaas deployments` lists it."""

    name: str
    ref: str
    serving: str
    """`name:version` a replica serves now ("-" when none runs, e.g. scaled to zero)."""
    status: str
    running: int
    """Replicas running now."""
    min_replicas: int
    max_replicas: int
    multiplexed: bool
    canary: dict[str, Any] | None = None
    """`{ref, weight, state, reason, serving}` while a canary is configured (`state`: running, rolled_back, promoted)."""
    engine: str = "-"
    """The engine a replica runs ("vllm", "lmaas"; "-" when none runs or the deployment is multiplexed)."""


APP_POLL_S = 0.1
"""How often `run_app` and `delete_app` read the app's status (Serve's own `serve.run` sleeps 1 s between reads)."""


def run_app(app: serve.Application, app_name: str = APP_NAME, *, timeout_s: float | None = None) -> DeploymentHandle:
    """`serve.run(app, name=app_name, route_prefix="/")`: deploy and wait until the app runs; returns its ingress handle.

    Raises:
        RuntimeError: the app failed to deploy (Serve's message, as `serve.run` raises it).
        TimeoutError: not running within `timeout_s` (None: no limit, as `serve.run`).
    """
    from ray.serve.schema import ApplicationStatus

    [handle] = serve.run_many([serve.RunTarget(app, name=app_name, route_prefix="/")], wait_for_applications_running=False)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app_name)
        if status is None:
            raise RuntimeError(f"Waiting for application {app_name} to be RUNNING, but application doesn't exist.")
        if status.status == ApplicationStatus.RUNNING:
            return handle
        if status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"Deploying application {app_name} failed: {status.message}")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"Application {app_name} did not become RUNNING after {timeout_s}s.")
        time.sleep(APP_POLL_S)


def delete_app(app_name: str = APP_NAME, *, timeout_s: float = 600.0) -> None:
    """`serve.delete(app_name)`: delete the app and wait until its replicas have stopped (in-flight requests finish first)."""
    serve.delete(app_name, _blocking=False)  # Serve's blocking wait reads the status once a second
    deadline = time.monotonic() + timeout_s
    while app_name in serve.status().applications:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Application {app_name} was not deleted after {timeout_s}s.")
        time.sleep(APP_POLL_S)


def _current_args(app_name: str) -> ServeAppArgs | None:
    if app_name not in serve.status().applications:
        return None
    return ServeAppArgs.model_validate(serve.get_app_handle(app_name).app_args.remote().result())


def grpc_options(port: int) -> dict[str, Any]:
    """Serve's `grpc_options` that serve the gRPC API (`lmaas.v1.Inference`) on `port`."""
    return {"port": port, "grpc_servicer_functions": [GRPC_SERVICER]}


def deploy_model(
    served: ServedModel, *, env: dict[str, str], app_name: str = APP_NAME, host: str = "0.0.0.0", port: int = 8000, grpc_port: int | None = DEFAULT_GRPC_PORT
) -> str:
    """Add (or replace, by name) one model in the app on the connected cluster and wait until it runs.

    Returns:
        The `name:version` the new deployment serves.
    """
    return deploy_models([served], env=env, app_name=app_name, host=host, port=port, grpc_port=grpc_port)[served.name]


def deploy_models(
    served: list[ServedModel], *, env: dict[str, str], app_name: str = APP_NAME, host: str = "0.0.0.0", port: int = 8000,
    grpc_port: int | None = DEFAULT_GRPC_PORT, owner: str | None = None,
) -> dict[str, str]:
    """Add (or replace, by name) models in the app on the connected cluster and wait until they run.

    Other models keep their settings; Serve updates only deployments whose config changed. `port`
    (HTTP) and `grpc_port` (None: no gRPC) apply when this call starts Serve; a running Serve keeps
    its own (`http_port()` tells where it listens). Each served name's record (`serve.records`) is
    written once the app runs: `owner` is the tenant it belongs to (None: its current owner, or for
    a new name the owner of the model it serves). Ownership is checked by the caller (`DeploymentControl`).

    Returns:
        Served name -> the `name:version` it serves (its reference while scaled to zero).
    """
    args = _current_args(app_name)
    current = {m.name: m for m in (args.models if args else [])}
    # a replacement keeps the deployment its stable side runs in (a promotion may have swapped it) unless it says otherwise
    served = [m if "swapped" in m.model_fields_set or m.name not in current else m.model_copy(update={"swapped": current[m.name].swapped})
              for m in served]
    names = {m.name for m in served}
    models = [m for m in current.values() if m.name not in names] + list(served)
    config = (args or ServeAppArgs(models=models)).model_copy(update={"models": models, "env": env or (args.env if args else {})})
    _start_canaries(app_name, served)
    serve.start(http_options={"host": host, "port": port}, grpc_options=grpc_options(grpc_port) if grpc_port else None)
    from lmaas.registry import parse_ref

    # a reference that no replica re-resolves (refresh 0) resolves again only when its replicas start
    restart = [m.name for m in served if m.refresh_interval_s == 0 and parse_ref(m.ref).version is None]
    handle = run_app(app_builder.build_app(ServeAppArgs.model_validate(config.model_dump()), applier=applier, restart=restart), app_name)
    from lmaas.serve.records import DeploymentRecords

    records = DeploymentRecords.from_settings()
    for m in served:
        records.record(app_name, m.name, tenant=owner, ref=m.ref, canary_ref=m.canary.ref if m.canary else None)
    warm = [m.name for m in served if m.initial_replicas != 0 and not m.multiplexed]  # asking a cold one would start it
    versions = handle.served_versions.remote(warm).result() if warm else {}
    return {m.name: versions.get(m.name, m.ref) for m in served}


def _start_canaries(app_name: str, served: list[ServedModel]) -> None:
    """A deploy starts each canary of `served` afresh (before the new gateway replicas read it); models without one lose their row."""
    from lmaas.serve.canary import CanaryStore, rollout_id

    store = CanaryStore.from_settings()
    store.reset(app_name, [m.name for m in served if m.canary is None])
    for m in served:
        if m.canary is not None:
            store.restart(app_name, m.name, rollout_id(m.ref, m.canary.policy()), m.ref, m.canary.ref, m.canary.weight)


def http_port() -> int:
    """The port Serve's HTTP proxies listen on (Serve must be running)."""
    from ray.serve.context import _get_global_client

    return int(_get_global_client().http_config.port)


def undeploy_model(name: str, *, app_name: str = APP_NAME) -> None:
    """Remove one served model; the app goes away with its last model.

    Raises:
        NotFoundError: nothing by that name is deployed.
    """
    from lmaas.errors import NotFoundError

    args = _current_args(app_name)
    names = [m.name for m in args.models] if args else []
    if name not in names:
        raise NotFoundError(f"no deployment named {name!r} (deployed: {', '.join(names) or 'none'}); see `lmaas deployments`", param="name")
    rest = [m for m in args.models if m.name != name]
    from lmaas.serve.canary import CanaryStore
    from lmaas.serve.records import DeploymentRecords

    CanaryStore.from_settings().reset(app_name, [name])
    if not rest:
        delete_app(app_name)
    else:
        run_app(build_app(args.model_copy(update={"models": rest})), app_name)
    DeploymentRecords.from_settings().remove(app_name, name)


def list_deployments(app_name: str = APP_NAME) -> list[DeploymentSummary]:
    """The served models of the app on the connected cluster, with replica counts and status."""
    args = _current_args(app_name)
    if args is None:
        return []
    app = serve.status().applications[app_name]

    def running(key: str) -> int:
        return _running_replicas(app.deployments.get(key))

    live = [m.name for m in args.models if not m.multiplexed and running(m.serving_deployment)]
    try:
        serving = serve.get_app_handle(app_name).served_info.remote(live).result(timeout_s=10)
    except Exception:  # noqa: BLE001 - a replica starting or stopping: list it without a version
        serving = {}
    from lmaas.serve.canary import CanaryStore, rollout_id

    splits = CanaryStore.from_settings().list(app_name) if any(m.canary for m in args.models) else {}
    out = []
    for m in args.models:
        key = MULTIPLEX_NAME if m.multiplexed else m.serving_deployment
        state = app.deployments.get(key)
        scaling = args.multiplex if m.multiplexed else m
        canary = None
        if m.canary is not None:
            split = splits.get(m.name)
            if split is not None and split.rollout != rollout_id(m.ref, m.canary.policy()):
                split = None  # an earlier rollout's row: the gateway has not taken the new config yet
            canary_state = app.deployments.get(m.deployments[1])
            canary = {
                "ref": m.canary.ref,
                "weight": m.canary.weight if split is None else split.routed_weight,
                "state": "pending" if split is None else split.state,
                "reason": "" if split is None else split.reason,
                "status": str(getattr(canary_state.status, "value", canary_state.status)) if canary_state else "MISSING",
            }
        out.append(
            DeploymentSummary(
                m.name, m.ref, serving.get(m.name, {}).get("version", m.ref if m.multiplexed else "-"),
                str(getattr(state.status, "value", state.status)) if state else "MISSING",
                running(key), scaling.min_replicas, scaling.max_replicas, m.multiplexed, canary, serving.get(m.name, {}).get("engine", "-"),
            )
        )
    return out


# ---- applying the changes gateways queue (`serve.control`) ----

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

        return [asdict(d) for d in list_deployments(app)]


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
