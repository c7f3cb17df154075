"""The gateway: `OpenAIIngress`, the Serve deployment in front of every model deployment.

`OpenAIIngress` (FastAPI via `@serve.ingress`) serves the OpenAI API of `openai_app.build_openai_app`
over `DeploymentEngine`s (`replica`), one per served name, which forward each call to a deployment handle
(token events stream back through `handle.options(stream=True)`). It routes by the request's
`model` field: a model's `name` or its configured reference (`tiny`, `tiny:3`, `tiny@staging`).
The same replica answers the gRPC API (`protocol/lmaas.proto`) through Serve's gRPC proxy: its
methods `ListModels`, `Complete` (server streaming) and `Embed` are named like the RPCs and call
`grpc_api.GrpcServing` over the same engines. Serve serves gRPC only when started with
`grpc_options(port)` (`grpc_options:` at the top of serve.yaml; `lmaas deploy --grpc-port`).

A served model with `engine.max_adapters` > 0 also answers its LoRA adapters by name (`serve.adapters`): a `model`
that names no served model is resolved in the registry as the caller's tenant, and an adapter of the version a
deployment serves goes to that deployment (its stable side, when it has a canary) with the adapter attached.

The management REST API (`management`) rides on the same app. Its `/api/v1/deployments` and the
canaries' promotions hand changes to the applier it is given (`deployments.applier`, passed in by
`deployments.build_app`): the gateway never imports the code that redeploys it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from lmaas.ops.logs import configure_logging
from lmaas.ops.metrics import GatewayMetrics
from lmaas.serve.engine import Engine
from lmaas.serve.adapters import AdapterBase, AdapterRoutes
from lmaas.serve.options import INGRESS_NAME, ServeAppArgs
from lmaas.serve.replica import MULTIPLEX_NAME, DeploymentEngine, LocalEngine

log = logging.getLogger("lmaas.serve")



@serve.deployment(name=INGRESS_NAME)
@serve.ingress()
class OpenAIIngress:
    """The OpenAI API over HTTP and the `lmaas.v1.Inference` gRPC API; routes each request by its `model` field to a model deployment's handle.

    Args:
        models: served name -> handle of its `ModelServer` deployment.
        multiplexed: served name -> registry reference, served by `multiplex`.
        multiplex: handle of the `MultiplexedModelServer` deployment (None when nothing is multiplexed).
        refs: served name -> its configured reference (also accepted as `model`).
        args: the app's arguments as a dict (`lmaas deployments` and `lmaas deploy` read them back).
        canaries: served name -> handle of its canary's `ModelServer` deployment (`serve.canary` splits the traffic).
        applier: env -> the actor that applies deployment changes (`deployments.applier`): where
            `/api/v1/deployments` and canary promotions send them (see `serve.control`).
        colocated: `ModelServer` arguments (ref, served name, engine options, refresh interval) of the model
            whose engine runs in this gateway's process (`ServedModel.colocated`, `replica.LocalEngine`).
    """

    async def __init__(
        self,
        models: dict[str, DeploymentHandle],
        multiplexed: dict[str, str],
        multiplex: DeploymentHandle | None,
        refs: dict[str, str],
        args: dict,
        canaries: dict[str, DeploymentHandle] | None = None,
        *,
        applier: Callable[[dict[str, str]], Any],
        colocated: tuple | None = None,
    ) -> None:
        from lmaas.serve.grpc_api import GrpcServing
        from lmaas.serve.openai_api import OpenAIServing

        configure_logging()
        self._models, self._multiplexed, self._multiplex, self._refs, self._args = models, multiplexed, multiplex, refs, args
        self._applier = applier
        self._engines: dict[str, Engine] = {}
        for name, handle in models.items():
            self._engines[name] = self._engines[refs[name]] = DeploymentEngine(name, handle)
        for name, ref in multiplexed.items():
            self._engines[name] = self._engines[ref] = DeploymentEngine(name, multiplex, multiplexed_id=ref)
        self._local: dict[str, LocalEngine] = {}
        if colocated is not None:
            ref, name = colocated[0], colocated[1]
            self._local[name] = self._engines[name] = self._engines[ref] = await LocalEngine.start(*colocated)
        config = ServeAppArgs(**args)
        # before the canaries wrap them: adapters go to the stable side, whose version they were checked against
        self._adapter_bases = [AdapterBase(m.name, m.ref, self._engines[m.name]) for m in config.models
                               if m.engine.max_adapters and not m.multiplexed and m.name in self._engines]
        if canaries:
            self._split_traffic(canaries)
        self._grpc = GrpcServing(OpenAIServing(self._engines), refs=refs)
        self._record_deployments()

    def _record_deployments(self) -> None:
        """The app's deployment records follow what this gateway serves (also when `serve deploy` of a YAML started it)."""
        from lmaas.serve.records import DeploymentRecords

        config = ServeAppArgs(**self._args)
        try:
            DeploymentRecords.from_settings().reconcile(
                serve.get_replica_context().app_name, [(m.name, m.ref, m.canary.ref if m.canary else None) for m in config.models])
        except Exception:  # noqa: BLE001 - serving goes on; lineage and ownership fall back to the models' owners
            log.exception("could not record the app's deployments")

    def _split_traffic(self, canaries: dict[str, DeploymentHandle]) -> None:
        """Put a `CanaryEngine` (stable + canary deployments, state in the database) behind each name with a canary."""
        from lmaas.serve.canary import CanaryEngine, CanaryStore, rollout_id
        from lmaas.serve.control import request_promotion

        app = serve.get_replica_context().app_name
        store = CanaryStore.from_settings()
        config = ServeAppArgs(**self._args)
        for served in config.models:
            if served.name not in canaries or served.canary is None:
                continue
            rollout = rollout_id(served.ref, served.canary.policy())
            engine = CanaryEngine(
                app, served.name, self._engines[served.name], DeploymentEngine(served.name, canaries[served.name]), served.ref,
                served.canary, store, rollout,
                on_promote=lambda name=served.name, ref=served.canary.ref: request_promotion(app, name, ref, config.env, self._applier),
            )
            self._engines[served.name] = self._engines[served.ref] = engine
            try:
                engine.start()
            except Exception:  # noqa: BLE001 - the first request tries again
                log.exception("canary of %s: cannot record its split", served.name)

    def __serve_build_asgi_app__(self):  # noqa: ANN204 - a FastAPI app
        from lmaas.serve.auth import build_auth
        from lmaas.serve.control import DeploymentControl
        from lmaas.serve.management import add_management_routes
        from lmaas.serve.openai_app import build_openai_app

        args = ServeAppArgs(**self._args)
        self._grpc.auth = build_auth(args.auth)  # gRPC calls need the same keys as HTTP
        self._metrics = GatewayMetrics()
        auth = self._grpc.auth
        adapters = AdapterRoutes(lambda: auth.registry if auth is not None and auth.registry is not None else _settings_registry(),
                                 self._adapter_bases, ttl_s=args.auth.cache_ttl_s)
        app = build_openai_app(
            self._engines, max_body_bytes=args.ingress.max_body_bytes, max_upload_bytes=args.ingress.max_upload_bytes,
            auth=self._grpc.auth, refs=self._refs,
            metrics=self._metrics, echo_request_id=False, readiness=self._readiness,  # Serve's proxy returns X-Request-Id
            adapters=adapters,
        )
        # one port for /v1 and /api/v1: the registry, auth and deployment REST APIs ride on the same app
        control = DeploymentControl(serve.get_replica_context().app_name, args, applier=self._applier)
        add_management_routes(app, self._grpc.auth.registry if self._grpc.auth else None, auth=self._grpc.auth, deployments=control)
        return app

    def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`: a moment to let old requests leave the recent-traffic gauges."""
        for engine in self._local.values():
            engine.check_health()  # a dead colocated engine: Serve replaces this replica
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:
            try:
                metrics.refresh()
            except Exception:  # noqa: BLE001 - a metrics hiccup must not mark the gateway unhealthy
                log.warning("cannot refresh the recent-traffic gauges", exc_info=True)

    async def _readiness(self) -> tuple[bool, dict[str, str]]:
        """`/readyz`: the served models' replicas, the database and the artifact store (see `ops.health.readiness`)."""
        from lmaas.config import load_settings
        from lmaas.ops.health import readiness

        return await asyncio.to_thread(readiness, load_settings(), self._replica_problems)

    def _replica_problems(self) -> dict[str, str]:
        """Served name -> "ok", or why it cannot answer now (no running replica, and not scaled to zero by design)."""
        args = ServeAppArgs(**self._args)
        app = serve.status().applications.get(serve.get_replica_context().app_name)
        out = {}
        for m in args.models:
            if m.name in self._local:
                out[m.name] = "ok" if self._local[m.name].healthy() else "the colocated engine has stopped"
                continue
            key, scaling = (MULTIPLEX_NAME, args.multiplex) if m.multiplexed else (m.serving_deployment, m)
            state = app.deployments.get(key) if app is not None else None
            running = _running_replicas(state)
            if running or scaling.min_replicas == 0 and state is not None and _status(state) != "DEPLOY_FAILED":
                out[m.name] = "ok"
            else:
                out[m.name] = f"no running replica (deployment {key}: {_status(state) if state else 'missing'})"
        return out

    # gRPC (`lmaas.v1.Inference`): Serve's gRPC proxy calls the method named like the RPC

    async def ListModels(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - the RPC's name
        return await self._grpc.list_models(request, grpc_context)

    async def Complete(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        async for chunk in self._grpc.complete(request, grpc_context):
            yield chunk

    async def Embed(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return await self._grpc.embed(request, grpc_context)

    def app_args(self) -> dict:
        """The `ServeAppArgs` this app was built from."""
        return self._args

    async def served_info(self, names: list[str] | None = None) -> dict[str, dict]:
        """Served name -> what a replica of it serves now (`ModelServer.info`: version, engine, ...).

        Asking about a deployment scaled to zero starts a replica: pass only `names` that have one.
        """
        names = [n for n in (self._models if names is None else names) if n in self._models]
        infos = await asyncio.gather(*(self._models[n].info.remote() for n in names))
        return dict(zip(names, infos)) | {name: engine.info() for name, engine in self._local.items()}

    async def served_versions(self, names: list[str] | None = None) -> dict[str, str]:
        """Served name -> `name:version` a replica of it serves now (multiplexed: its reference)."""
        return {name: info["version"] for name, info in (await self.served_info(names)).items()} | dict(self._multiplexed)


def _settings_registry() -> Any:  # noqa: ANN401 - a ModelRegistry
    """The registry of this process's settings (the gateway's, when auth is off and so holds none)."""
    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry

    return ModelRegistry.from_settings(load_settings())


def _running_replicas(state: Any) -> int:
    """RUNNING replicas of a Serve `DeploymentStatusOverview` (0 for None)."""
    return sum(n for s, n in state.replica_states.items() if str(getattr(s, "value", s)) == "RUNNING") if state else 0


def _status(state: Any) -> str:
    return str(getattr(state.status, "value", state.status))
