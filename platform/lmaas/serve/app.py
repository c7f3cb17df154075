"""The app builder: `build_app(args, applier=...)` turns `ServeAppArgs` into the Serve application.

    app = deployments.build_app({"models": [{"ref": "tiny-lm@production", "min_replicas": 0}]})   # with the applier
    serve.run(app, name="lmaas", route_prefix="/")       # or deployments.run_app(app): the same, watched every 0.1 s

One application holds the gateway (`ingress.OpenAIIngress`), one `replica.ModelServer` deployment per
served model (and per canary), and the shared `replica.MultiplexedModelServer` when a model is
multiplexed. A model marked `colocated` has no deployment: its engine runs in the gateway's replicas
(`replica.LocalEngine`), which then take its resources and scaling. `deployments.build_app` (what
`serve run deployments/serve.yaml` imports) is this builder with `deployments.applier` behind the
gateway's deployment changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from ray import serve

from lmaas.serve.ingress import OpenAIIngress
from lmaas.serve.options import ServeAppArgs
from lmaas.serve.replica import ModelServer, MultiplexedModelServer


@functools.cache
def _code_digest() -> str:
    """sha256 of lmaas's own sources: a new lmaas (or an edited checkout) restarts every replica on its next deploy."""
    import lmaas

    root = Path(lmaas.__file__).parent
    digest = hashlib.sha256(lmaas.__version__.encode())
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _version(*args: Any) -> dict[str, Any]:
    """`Deployment.options` that pin the deployment's version to its constructor arguments and lmaas's code.

    `serve.run` from Python gives every deployment a random version unless one is set, so each
    deploy replaced every replica of the app, also of models nobody changed. With the version
    pinned, Serve restarts a deployment's replicas only when its arguments, code or actor options
    (resources, environment) change, updates scaling settings in place, and leaves the rest alone.
    `serve deploy` of a YAML ignores it: Serve versions declarative apps itself.
    """
    encoded = json.dumps([_code_digest(), *args], sort_keys=True, default=str).encode()
    return {"version": hashlib.sha256(encoded).hexdigest()[:20], "_internal": True}


def build_app(args: dict | ServeAppArgs, *, applier: Callable[[dict[str, str]], Any], restart: Collection[str] = ()) -> serve.Application:
    """The Serve application for `args` (`ServeAppArgs`): `serve run module:build_app` calls this (through `deployments.build_app`).

    Deployments keep their replicas across `serve.run`s that leave their arguments alone (see
    `_version`). The ingress restarts on any change of the app's models (it holds their handles).

    Args:
        applier: env -> the actor that applies deployment changes (`deployments.applier`), for the gateway's
            `/api/v1/deployments` and canary promotions.
        restart: served names whose replicas start afresh even if nothing of theirs changed
            (`deploy_models` asks for it when a reference is resolved only at start).

    Raises:
        pydantic.ValidationError: bad arguments (the message names the field).
    """
    # validated here also when given as `ServeAppArgs` (a `model_copy(update=...)` of one runs no validator)
    config = ServeAppArgs.model_validate(args.model_dump() if isinstance(args, ServeAppArgs) else args)
    models: dict[str, Any] = {}
    canaries: dict[str, Any] = {}
    multiplexed: dict[str, str] = {}
    fresh = {name: time.time_ns() for name in restart}
    colocated = next((m for m in config.models if m.colocated), None)
    for served in config.models:
        if served.colocated:
            continue  # its engine runs in the gateway (see below)
        if served.multiplexed:
            multiplexed[served.name] = served.ref
            continue
        model_args = (served.ref, served.name, served.engine.model_dump(), served.refresh_interval_s)
        stable_name, canary_name = served.deployments
        options = served.deployment_options(config.env) | {"name": stable_name}
        models[served.name] = ModelServer.options(**options, **_version(*model_args, fresh.get(served.name))).bind(*model_args)
        if served.canary is not None:  # its own deployment and replicas; the ingress splits the traffic
            canary_args = (served.canary.ref, served.name, served.engine.model_dump(), served.refresh_interval_s)
            options = served.canary.deployment_options(config.env) | {"name": canary_name}
            canaries[served.name] = ModelServer.options(**options, **_version(*canary_args, fresh.get(served.name))).bind(*canary_args)
    multiplex = None
    if multiplexed:
        mux = config.multiplex
        mux_args = (mux.engine.model_dump(), mux.max_num_models_per_replica)
        multiplex = MultiplexedModelServer.options(**mux.deployment_options(config.env), **_version(*mux_args)).bind(*mux_args)
    ingress = config.ingress
    actor: dict[str, Any] = {"num_cpus": ingress.num_cpus} | ({"resources": dict(ingress.resources)} if ingress.resources else {})
    if config.env:
        actor["runtime_env"] = {"env_vars": dict(config.env)}  # auth reads the database
    refs, app_config = {m.name: m.ref for m in config.models}, config.model_dump(mode="json")
    options: dict[str, Any] = {
        "num_replicas": ingress.num_replicas, "max_ongoing_requests": ingress.max_ongoing_requests, "ray_actor_options": actor,
        "graceful_shutdown_wait_loop_s": ingress.graceful_shutdown_wait_loop_s,
    }
    local = None
    if colocated is not None:  # the gateway's replicas run this model: its resources and scaling, plus the gateway's CPU
        local = (colocated.ref, colocated.name, colocated.engine.model_dump(), colocated.refresh_interval_s)
        options = colocated.deployment_options(config.env)
        model_actor = options["ray_actor_options"]
        model_actor["num_cpus"] = model_actor["num_cpus"] + ingress.num_cpus
        if ingress.resources:
            model_actor["resources"] = {**model_actor.get("resources", {}), **ingress.resources}
        options["max_ongoing_requests"] = max(ingress.max_ongoing_requests, colocated.max_ongoing_requests)
    return OpenAIIngress.options(**options, **_version(app_config, sorted(fresh.items()))).bind(
        models, multiplexed, multiplex, refs, app_config, canaries, applier=applier, colocated=local,
    )
