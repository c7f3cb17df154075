"""The Serve YAML's `args` (`ServeAppArgs`): how each deployment is placed, scaled and runs its engine.

    args = ServeAppArgs.model_validate(yaml.safe_load(open("deployments/serve.yaml"))["applications"][0]["args"])

Plain pydantic models, validated on construction (a bad field raises `pydantic.ValidationError` naming it):
`EngineOptions` (which engine a replica runs and how), `ScalingOptions` (replicas, resources,
lifecycle), `ServedModel` (one registered model and its deployment, optionally with a
`CanaryOptions` canary), `MultiplexOptions` (the shared deployment of long-tail models),
`IngressOptions` (the gateway) and `ServeAppArgs`, all of them together. `app.build_app` turns
them into deployments; `deployments` (the `lmaas deploy` control plane) reads them back from a running app.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmaas.auth import AuthConfig
from lmaas.serve.openai_app import MAX_BODY_BYTES, MAX_UPLOAD_BYTES
from lmaas.serve.records import CapsConfig

log = logging.getLogger("lmaas.serve")


# ---- configuration (the Serve YAML's `args`) ----


ENGINE_TASKS = ("causal-lm", "embedding")
"""Registry tasks an engine runs (`EngineOptions.build`)."""


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
    else lmaas's. Embedding models: "vllm" (vLLM's pooling runner, for the architectures it loads: BERT), else
    ("auto", "lmaas") lmaas's embedding engine, which starts in seconds instead of ~30 s (see the README's numbers)."""
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
    max_adapters: int = Field(0, ge=0)
    """Causal LMs: LoRA adapters each replica holds at once (0: none). Above 0 the deployment also answers every
    registry version of task `adapter` whose parent is the version it serves, by the adapter's name (`model:
    "support-bot"`): an adapter is downloaded and loaded on its first request, and the least recently used one that
    no request is using leaves when a new one needs room. vLLM applies them with its LoRA support (`max_loras`),
    lmaas's engine with PEFT; either mixes requests of several adapters and of the base in one batch."""
    max_adapter_rank: int = Field(16, ge=1)
    """The largest adapter rank (`r` in adapter_config.json) the deployment takes; vLLM reserves memory for it (`max_lora_rank`,
    rounded up to one of 1, 8, 16, 32, 64, ...). A request for an adapter of a higher rank gets a 400 naming `model`."""

    def causal_lm_engine(self, directory: Path) -> str:
        """Which engine serves the causal LM in `directory`: "vllm" or "lmaas"."""
        from lmaas.serve.engine import vllm

        if self.engine != "auto":
            return self.engine
        if not vllm.available():
            return "lmaas"
        problem = vllm.unsupported(directory, self.device, adapters=self.max_adapters > 0)
        if problem:
            log.info("serving %s with lmaas's engine: %s", directory.name, problem)
            return "lmaas"
        return "vllm"

    def embedding_engine(self) -> str:
        """Which engine serves an embedding model: "vllm" only when asked for (`engine: vllm`), else "lmaas"."""
        return "vllm" if self.engine == "vllm" else "lmaas"

    def build(self, task: str, directory: Path, model_id: str, *, num_threads: int | None = None) -> Any:  # noqa: ANN401 - an Engine
        """The engine that runs the version downloaded to `directory` (a model replica's, a batch actor's).

        Args:
            task: the version's registry task (one of `ENGINE_TASKS`).
            num_threads: torch threads when `num_threads` is not set here.

        Raises:
            InvalidInputError: a task no engine runs.
            ConfigError: `engine: vllm` without vLLM, or for a version vLLM cannot load.
        """
        from lmaas.errors import InvalidInputError
        from lmaas.serve.engine import CausalLMEngine, EmbeddingEngine, VLLMEmbeddingEngine, VLLMEngine

        if task not in ENGINE_TASKS:
            raise InvalidInputError(f"a {task} model answers no requests; lmaas runs {', '.join(ENGINE_TASKS)} models", param="model")
        threads = self.num_threads or num_threads
        batch = {"max_batch_size": self.max_batch_size} if self.max_batch_size is not None else {}  # else the engine's default
        if task == "causal-lm" and self.causal_lm_engine(directory) == "vllm":
            return VLLMEngine(directory, model_id=model_id, num_threads=threads, device=self.device, max_batch_size=self.max_batch_size,
                              max_model_len=self.max_model_len, kv_cache_gib=self.kv_cache_gib, enforce_eager=self.enforce_eager,
                              engine_kwargs=self.engine_kwargs, max_adapters=self.max_adapters, max_adapter_rank=self.max_adapter_rank)
        if task == "causal-lm":
            return CausalLMEngine(directory, model_id=model_id, num_threads=threads, device=self.device, max_adapters=self.max_adapters, **batch)
        if self.embedding_engine() == "vllm":
            return VLLMEmbeddingEngine(directory, model_id=model_id, num_threads=threads, device=self.device,
                                       max_batch_size=self.max_batch_size, enforce_eager=self.enforce_eager, engine_kwargs=self.engine_kwargs)
        return EmbeddingEngine(directory, model_id=model_id, num_threads=threads, **batch)


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
    colocated: bool = False
    """Run the engine inside the gateway's own replicas instead of in a deployment of its own. A token then
    crosses no process between the engine and the HTTP response (no handle call, no pickling): with vLLM,
    about what `vllm serve` alone gives (bench/serve_vllm.py), against ~0.6x through a model deployment on a
    CPU machine. The gateway takes this model's resources (`num_cpus`, `num_gpus`, `resources`) and scaling
    (`min_replicas` >= 1 .. `max_replicas`), and every change to the app restarts it, engine included; versions
    still roll out by alias without failed requests (`refresh_interval_s`). At most one colocated model per app,
    not multiplexed and without a canary (a canary needs the stable version in a deployment of its own)."""
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
        if self.multiplexed and self.engine.max_adapters:
            raise ValueError("engine.max_adapters: a multiplexed model serves no adapters (give it a deployment of its own)")
        if self.colocated:
            if self.multiplexed:
                raise ValueError("colocated: a multiplexed model runs on the shared deployment, not in the gateway")
            if self.canary is not None:
                raise ValueError("colocated: a colocated model cannot have a canary (roll its versions out by alias, or colocate it after the canary)")
            if self.min_replicas < 1:
                raise ValueError("colocated: min_replicas must be >= 1 (the gateway itself serves it and never scales to zero)")
        return self

    @property
    def serving_deployment(self) -> str:
        """The Serve deployment whose replicas run this model's engine: its own, or the gateway when colocated
        (multiplexed models: `MULTIPLEX_NAME`, see `replica`)."""
        return INGRESS_NAME if self.colocated else self.deployments[0]


class MultiplexOptions(ScalingOptions):
    """The shared deployment that hosts `multiplexed: true` models."""

    max_num_models_per_replica: int = Field(4, ge=1)
    """Engines kept per replica; loading one more unloads the least recently used."""
    engine: EngineOptions = Field(default_factory=EngineOptions)

    @model_validator(mode="after")
    def _no_adapters(self) -> "MultiplexOptions":
        if self.engine.max_adapters:
            raise ValueError("engine.max_adapters: multiplexed models serve no adapters; give the base model a deployment of its own")
        return self


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
        colocated = [m.name for m in self.models if m.colocated]
        if len(colocated) > 1:
            raise ValueError(f"colocated: at most one model per app runs in the gateway; {colocated} ask for it")
        return self


INGRESS_NAME = "OpenAIIngress"
"""The gateway's Serve deployment (`ingress.OpenAIIngress`)."""


def deployment_name(served_name: str) -> str:
    """The Serve deployment name of a served model (Serve names allow no `:`, `@` or `/`)."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "-", served_name)


def canary_deployment_name(served_name: str) -> str:
    """The Serve deployment name of a served model's canary."""
    return deployment_name(served_name) + "-canary"
