"""Model replicas (`ModelServer`, `MultiplexedModelServer`) and their client in the gateway (`DeploymentEngine`).

- `ModelServer`: one deployment per served model, autoscaled; each replica resolves the reference
  in the registry, downloads that version (sha256-checked) and runs its engine.
- `MultiplexedModelServer`: one shared deployment for long-tail models (`multiplexed: true`);
  each replica keeps at most `max_num_models_per_replica` engines, least recently used leaves first.
- `DeploymentEngine`: the gateway's side of a replica, an `Engine` that forwards each call to a
  deployment handle (token events stream back through `handle.options(stream=True)`).

A replica is the only place that knows which engine runs: it asks `EngineOptions` which one to
start (`_load_version`); the gateway, canaries and routers see only the `Engine` interface.

LoRA adapters (`EngineOptions.max_adapters` > 0): a `ModelServer`'s engine also answers requests that carry an
`AdapterRequest`; each loaded version keeps its own `adapters.AdapterCache` (an adapter fits one base version),
which loads an adapter on its first request and unloads the least recently used one when it needs room.

Alias rollout without failed requests: a `ModelServer` serving a moving reference (`name` or
`name@alias`) re-resolves it every `refresh_interval_s`. When it names a new version, the replica
downloads and loads the new engine in a thread *while the old one keeps serving*, then swaps the
pointer: requests that start afterwards use the new engine; streams already running finish on the
old one, which is closed when its last request ends. No replica restarts, so no request is refused.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from lmaas.errors import InvalidInputError, LmaasError, ReplicaLostError
from lmaas.ops.logs import REQUEST_ID, configure_logging
from lmaas.ops.metrics import ENGINE_POLL_S, ServingMetrics
from lmaas.serve.adapters import AdapterCache
from lmaas.serve.engine import AdapterRequest, Engine, EngineStats, GenerationRequest, SamplingParams, TokenEvent, Tokenized
from lmaas.serve.options import ENGINE_TASKS, EngineOptions
from lmaas.serve.streams import ready_batches

log = logging.getLogger("lmaas.serve")

MULTIPLEX_NAME = "MultiplexedModelServer"


# ---- replicas ----


@dataclass(eq=False)
class LoadedVersion:
    """An engine serving one registry version, and the requests using it."""

    ref: str
    """`name:version` of what the engine runs."""
    task: str
    engine: Engine
    directory: Path
    adapters: AdapterCache | None = None
    """The LoRA adapters loaded on this engine (None: the deployment takes none)."""
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
        if self.adapters is not None:
            self.adapters.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    async def release(self) -> None:
        self.in_flight -= 1
        if self.retired and self.in_flight == 0:
            await self._close()


def _load_version(registry: Any, ref: str, cache_root: Path, options: EngineOptions, model_id: str) -> LoadedVersion:
    """Download `ref` (integrity-checked) into a fresh directory under `cache_root` and start its engine."""
    version = registry.resolve(ref)
    if version.task not in ENGINE_TASKS:
        raise InvalidInputError(f"{version.ref} has task {version.task!r}; lmaas serves {', '.join(ENGINE_TASKS)}", param="model")
    if version.task != "causal-lm" and options.max_adapters:
        raise InvalidInputError(f"{version.ref} has task {version.task!r}; adapters (engine.max_adapters) need a causal-lm base",
                                param="max_adapters")
    cache_root.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f"{version.name}-{version.version}-", dir=cache_root))
    try:
        registry.download(version.ref, directory)
        engine: Engine = options.build(version.task, directory, model_id)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    adapters = None
    if options.max_adapters:
        adapters = AdapterCache(engine, registry, cache_root / "adapters", version.ref, options.max_adapter_rank)
    return LoadedVersion(version.ref, version.task, engine, directory, adapters)


def _registry() -> tuple[Any, Path]:
    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry

    settings = load_settings()
    return ModelRegistry.from_settings(settings), settings.home / "cache" / "serve"


async def _stream(
    loaded: LoadedVersion, events: AsyncIterator[TokenEvent], metrics: ServingMetrics, request_id: str | None, adapter: str | None = None
) -> AsyncIterator[TokenEvent]:
    """`events`, recording time to first token, inter-token gaps and token counts, and logging the request when it ends.

    `adapter`: the adapter version generating them (`name:version`), which then names the version that answered."""
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
                event = replace(event, version=adapter or loaded.ref)  # which version answered (see `TokenEvent.version`)
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
                "adapter": adapter,
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

    def _metrics_of(self, loaded: LoadedVersion, adapter: AdapterRequest | None = None) -> ServingMetrics:
        """The metrics of requests on `loaded` (with `adapter`: tagged with the adapter's name and version, as usage is)."""
        key = adapter.ref if adapter is not None else loaded.ref
        found = self._metrics.get(key)
        if found is None:
            model = adapter.ref.rsplit(":", 1)[0] if adapter is not None else self.model_id
            found = self._metrics[key] = ServingMetrics(model, key)
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
        """Stream token events in lists (call through `handle.options(stream=True)`), one list per engine output (see `ready_batches`); `http_request_id` tags the log line.

        A request with an `adapter` runs with that adapter's weights (loaded on first use, see `adapters.AdapterCache`)."""
        loaded = self._acquire()
        async for batch in _served(loaded, lambda: loaded.engine.generate(request), self._metrics_of(loaded, request.adapter), http_request_id,
                                   request.adapter):
            yield batch

    async def generate_chat(
        self, request_id: str, messages: list[dict], params: SamplingParams, http_request_id: str | None = None, tools: list[dict] | None = None,
        adapter: AdapterRequest | None = None,
    ) -> AsyncIterator[list[TokenEvent]]:
        loaded = self._acquire()
        async for batch in _served(loaded, lambda: loaded.engine.generate_chat(request_id, messages, params, tools=tools, adapter=adapter),
                                   self._metrics_of(loaded, adapter), http_request_id, adapter):
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

    async def tokenize(self, prompt: str | list[dict], options: dict[str, Any]) -> Tokenized:
        return await self.current.engine.tokenize(prompt, **options)

    async def detokenize(self, ids: list[int]) -> str:
        return await self.current.engine.detokenize(ids)

    def info(self) -> dict[str, Any]:
        """What this replica serves: `{"ref", "version", "task", "max_context", "engine", "adapters"}` (`adapters`: the adapter
        versions loaded now, least recently used first)."""
        engine, adapters = self.current.engine, self.current.adapters
        return {"ref": self.ref, "version": self.current.ref, "task": self.current.task, "max_context": engine.max_context, "engine": engine.kind,
                "adapters": adapters.loaded() if adapters is not None else []}

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


def _served(
    loaded: LoadedVersion, start, metrics: ServingMetrics, request_id: str | None, adapter: AdapterRequest | None = None,  # noqa: ANN001
) -> AsyncIterator[list[TokenEvent]]:
    """What a replica streams for one generation: `start()`'s events (with `adapter` loaded), measured and logged (`_stream`),
    in lists of what is ready at once (`ready_batches`)."""
    return ready_batches(_stream(loaded, _events(start, loaded, adapter), metrics, request_id, adapter.ref if adapter is not None else None))


async def _events(start, loaded: LoadedVersion | None = None, adapter: AdapterRequest | None = None) -> AsyncIterator[TokenEvent]:  # noqa: ANN001
    """Run `start()` (() -> AsyncIterator[TokenEvent]) inside the iteration, so a synchronous refusal (an embedding model asked to
    generate) streams as an error; with `adapter`, that adapter is held loaded in `loaded`'s engine until the stream ends."""
    if adapter is not None:
        if loaded is None or loaded.adapters is None:
            raise InvalidInputError(f"{loaded.ref if loaded else 'this model'} is not served with adapters (engine.max_adapters is 0)",
                                    param="model")
        await loaded.adapters.acquire(adapter)  # the first request of an adapter downloads and loads it
    try:
        events = start()  # a synchronous refusal raises here, inside the stream
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()
    finally:
        if adapter is not None:
            await loaded.adapters.release(adapter.ref)


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
        async for batch in _served(loaded, lambda: loaded.engine.generate(request), self._metrics_of(loaded), http_request_id):
            yield batch

    async def generate_chat(
        self, request_id: str, messages: list[dict], params: SamplingParams, http_request_id: str | None = None, tools: list[dict] | None = None
    ) -> AsyncIterator[list[TokenEvent]]:
        loaded = await self._acquire()
        async for batch in _served(loaded, lambda: loaded.engine.generate_chat(request_id, messages, params, tools=tools), self._metrics_of(loaded),
                                   http_request_id):
            yield batch

    async def embed(self, texts: list[str], http_request_id: str | None = None) -> tuple[list[list[float]], int]:
        loaded = await self._acquire()
        try:
            vectors, tokens = await loaded.engine.embed(texts)
        finally:
            await loaded.release()
        self._metrics_of(loaded).finished(tokens, 0)
        return vectors, tokens

    async def tokenize(self, prompt: str | list[dict], options: dict[str, Any]) -> Tokenized:
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


# ---- a model colocated with the gateway ----


class LocalEngine(Engine):
    """The `Engine` of a model colocated with the gateway (`ServedModel.colocated`): a `ModelServer` in the
    gateway's own process, called directly. Token events go from the engine to the HTTP response without
    crossing a process (no handle call, no pickling, no `ready_batches` hop); the replica's metrics, log
    lines and alias rollover are the same code as in a model deployment.
    """

    def __init__(self, server: Any) -> None:  # noqa: ANN401 - a ModelServer instance
        self.server = server
        self.model_id = server.model_id
        self._closed = False

    @classmethod
    async def start(cls, ref: str, model_id: str, engine: dict, refresh_interval_s: float) -> "LocalEngine":
        """Load `ref` (as a `ModelServer` replica does) in this process."""
        server_cls = ModelServer.func_or_class
        server = server_cls.__new__(server_cls)
        await server.__init__(ref, model_id, engine, refresh_interval_s)
        return cls(server)

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.server.current.engine.kind

    @property
    def max_context(self) -> int | None:  # type: ignore[override]
        return self.server.current.engine.max_context

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        return self._generation(lambda engine: engine.generate(request), request.adapter)

    def generate_chat(  # type: ignore[override]
        self, request_id: str, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
        adapter: AdapterRequest | None = None,
    ) -> AsyncIterator[TokenEvent]:
        return self._generation(lambda engine: engine.generate_chat(request_id, messages, params, tools=tools, adapter=adapter), adapter)

    async def _generation(self, start, adapter: AdapterRequest | None = None) -> AsyncIterator[TokenEvent]:  # noqa: ANN001 - (Engine) -> AsyncIterator[TokenEvent]
        """`start(engine)`'s events on the version serving now (with `adapter` loaded), measured and logged as a replica does (`_stream`)."""
        loaded = self.server._acquire()
        events = _events(lambda: start(loaded.engine), loaded, adapter)
        async for event in _stream(loaded, events, self.server._metrics_of(loaded, adapter), REQUEST_ID.get(), adapter.ref if adapter else None):
            yield event

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return await self.server.embed(texts, REQUEST_ID.get())

    async def tokenize(self, prompt: str | list[dict], **options: Any) -> Tokenized:  # noqa: ANN401 - `Engine.tokenize`'s keywords
        return await self.server.current.engine.tokenize(prompt, **options)

    async def detokenize(self, ids: list[int]) -> str:
        return await self.server.detokenize(ids)

    def stats(self) -> EngineStats:
        return self.server.current.engine.stats()

    def healthy(self) -> bool:
        return self.server.current.engine.healthy()

    def info(self) -> dict[str, Any]:
        return self.server.info()

    def check_health(self) -> None:
        self.server.check_health()

    async def close(self) -> None:
        if not self._closed:  # the gateway lists an engine under its name and its reference: closed once
            self._closed = True
            await self.server.__del__()


# ---- the gateway's side: a replica's client ----


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

    async def generate_chat(  # type: ignore[override]
        self, request_id: str, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
        adapter: AdapterRequest | None = None,
    ) -> AsyncIterator[TokenEvent]:
        extra: dict[str, Any] = {"tools": tools} if tools else {}  # replicas of an older lmaas take no `tools` (nor `adapter`)
        if adapter is not None:
            extra["adapter"] = adapter
        async for event in self._retried_stream(lambda handle: handle.generate_chat.remote(request_id, messages, params, REQUEST_ID.get(), **extra)):
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
        self, prompt: str | list[dict], *, add_special_tokens: bool = False, add_generation_prompt: bool = True, token_strs: bool = False,
        tools: list[dict] | None = None,
    ) -> Tokenized:
        options: dict[str, Any] = {"add_special_tokens": add_special_tokens, "add_generation_prompt": add_generation_prompt, "token_strs": token_strs}
        if tools:
            options["tools"] = tools
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
