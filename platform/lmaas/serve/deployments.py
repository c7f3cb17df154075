"""Ray Serve deployments (the only `ray.serve` user): registered models behind the OpenAI API.

    serve run deployments/serve.yaml                 # every scaling knob lives in that YAML
    app = build_app({"models": [{"ref": "tiny-lm@production", "min_replicas": 0}]})
    serve.run(app, name="lmaas", route_prefix="/")       # or run_app(app): the same, watched every 0.1 s

One application holds:

- `OpenAIIngress` (FastAPI via `@serve.ingress`): the OpenAI API of `openai_app.build_openai_app`
  over `DeploymentEngine`s, one per served name, which forward each call to a deployment handle
  (token events stream back through `handle.options(stream=True)`). It routes by the request's
  `model` field: a model's `name` or its configured reference (`tiny`, `tiny:3`, `tiny@staging`).
  The same replica answers the gRPC API (`protocol/lmaas.proto`) through Serve's gRPC proxy: its
  methods `ListModels`, `Complete` (server streaming) and `Embed` are named like the RPCs and call
  `grpc_api.GrpcServing` over the same engines. Serve serves gRPC only when started with
  `grpc_options(port)` (`grpc_options:` at the top of serve.yaml; `lmaas deploy --grpc-port`).
- `ModelServer`: one deployment per served model, autoscaled; each replica resolves the reference
  in the registry, downloads that version (sha256-checked) and runs its engine.
- `MultiplexedModelServer`: one shared deployment for long-tail models (`multiplexed: true`);
  each replica keeps at most `max_num_models_per_replica` engines, least recently used leaves first.

Alias rollout without failed requests: a `ModelServer` serving a moving reference (`name` or
`name@alias`) re-resolves it every `refresh_interval_s`. When it names a new version, the replica
downloads and loads the new engine in a thread *while the old one keeps serving*, then swaps the
pointer: requests that start afterwards use the new engine; streams already running finish on the
old one, which is closed when its last request ends. No replica restarts, so no request is refused.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from lmaas.auth import AuthConfig
from lmaas.errors import InvalidInputError, LmaasError, ReplicaLostError
from lmaas.ops.logs import REQUEST_ID, configure_logging
from lmaas.ops.metrics import ENGINE_POLL_S, GatewayMetrics, ServingMetrics
from lmaas.serve.engine import Engine, EngineStats, GenerationRequest, SamplingParams, TokenEvent, Tokenized
from lmaas.serve.openai_app import MAX_BODY_BYTES, MAX_UPLOAD_BYTES
from lmaas.serve.records import CapsConfig
from lmaas.serve.streams import ready_batches

log = logging.getLogger("lmaas.serve")

INGRESS_NAME = "OpenAIIngress"
GRPC_SERVICER = "lmaas.serve.protocol.lmaas_pb2_grpc.add_InferenceServicer_to_server"
"""What Serve's gRPC proxy registers (`grpc_options.grpc_servicer_functions`) to serve `lmaas.v1.Inference`."""
DEFAULT_GRPC_PORT = 9000
MULTIPLEX_NAME = "MultiplexedModelServer"
ENGINE_TASKS = ("causal-lm", "embedding")


# ---- configuration (the Serve YAML's `args`) ----


class EngineOptions(BaseModel):
    """How each replica runs its engine."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(None, ge=1)
    """Causal LMs: most requests decoded together (continuous batching; None: 32); embeddings: most texts per
    forward pass, of texts sorted by length (None: 16, which suits a CPU; raise it on a GPU)."""
    num_threads: int | None = Field(None, ge=1)
    """torch threads per replica (None: Ray's default, 1 per whole CPU of `num_cpus`)."""
    device: str = "cpu"
    """"cuda" on GPU replicas (`num_gpus: 1`)."""
    engine: Literal["auto", "vllm", "lmaas"] = "auto"
    """Causal LMs: "vllm" (vLLM's async engine in the replica), "lmaas" (lmaas's own continuous-batching torch
    engine), or "auto": vLLM where it is installed and can load the version (not lmaas's int8/int4 formats),
    else lmaas's. Embedding models always use lmaas's embedding engine."""
    max_model_len: int | None = Field(None, ge=1)
    """vLLM: context length (None: the model's)."""
    kv_cache_gib: float | None = Field(None, gt=0)
    """vLLM: KV cache size in GiB (None: on CPU, room for max_batch_size full-length sequences, at most 4 GiB;
    on GPUs vLLM's default share of device memory)."""
    enforce_eager: bool | None = None
    """vLLM: skip torch.compile and CUDA graphs (None: on CPU only, where compiling doubled the start, 29 s -> 51 s
    on 2 cores, for 7 % more tokens/s; on GPUs CUDA graphs are worth their start)."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """vLLM: any other `AsyncEngineArgs` field (e.g. `gpu_memory_utilization`, `enable_prefix_caching`)."""

    def causal_lm_engine(self, directory: Path) -> str:
        """Which engine serves the causal LM in `directory`: "vllm" or "lmaas"."""
        from lmaas.serve.engine import vllm

        if self.engine != "auto":
            return self.engine
        if not vllm.available():
            return "lmaas"
        problem = vllm.unsupported(directory, self.device)
        if problem:
            log.info("serving %s with lmaas's engine: %s", directory.name, problem)
            return "lmaas"
        return "vllm"


class ScalingOptions(BaseModel):
    """Replica count, resources and lifecycle of one deployment."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    """0 scales to zero when idle; the first request then waits for a cold start."""
    initial_replicas: int | None = Field(None, ge=0)
    """Replicas at deploy time (None: min_replicas, or 1 when min_replicas is 0 so the app starts warm)."""
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    """Autoscaling target of in-flight requests per replica."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Most in-flight requests per replica; more queue in the caller."""
    upscale_delay_s: float = Field(2.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved per replica (fractions allowed)."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica on GPU clusters."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per replica: pins replicas to nodes started with them (`ray start --resources`)."""
    max_replicas_per_node: int | None = Field(None, ge=1)
    """Most replicas on one node (None: no limit). 1 spreads replicas over nodes, so losing a node
    leaves the others serving; a replica that finds no node to go to waits until one joins."""
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0)
    """A stopping replica takes no new requests and waits this long for in-flight streams to finish."""
    graceful_shutdown_wait_loop_s: float = Field(0.5, gt=0)
    """How often a stopping replica checks whether its in-flight requests have finished. Each
    undeploy, rollout, promotion and scale-down waits at least this long per replica (Serve's
    default is 2 s); a request routed to the replica after its last check is refused and retried
    on another replica by Serve's router."""

    @model_validator(mode="after")
    def _replicas(self) -> "ScalingOptions":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def deployment_options(self, env: dict[str, str]) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options` for these settings."""
        initial = self.initial_replicas if self.initial_replicas is not None else max(self.min_replicas, 1)
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        if self.resources:
            actor["resources"] = dict(self.resources)
        if env:
            actor["runtime_env"] = {"env_vars": dict(env)}
        placement = {"max_replicas_per_node": self.max_replicas_per_node} if self.max_replicas_per_node else {}
        return placement | {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": initial,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": actor,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
        }


class CanaryOptions(ScalingOptions):
    """A canary of a served model: a second deployment taking `weight`% of its traffic, watched by the gateway.

    See `lmaas.serve.canary`. Its own replicas (default 1) serve `ref`; past the limits below it is
    rolled back to 0% (audited with the numbers); healthy for `promote_after_s`, it becomes the stable version.
    """

    ref: str = Field(min_length=1)
    """Registry reference the canary serves (`name:7`, `name@candidate`, ...)."""
    weight: int = Field(10, ge=0, le=100)
    """Percent of the model's requests sent to the canary."""
    sticky: bool = False
    """Keep each caller on one side: by the request's `user` field, else the `X-Lmaas-User` header, else the API key."""
    max_error_rate: float = Field(0.05, ge=0, le=1)
    """Roll back when more than this share of canary requests fail with a server error."""
    max_latency_ratio: float = Field(2.0, gt=0)
    """Roll back when the canary's p99 latency exceeds this multiple of the stable side's."""
    min_requests: int = Field(20, ge=1)
    """Canary requests in the window before any verdict."""
    window_s: float = Field(60.0, gt=0)
    """Sliding window of outcomes the verdict looks at."""
    promote_after_s: float | None = Field(None, gt=0)
    """Promote once the canary has run this long and is healthy (None: never on its own)."""

    @model_validator(mode="after")
    def _ref(self) -> "CanaryOptions":
        from lmaas.registry import parse_ref

        parse_ref(self.ref)
        return self

    def policy(self) -> dict[str, Any]:
        """The settings that name a rollout (`canary.rollout_id`): scaling changes do not restart it."""
        return self.model_dump(include={"ref", "weight", "sticky", "max_error_rate", "max_latency_ratio", "min_requests", "window_s", "promote_after_s"})


class ServedModel(ScalingOptions):
    """One registered model behind the API."""

    ref: str = Field(min_length=1)
    """Registry reference: `name` (its production alias, else latest), `name:3`, or `name@alias`."""
    name: str | None = None
    """The `model` clients send and the deployment's name (default: the reference's model name)."""
    multiplexed: bool = False
    """Host on the shared multiplexed deployment (long-tail small models) instead of a deployment of its own."""
    refresh_interval_s: float = Field(10.0, ge=0)
    """How often a replica re-resolves a moving reference (`name`, `name@alias`); 0 never does."""
    engine: EngineOptions = Field(default_factory=EngineOptions)
    canary: CanaryOptions | None = None
    """Split traffic with a canary version (its own deployment, `model-<name>-canary`); see `lmaas.serve.canary`."""
    swapped: bool = False
    """Set by a canary promotion: the stable version runs on in the deployment its canary ran in,
    replicas and all (no request goes back to the old version while the old one drains); a next
    canary then runs in `model-<name>`. See `deployments`."""

    @property
    def deployments(self) -> tuple[str, str]:
        """The Serve deployment names of (the stable side, its canary)."""
        names = (deployment_name(self.name), canary_deployment_name(self.name))
        return names[::-1] if self.swapped else names

    @model_validator(mode="after")
    def _name(self) -> "ServedModel":
        from lmaas.registry import parse_ref

        parsed = parse_ref(self.ref)
        if self.name is None:
            self.name = parsed.name
        if self.canary is not None and self.multiplexed:
            raise ValueError("canary: a multiplexed model cannot have a canary (give it a deployment of its own)")
        return self


class MultiplexOptions(ScalingOptions):
    """The shared deployment that hosts `multiplexed: true` models."""

    max_num_models_per_replica: int = Field(4, ge=1)
    """Engines kept per replica; loading one more unloads the least recently used."""
    engine: EngineOptions = Field(default_factory=EngineOptions)


class IngressOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per gateway replica: keeps the gateway on the nodes that have them (e.g. the head)."""
    max_ongoing_requests: int = Field(256, ge=1)
    graceful_shutdown_wait_loop_s: float = Field(0.5, gt=0)
    """As a model's (`ScalingOptions.graceful_shutdown_wait_loop_s`): the gateway restarts whenever the app's models change."""
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024)
    """Larger request bodies get 413 (JSON error, code `request_too_large`) on every /v1 and /api/v1 route."""
    max_upload_bytes: int = Field(MAX_UPLOAD_BYTES, ge=1024)
    """The same for model file uploads through `/api/v1` (a version's weights can be large)."""


class ServeAppArgs(BaseModel):
    """The arguments of `build_app`: what `args:` holds in deployments/serve.yaml."""

    model_config = ConfigDict(extra="forbid")

    models: list[ServedModel] = Field(min_length=1)
    multiplex: MultiplexOptions = Field(default_factory=MultiplexOptions)
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    """API keys, tenants and quotas on the gateway (`enabled: false` opens it to every caller)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment of model replicas (LMAAS_STORAGE, LMAAS_DATABASE_URL, ...); empty: the cluster's."""
    tenant_caps: CapsConfig = Field(default_factory=CapsConfig)
    """What a non-admin tenant may deploy through `/api/v1/deployments` (see `serve.records.TenantCaps`)."""

    @model_validator(mode="after")
    def _unique(self) -> "ServeAppArgs":
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"served names must be unique; repeated: {dupes} (set `name` to tell them apart)")
        return self


# ---- replicas ----


@dataclass(eq=False)
class LoadedVersion:
    """An engine serving one registry version, and the requests using it."""

    ref: str
    """`name:version` of what the engine runs."""
    task: str
    engine: Engine
    directory: Path
    in_flight: int = 0
    retired: bool = False
    _closed: bool = field(default=False, repr=False)

    async def retire(self) -> None:
        """Take no new requests; close the engine once the last in-flight one ends."""
        self.retired = True
        if self.in_flight == 0:
            await self._close()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.engine.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    async def release(self) -> None:
        self.in_flight -= 1
        if self.retired and self.in_flight == 0:
            await self._close()


def _load_version(registry: Any, ref: str, cache_root: Path, options: EngineOptions, model_id: str) -> LoadedVersion:
    """Download `ref` (integrity-checked) into a fresh directory under `cache_root` and start its engine."""
    from lmaas.serve.engine import CausalLMEngine, EmbeddingEngine, VLLMEngine

    version = registry.resolve(ref)
    if version.task not in ENGINE_TASKS:
        raise InvalidInputError(f"{version.ref} has task {version.task!r}; lmaas serves {', '.join(ENGINE_TASKS)}", param="model")
    cache_root.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f"{version.name}-{version.version}-", dir=cache_root))
    try:
        registry.download(version.ref, directory)
        batch = {"max_batch_size": options.max_batch_size} if options.max_batch_size is not None else {}  # else the engine's default
        if version.task == "causal-lm" and options.causal_lm_engine(directory) == "vllm":
            engine: Engine = VLLMEngine(
                directory, model_id=model_id, num_threads=options.num_threads, device=options.device, max_batch_size=options.max_batch_size,
                max_model_len=options.max_model_len, kv_cache_gib=options.kv_cache_gib, enforce_eager=options.enforce_eager,
                engine_kwargs=options.engine_kwargs,
            )
        elif version.task == "causal-lm":
            engine = CausalLMEngine(directory, model_id=model_id, num_threads=options.num_threads, device=options.device, **batch)
        else:
            engine = EmbeddingEngine(directory, model_id=model_id, num_threads=options.num_threads, **batch)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return LoadedVersion(version.ref, version.task, engine, directory)


def _registry() -> tuple[Any, Path]:
    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry

    settings = load_settings()
    return ModelRegistry.from_settings(settings), settings.home / "cache" / "serve"


async def _stream(
    loaded: LoadedVersion, events: AsyncIterator[TokenEvent], metrics: ServingMetrics, request_id: str | None
) -> AsyncIterator[TokenEvent]:
    """`events`, recording time to first token, inter-token gaps and token counts, and logging the request when it ends."""
    started = time.perf_counter()
    first = last = None
    final: TokenEvent | None = None
    failed: BaseException | None = None
    try:
        async for event in events:
            now = time.perf_counter()
            if last is None:
                first = now - started
                metrics.first_token(first)
            elif event.token_id is not None:
                metrics.token(now - last)
            last, final = now, event
            yield event
    except BaseException as exc:
        failed = exc
        raise
    finally:
        await events.aclose()
        await loaded.release()
        if final is not None:
            metrics.finished(final.prompt_tokens, final.completion_tokens)
        log.info(
            "generation %s", "finished" if final is not None and final.finish_reason else "failed" if failed else "cancelled",
            extra={
                "request_id": request_id or (final.request_id if final else None), "model": metrics.tags["model"], "version": loaded.ref,
                "prompt_tokens": final.prompt_tokens if final else 0, "completion_tokens": final.completion_tokens if final else 0,
                "finish_reason": final.finish_reason if final else None, "ttft_s": None if first is None else round(first, 4),
                "duration_s": round(time.perf_counter() - started, 4), "error": None if failed is None else type(failed).__name__,
            },
        )


def _check_alive(loaded: LoadedVersion) -> None:
    if not loaded.engine.healthy():
        raise RuntimeError(f"{loaded.ref}: the engine has stopped")


@serve.deployment(name="ModelServer")
class ModelServer:
    """Replicas serving one registry reference; see the module docstring for how aliases roll over.

    Args:
        ref: registry reference (`name`, `name:3`, `name@alias`).
        model_id: the name clients send.
        engine: `EngineOptions` as a dict.
        refresh_interval_s: re-resolve a moving reference this often (0: never).
    """

    async def __init__(self, ref: str, model_id: str, engine: dict, refresh_interval_s: float = 10.0) -> None:
        from lmaas.registry import parse_ref

        configure_logging()
        self.ref, self.model_id = ref, model_id
        self._refresher: asyncio.Task | None = None
        self.options = EngineOptions(**engine)
        self.registry, self.cache_root = _registry()
        self.current = await asyncio.to_thread(_load_version, self.registry, ref, self.cache_root, self.options, model_id)
        self._metrics: dict[str, ServingMetrics] = {}
        log.info("serving %s as %s", self.current.ref, model_id)
        if refresh_interval_s > 0 and parse_ref(ref).version is None:
            self._refresher = asyncio.get_running_loop().create_task(self._follow_ref(refresh_interval_s))
        self._poller = asyncio.get_running_loop().create_task(self._poll_engine())

    def _metrics_of(self, loaded: LoadedVersion) -> ServingMetrics:
        found = self._metrics.get(loaded.ref)
        if found is None:
            found = self._metrics[loaded.ref] = ServingMetrics(self.model_id, loaded.ref)
        return found

    async def _poll_engine(self) -> None:
        """Sample the engine's gauges (waiting, running, KV-cache use) every `ENGINE_POLL_S`."""
        while True:
            try:
                self._metrics_of(self.current).engine(self.current.engine.stats())
            except Exception:  # noqa: BLE001 - a gauge must never stop the replica
                log.exception("could not sample engine stats")
            await asyncio.sleep(ENGINE_POLL_S)

    async def _follow_ref(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                version = await asyncio.to_thread(self.registry.resolve, self.ref)
                if version.ref == self.current.ref:
                    continue
                log.info("%s moved from %s to %s; loading it", self.ref, self.current.ref, version.ref)
                new = await asyncio.to_thread(_load_version, self.registry, version.ref, self.cache_root, self.options, self.model_id)
                old, self.current = self.current, new
                await old.retire()
                log.info("now serving %s as %s", new.ref, self.model_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep serving the loaded version; try again next round
                log.exception("could not follow %s; still serving %s", self.ref, self.current.ref)

    def _acquire(self) -> LoadedVersion:
        loaded = self.current
        loaded.in_flight += 1
        return loaded

    async def generate(self, request: GenerationRequest, http_request_id: str | None = None) -> AsyncIterator[list[TokenEvent]]:
        """Stream token events in lists (call through `handle.options(stream=True)`), one list per engine output (see `ready_batches`); `http_request_id` tags the log line."""
        loaded = self._acquire()
        events = _events(lambda: loaded.engine.generate(request))
        async for batch in ready_batches(_stream(loaded, events, self._metrics_of(loaded), http_request_id)):
            yield batch

    async def generate_chat(
        self, request_id: str, messages: list[dict], params: SamplingParams, http_request_id: str | None = None
    ) -> AsyncIterator[list[TokenEvent]]:
        loaded = self._acquire()
        events = _events(lambda: loaded.engine.generate_chat(request_id, messages, params))
        async for batch in ready_batches(_stream(loaded, events, self._metrics_of(loaded), http_request_id)):
            yield batch

    async def embed(self, texts: list[str], http_request_id: str | None = None) -> tuple[list[list[float]], int]:
        loaded = self._acquire()
        try:
            vectors, tokens = await loaded.engine.embed(texts)
        finally:
            await loaded.release()
        self._metrics_of(loaded).finished(tokens, 0)
        log.info("embedding finished", extra={"request_id": http_request_id, "model": self.model_id, "version": loaded.ref,
                                              "texts": len(texts), "prompt_tokens": tokens})
        return vectors, tokens

    async def tokenize(self, prompt: str | list[dict], options: dict[str, bool]) -> Tokenized:
        return await self.current.engine.tokenize(prompt, **options)

    async def detokenize(self, ids: list[int]) -> str:
        return await self.current.engine.detokenize(ids)

    def info(self) -> dict[str, Any]:
        """What this replica serves: `{"ref", "version", "task", "max_context", "engine"}`."""
        engine = self.current.engine
        return {"ref": self.ref, "version": self.current.ref, "task": self.current.task, "max_context": engine.max_context, "engine": engine.kind}

    def stats(self) -> dict[str, int]:
        """The engine's counters (running, waiting, generated_tokens, ...) and requests in flight here."""
        from dataclasses import asdict

        return asdict(self.current.engine.stats()) | {"in_flight": self.current.in_flight}

    def check_health(self) -> None:
        _check_alive(self.current)

    async def __del__(self) -> None:
        # Serve calls this after in-flight requests finished (or graceful_shutdown_timeout_s passed)
        if self._refresher is not None:
            self._refresher.cancel()
        if getattr(self, "_poller", None) is not None:
            self._poller.cancel()
        if hasattr(self, "current"):  # __init__ may have failed before loading
            await self.current.retire()


async def _events(start) -> AsyncIterator[TokenEvent]:  # noqa: ANN001 - () -> AsyncIterator[TokenEvent]
    """Run `start()` inside the iteration, so a synchronous refusal (an embedding model asked to generate) streams as an error."""
    events = start()  # a synchronous refusal raises here, inside the stream
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()


@serve.deployment(name=MULTIPLEX_NAME)
class MultiplexedModelServer:
    """Many small models per replica, selected per request by `multiplexed_model_id` (a registry reference).

    Args:
        engine: `EngineOptions` as a dict.
        max_num_models_per_replica: the LRU bound.
    """

    def __init__(self, engine: dict, max_num_models_per_replica: int) -> None:
        configure_logging()
        self.options = EngineOptions(**engine)
        self._metrics: dict[str, ServingMetrics] = {}
        self.registry, self.cache_root = _registry()

        async def load_multiplexed_engine(ref: str) -> _Evictable:
            loaded = await asyncio.to_thread(_load_version, self.registry, ref, self.cache_root, self.options, ref)
            return _Evictable(loaded, asyncio.get_running_loop())

        # decorated here, not on the class, so the LRU bound comes from the config
        self.get_model = serve.multiplexed(max_num_models_per_replica=max_num_models_per_replica)(load_multiplexed_engine)
        self._loader = load_multiplexed_engine  # Serve keeps its LRU cache on the decorated function

    async def _acquire(self) -> LoadedVersion:
        loaded = (await self.get_model(serve.get_multiplexed_model_id())).loaded
        loaded.in_flight += 1
        return loaded

    def _metrics_of(self, loaded: LoadedVersion) -> ServingMetrics:
        found = self._metrics.get(loaded.ref)
        if found is None:
            found = self._metrics[loaded.ref] = ServingMetrics(serve.get_multiplexed_model_id(), loaded.ref)
        return found

    async def generate(self, request: GenerationRequest, http_request_id: str | None = None) -> AsyncIterator[list[TokenEvent]]:
        loaded = await self._acquire()
        events = _events(lambda: loaded.engine.generate(request))
        async for batch in ready_batches(_stream(loaded, events, self._metrics_of(loaded), http_request_id)):
            yield batch

    async def generate_chat(
        self, request_id: str, messages: list[dict], params: SamplingParams, http_request_id: str | None = None
    ) -> AsyncIterator[list[TokenEvent]]:
        loaded = await self._acquire()
        events = _events(lambda: loaded.engine.generate_chat(request_id, messages, params))
        async for batch in ready_batches(_stream(loaded, events, self._metrics_of(loaded), http_request_id)):
            yield batch

    async def embed(self, texts: list[str], http_request_id: str | None = None) -> tuple[list[list[float]], int]:
        loaded = await self._acquire()
        try:
            vectors, tokens = await loaded.engine.embed(texts)
        finally:
            await loaded.release()
        self._metrics_of(loaded).finished(tokens, 0)
        return vectors, tokens

    async def tokenize(self, prompt: str | list[dict], options: dict[str, bool]) -> Tokenized:
        return await (await self.get_model(serve.get_multiplexed_model_id())).loaded.engine.tokenize(prompt, **options)

    async def detokenize(self, ids: list[int]) -> str:
        return await (await self.get_model(serve.get_multiplexed_model_id())).loaded.engine.detokenize(ids)

    def check_health(self) -> None:
        wrapper = getattr(self._loader, "__serve_multiplex_wrapper", None)
        for model in (wrapper.models.values() if wrapper is not None else ()):
            _check_alive(model.loaded)

    async def __del__(self) -> None:
        # Serve unloads multiplexed models only when the wrapper sits on the replica object; ours sits on the loader
        wrapper = getattr(self._loader, "__serve_multiplex_wrapper", None)
        if wrapper is not None:
            await wrapper.shutdown()

    async def loaded_models(self) -> list[str]:
        """The versions this replica holds now (most recently used last)."""
        wrapper = getattr(self._loader, "__serve_multiplex_wrapper", None)
        return [m.loaded.ref for m in wrapper.models.values()] if wrapper is not None else []


class _Evictable:
    """What `@serve.multiplexed` caches; Serve calls `__del__` when the LRU bound evicts it."""

    def __init__(self, loaded: LoadedVersion, loop: asyncio.AbstractEventLoop) -> None:
        self.loaded, self._loop = loaded, loop

    def __del__(self) -> None:
        # runs in an executor thread (eviction) or at garbage collection: retire on the replica's loop
        try:
            asyncio.run_coroutine_threadsafe(self.loaded.retire(), self._loop)
        except RuntimeError:
            pass  # the loop is gone: the process is exiting


# ---- ingress ----


class DeploymentEngine(Engine):
    """An `Engine` whose calls go to a model deployment through its handle (optionally multiplexed).

    Surviving a replica that dies (its process killed, its node gone): Serve's router already sends
    a *new* request past a replica it knows is dead, but requests that were on that replica fail
    with Ray's actor-death errors. Here such a call is sent again, up to `retries` times, while
    nothing of it has been passed on: an embedding (idempotent) at any point, a generation before
    its first token event. Serve's router has marked the dead replica by then, so the retry lands on
    another one. A generation that loses its replica after its first event raises `ReplicaLostError`
    (503); `OpenAIServing` restarts a non-streaming one, whose client has seen nothing yet.
    """

    def __init__(self, model_id: str, handle: DeploymentHandle, multiplexed_id: str | None = None, retries: int = 2) -> None:
        self.model_id = model_id
        self.retries = retries
        extra = {"multiplexed_model_id": multiplexed_id} if multiplexed_id is not None else {}
        # made once: each `options()` call is a new handle whose first request waits to learn the replicas
        self._handles = {stream: handle.options(stream=stream, **extra) for stream in (False, True)}

    def _call(self, stream: bool = False) -> DeploymentHandle:
        return self._handles[stream]

    # each call carries the HTTP request's id (`REQUEST_ID`) so the replica's log line for it has the same one

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        async for event in self._retried_stream(lambda handle: handle.generate.remote(request, REQUEST_ID.get())):
            yield event

    async def generate_chat(self, request_id: str, messages: list[dict], params: SamplingParams) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        async for event in self._retried_stream(lambda handle: handle.generate_chat.remote(request_id, messages, params, REQUEST_ID.get())):
            yield event

    async def _retried_stream(self, call: Any) -> AsyncIterator[TokenEvent]:  # noqa: ANN401 - (handle) -> DeploymentResponseGenerator
        for attempt in range(self.retries + 1):
            started = False
            try:
                async for event in _remote_stream(call(self._call(stream=True))):
                    started = True
                    yield event
                return
            except ReplicaLostError as exc:
                if started or attempt == self.retries:
                    raise
                log.warning("%s: %s; sending the request to another replica", self.model_id, exc.message)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return await self._unary("embed", texts, REQUEST_ID.get())

    async def tokenize(
        self, prompt: str | list[dict], *, add_special_tokens: bool = False, add_generation_prompt: bool = True, token_strs: bool = False
    ) -> Tokenized:
        options = {"add_special_tokens": add_special_tokens, "add_generation_prompt": add_generation_prompt, "token_strs": token_strs}
        return await self._unary("tokenize", prompt, options)

    async def detokenize(self, ids: list[int]) -> str:
        return await self._unary("detokenize", ids)

    async def _unary(self, method: str, *args: Any) -> Any:  # noqa: ANN401 - what the replica's method returns
        """One call of a replica method with no side effects, sent again (up to `retries`) when its replica died."""
        attempt = 0
        while True:
            try:
                return await getattr(self._call(), method).remote(*args)
            except Exception as exc:  # noqa: BLE001
                error = _unwrapped(exc)
                if not isinstance(error, ReplicaLostError) or attempt == self.retries:
                    raise error from None
            attempt += 1
            log.warning("%s: %s; sending the request to another replica", self.model_id, error.message)

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0)


async def _remote_stream(responses: Any) -> AsyncIterator[TokenEvent]:
    """The token events of a replica's stream of event lists (see `ready_batches`)."""
    finished = False
    try:
        async for batch in responses:
            for event in batch:
                yield event
            finished = batch[-1].finish_reason is not None
    except Exception as exc:  # noqa: BLE001
        raise _unwrapped(exc) from None
    finally:
        if not finished:
            responses.cancel()  # the client left: the replica's generator closes and the engine frees the slot


def _unwrapped(exc: BaseException) -> BaseException:
    """The project error a replica raised (Ray wraps it in a RayTaskError), `ReplicaLostError` when the replica died, else `exc`."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LmaasError):
        return cause
    if _replica_died(exc) or _replica_died(cause):
        return ReplicaLostError(f"the replica serving this request stopped ({type(exc).__name__}); retry the request")
    return exc


def _replica_died(exc: BaseException | None) -> bool:
    """Ray's and Serve's errors for a replica whose actor, worker process or node is gone."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(exc, (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError))


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
    """

    def __init__(
        self,
        models: dict[str, DeploymentHandle],
        multiplexed: dict[str, str],
        multiplex: DeploymentHandle | None,
        refs: dict[str, str],
        args: dict,
        canaries: dict[str, DeploymentHandle] | None = None,
    ) -> None:
        from lmaas.serve.grpc_api import GrpcServing
        from lmaas.serve.openai_api import OpenAIServing

        configure_logging()
        self._models, self._multiplexed, self._multiplex, self._refs, self._args = models, multiplexed, multiplex, refs, args
        self._engines: dict[str, Engine] = {}
        for name, handle in models.items():
            self._engines[name] = self._engines[refs[name]] = DeploymentEngine(name, handle)
        for name, ref in multiplexed.items():
            self._engines[name] = self._engines[ref] = DeploymentEngine(name, multiplex, multiplexed_id=ref)
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
                on_promote=lambda name=served.name, ref=served.canary.ref: request_promotion(app, name, ref, config.env),
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
        app = build_openai_app(
            self._engines, max_body_bytes=args.ingress.max_body_bytes, max_upload_bytes=args.ingress.max_upload_bytes,
            auth=self._grpc.auth, refs=self._refs,
            metrics=self._metrics, echo_request_id=False, readiness=self._readiness,  # Serve's proxy returns X-Request-Id
        )
        # one port for /v1 and /api/v1: the registry, auth and deployment REST APIs ride on the same app
        control = DeploymentControl(serve.get_replica_context().app_name, args)
        add_management_routes(app, self._grpc.auth.registry if self._grpc.auth else None, auth=self._grpc.auth, deployments=control)
        return app

    def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`: a moment to let old requests leave the recent-traffic gauges."""
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
            key, scaling = (MULTIPLEX_NAME, args.multiplex) if m.multiplexed else (m.deployments[0], m)
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
        return dict(zip(names, infos))

    async def served_versions(self, names: list[str] | None = None) -> dict[str, str]:
        """Served name -> `name:version` a replica of it serves now (multiplexed: its reference)."""
        return {name: info["version"] for name, info in (await self.served_info(names)).items()} | dict(self._multiplexed)


def _running_replicas(state: Any) -> int:
    """RUNNING replicas of a Serve `DeploymentStatusOverview` (0 for None)."""
    return sum(n for s, n in state.replica_states.items() if str(getattr(s, "value", s)) == "RUNNING") if state else 0


def _status(state: Any) -> str:
    return str(getattr(state.status, "value", state.status))


def deployment_name(served_name: str) -> str:
    """The Serve deployment name of a served model (Serve names allow no `:`, `@` or `/`)."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "-", served_name)


def canary_deployment_name(served_name: str) -> str:
    """The Serve deployment name of a served model's canary."""
    return deployment_name(served_name) + "-canary"


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


def build_app(args: dict | ServeAppArgs, *, restart: Collection[str] = ()) -> serve.Application:
    """The Serve application for `args` (`ServeAppArgs`): `serve run module:build_app` calls this.

    Deployments keep their replicas across `serve.run`s that leave their arguments alone (see
    `_version`). The ingress restarts on any change of the app's models (it holds their handles).

    Args:
        restart: served names whose replicas start afresh even if nothing of theirs changed
            (`deploy_models` asks for it when a reference is resolved only at start).

    Raises:
        pydantic.ValidationError: bad arguments (the message names the field).
    """
    config = args if isinstance(args, ServeAppArgs) else ServeAppArgs.model_validate(args)
    models: dict[str, Any] = {}
    canaries: dict[str, Any] = {}
    multiplexed: dict[str, str] = {}
    fresh = {name: time.time_ns() for name in restart}
    for served in config.models:
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
    return OpenAIIngress.options(
        num_replicas=ingress.num_replicas, max_ongoing_requests=ingress.max_ongoing_requests, ray_actor_options=actor,
        graceful_shutdown_wait_loop_s=ingress.graceful_shutdown_wait_loop_s,
        **_version(app_config, sorted(fresh.items())),
    ).bind(models, multiplexed, multiplex, refs, app_config, canaries)


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
    handle = run_app(build_app(ServeAppArgs.model_validate(config.model_dump()), restart=restart), app_name)
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

    live = [m.name for m in args.models if not m.multiplexed and running(m.deployments[0])]
    try:
        serving = serve.get_app_handle(app_name).served_info.remote(live).result(timeout_s=10)
    except Exception:  # noqa: BLE001 - a replica starting or stopping: list it without a version
        serving = {}
    from lmaas.serve.canary import CanaryStore, rollout_id

    splits = CanaryStore.from_settings().list(app_name) if any(m.canary for m in args.models) else {}
    out = []
    for m in args.models:
        key = MULTIPLEX_NAME if m.multiplexed else m.deployments[0]
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
