"""LoRA adapters served by name on their base model's deployment.

    {"ref": "base", "engine": {"max_adapters": 4}}        # serve.yaml: base's replicas also serve its adapters
    client.completions.create(model="support-bot", ...)    # a registry version of task `adapter` whose parent is base's version

Three pieces, one per layer a request passes:

- `AdapterRoutes` (the gateway): a `model` that no deployment serves by name is resolved in the registry *as the
  caller's tenant*; a version of task `adapter` goes to the deployment serving its parent version with adapters
  enabled (`EngineOptions.max_adapters`), as an `AdapterEngine` view of that deployment's engine. Another tenant's
  private adapter resolves to nothing, so the caller gets the same 404 as for a model that does not exist.
- `AdapterEngine`: that view; every generation it starts carries the `AdapterRequest` (adapter and base versions, tenant).
- `AdapterCache` (each replica's engine): loads an adapter on its first request (downloaded from the registry as
  the request's tenant, every file's sha256 checked, its parent checked against the version the engine runs), keeps
  at most `max_adapters` loaded, and unloads the least recently used one that no request is using when it needs room.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmaas.errors import InvalidInputError, NotFoundError
from lmaas.serve.engine import AdapterRequest, Engine, EngineStats, GenerationRequest, SamplingParams, TokenEvent, Tokenized

log = logging.getLogger("lmaas.serve")

ADAPTER_TASK = "adapter"
ROUTES_TTL_S = 2.0
"""How long the gateway trusts a resolved adapter route (as `AuthConfig.cache_ttl_s` trusts a model's owner)."""


# ---- the gateway ----


class AdapterEngine(Engine):
    """The engine of a served base model, answering with one adapter's weights (`AdapterRequest` on every generation)."""

    def __init__(self, model_id: str, base: Engine, adapter: AdapterRequest) -> None:
        self.model_id, self.base, self.adapter = model_id, base, adapter

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.base.kind

    @property
    def max_context(self) -> int | None:  # type: ignore[override]
        return self.base.max_context

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        return self.base.generate(replace(request, adapter=self.adapter))

    def generate_chat(  # type: ignore[override]
        self, request_id: str, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
        adapter: AdapterRequest | None = None,
    ) -> AsyncIterator[TokenEvent]:
        return self.base.generate_chat(request_id, messages, params, tools=tools, adapter=self.adapter)

    async def tokenize(self, prompt: str | list[dict], **options: Any) -> Tokenized:  # noqa: ANN401 - `Engine.tokenize`'s keywords
        return await self.base.tokenize(prompt, **options)

    async def detokenize(self, ids: list[int]) -> str:
        return await self.base.detokenize(ids)

    def stats(self) -> EngineStats:
        return self.base.stats()

    async def close(self) -> None:
        """Nothing: the base's engine belongs to its deployment."""


@dataclass(frozen=True)
class AdapterBase:
    """A served model whose deployment takes adapters."""

    name: str
    """Its served name."""
    ref: str
    """Its configured registry reference (resolved to the version it serves now)."""
    engine: Engine


class AdapterRoutes:
    """Which deployment answers a request whose `model` names an adapter version, for the tenant asking.

    An adapter goes to the first of `bases` (the app's order) whose reference names its parent version now.

    Args:
        registry: () -> the model registry (`ModelRegistry`), built on first use.
        bases: the served models whose deployments take adapters (`EngineOptions.max_adapters` > 0).
        ttl_s: how long a resolved route (or its refusal) is reused for the same tenant and `model`.
    """

    def __init__(self, registry: Callable[[], Any], bases: list[AdapterBase], ttl_s: float = ROUTES_TTL_S) -> None:
        self._registry_factory, self.bases, self.ttl_s = registry, list(bases), ttl_s
        self._registry: Any = None
        self._cache: dict[tuple[str | None, str], tuple[float, Any]] = {}
        self._lock = threading.Lock()

    @property
    def registry(self) -> Any:  # noqa: ANN401 - a ModelRegistry
        if self._registry is None:
            self._registry = self._registry_factory()
        return self._registry

    async def resolve_async(self, model: str, tenant: str | None) -> AdapterEngine | None:
        """`resolve` for an event loop: a cached answer without a thread hop."""
        if not self.bases:
            return None
        hit = self._peek((tenant, model))
        if hit is None:
            return await asyncio.to_thread(self.resolve, model, tenant)
        if isinstance(hit[1], Exception):
            raise hit[1]
        return hit[1]

    def resolve(self, model: str, tenant: str | None) -> AdapterEngine | None:
        """The engine answering `model` as an adapter for `tenant` (None: an admin, who sees every tenant's models).

        Returns:
            None when `model` names no version `tenant` may see (another tenant's private adapter included), or one
            that is not an adapter: the caller answers as for any model that is not served.

        Raises:
            NotFoundError (param `model`): an adapter whose base version no deployment here serves with adapters enabled.
        """
        key = (tenant, model)
        hit = self._peek(key)
        if hit is not None:
            if isinstance(hit[1], Exception):
                raise hit[1]
            return hit[1]
        try:
            result: Any = self._route(model, tenant)
        except NotFoundError as exc:
            result = exc
        with self._lock:
            if len(self._cache) >= 10_000:
                self._cache.clear()
            self._cache[key] = (time.monotonic() + self.ttl_s, result)
        if isinstance(result, Exception):
            raise result
        return result

    def _peek(self, key: tuple[str | None, str]) -> tuple[float, Any] | None:
        hit = self._cache.get(key)
        return hit if hit is not None and hit[0] > time.monotonic() else None

    def _route(self, model: str, tenant: str | None) -> AdapterEngine | None:
        version = self._adapter_version(model, tenant)
        if version is None:
            return None
        for base in self.bases:
            if self._served_version(base) == version.parent:
                return AdapterEngine(model, base.engine, AdapterRequest(version.ref, version.parent, tenant))
        with_adapters = ", ".join(f"{b.name} ({self._served_version(b) or b.ref})" for b in self.bases)
        raise NotFoundError(
            f"model {model!r} is adapter {version.ref} of {version.parent}, which no deployment here serves with adapters enabled "
            f"(deployments taking adapters: {with_adapters}); deploy {version.parent} with engine.max_adapters > 0",
            param="model",
        )

    def _adapter_version(self, model: str, tenant: str | None) -> Any:  # noqa: ANN401 - a ModelVersion or None
        """The adapter version `model` names for `tenant`, or None (not one it may see, or not an adapter)."""
        from lmaas.registry import parse_ref

        try:
            parse_ref(model)
            version = self.registry.resolve(model, tenant=tenant)
        except (NotFoundError, InvalidInputError):
            return None
        if version.task != ADAPTER_TASK or not version.parent:
            return None
        try:  # the adapter's weights are the base's too: a caller who may not see the base gets nothing of it
            self.registry.get_model(parse_ref(version.parent).name, tenant=tenant)
        except NotFoundError:
            return None
        return version

    def _served_version(self, base: AdapterBase) -> str | None:
        """`name:version` the base's reference names now (None when the registry does not know it)."""
        key = (None, "\0base\0" + base.ref)
        hit = self._peek(key)
        if hit is not None:
            return hit[1]
        try:
            version = self.registry.resolve(base.ref).ref
        except (NotFoundError, InvalidInputError):
            version = None
        with self._lock:
            self._cache[key] = (time.monotonic() + self.ttl_s, version)
        return version

    def listed(self, tenant: str | None) -> list[tuple[str, str]]:
        """(adapter model name, served base name) of every adapter `tenant` may call here by its bare name."""
        key = (tenant, "\0listed\0")
        hit = self._peek(key)
        if hit is not None:
            return hit[1]
        names: set[str] = set()
        for base in self.bases:
            served = self._served_version(base)
            if served is None:
                continue
            try:
                children = self.registry.lineage(served, tenant=tenant).children
            except NotFoundError:
                continue
            names |= {c.name for c in children if c.task == ADAPTER_TASK}
        out = []
        for name in sorted(names):
            try:
                engine = self.resolve(name, tenant)
            except NotFoundError:
                continue
            if engine is not None:
                out.append((name, next(b.name for b in self.bases if b.engine is engine.base)))
        with self._lock:
            self._cache[key] = (time.monotonic() + self.ttl_s, out)
        return out


# ---- the replica ----


@dataclass(eq=False)
class _Loaded:
    """One adapter of an `AdapterCache`."""

    ref: str
    ready: asyncio.Future
    """Done once the engine has it (its exception: it could not be loaded)."""
    users: int = 0
    """Requests holding it (from `acquire` to `release`)."""
    evicting: bool = False
    directory: Path | None = field(default=None, repr=False)


class AdapterCache:
    """The adapters one engine holds: loaded on first use, at most `engine.max_adapters`, least recently used out first.

    An adapter leaves only when no request holds it; a request for a new adapter while every loaded one is in use
    waits until one is released (the engine cannot hold more).

    Args:
        engine: the engine serving `base_ref` (`Engine.load_adapter` / `unload_adapter`).
        registry: where adapters are downloaded from (`registry.download` checks every file's sha256).
        root: a directory of this replica for the downloaded adapters.
        base_ref: `name:version` the engine runs: only adapters of this version are loaded.
        max_rank: the largest adapter rank taken (`EngineOptions.max_adapter_rank`).
    """

    def __init__(self, engine: Engine, registry: Any, root: Path, base_ref: str, max_rank: int) -> None:  # noqa: ANN401
        self.engine, self.registry, self.root, self.base_ref, self.max_rank = engine, registry, Path(root), base_ref, max_rank
        self.capacity = engine.max_adapters
        self._entries: OrderedDict[str, _Loaded] = OrderedDict()
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task] = set()
        """Loads and unloads under way (held here: the event loop keeps only weak references to tasks)."""

    def loaded(self) -> list[str]:
        """The adapters held now, least recently used first."""
        return [ref for ref, e in self._entries.items() if e.ready.done() and e.ready.exception() is None and not e.evicting]

    async def acquire(self, adapter: AdapterRequest) -> None:
        """Hold `adapter` loaded for one request (loading it first if needed); `release` it when the request ends.

        Raises:
            InvalidInputError (param `model`): an adapter of another base version than the one this engine runs, one of a
                rank above `max_rank`, or one the engine cannot load.
            NotFoundError: the adapter version is gone (or `adapter.tenant` may not see it).
        """
        if adapter.base != self.base_ref:
            raise InvalidInputError(f"adapter {adapter.ref} adapts {adapter.base}; this deployment serves {self.base_ref} now", param="model")
        async with self._changed:
            while True:
                entry = self._entries.get(adapter.ref)
                if entry is not None and not entry.evicting:
                    entry.users += 1
                    self._entries.move_to_end(adapter.ref)
                    break
                if entry is None and len(self._entries) < self.capacity:
                    entry = self._entries[adapter.ref] = _Loaded(adapter.ref, asyncio.get_running_loop().create_future(), users=1)
                    self._spawn(self._load(adapter, entry))
                    break
                victim = next((e for e in self._entries.values() if e.users == 0 and not e.evicting and e.ready.done()), None)
                if entry is None and victim is not None:
                    victim.evicting = True
                    self._spawn(self._evict(victim))
                await self._changed.wait()
        try:
            await asyncio.shield(entry.ready)  # a client that leaves must not cancel a load others wait for
        except BaseException:
            await self.release(adapter.ref)
            raise

    def _spawn(self, work: Any) -> None:  # noqa: ANN401 - a coroutine
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def release(self, ref: str) -> None:
        """One request no longer holds `ref`."""
        async with self._changed:
            entry = self._entries.get(ref)
            if entry is not None:
                entry.users -= 1
                if entry.users == 0:
                    self._changed.notify_all()

    async def _load(self, adapter: AdapterRequest, entry: _Loaded) -> None:
        try:
            entry.directory = await asyncio.to_thread(self._download, adapter)
            await self.engine.load_adapter(adapter.ref, entry.directory)
        except BaseException as exc:  # noqa: BLE001 - handed to every request waiting for it
            async with self._changed:
                self._entries.pop(adapter.ref, None)
                self._changed.notify_all()
            if entry.directory is not None:
                shutil.rmtree(entry.directory, ignore_errors=True)
            entry.ready.set_exception(exc)
            entry.ready.exception()  # retrieved: the waiters re-raise it
            return
        log.info("loaded adapter %s on %s", adapter.ref, self.base_ref)
        entry.ready.set_result(None)

    def _download(self, adapter: AdapterRequest) -> Path:
        """(a worker thread) The adapter's files in a fresh directory, checked against the registry and this deployment."""
        version = self.registry.resolve(adapter.ref, tenant=adapter.tenant)
        if version.task != ADAPTER_TASK or version.parent != self.base_ref:
            raise InvalidInputError(f"{version.ref} is not an adapter of {self.base_ref}", param="model")
        self.root.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix=f"{version.name}-{version.version}-", dir=self.root))
        try:
            self.registry.download(version.ref, directory, tenant=adapter.tenant)
            config = json.loads((directory / "adapter_config.json").read_text())
            rank = max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
            if rank > self.max_rank:
                raise InvalidInputError(f"adapter {version.ref} has rank {rank}; this deployment takes adapters up to rank "
                                        f"{self.max_rank} (engine.max_adapter_rank)", param="model")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return directory

    async def _evict(self, entry: _Loaded) -> None:
        try:
            await self.engine.unload_adapter(entry.ref)
            log.info("unloaded adapter %s (least recently used) from %s", entry.ref, self.base_ref)
        except Exception:  # noqa: BLE001 - it leaves the cache either way; the engine keeps what it could not free
            log.exception("could not unload adapter %s", entry.ref)
        finally:
            if entry.directory is not None:
                await asyncio.to_thread(shutil.rmtree, entry.directory, True)
            async with self._changed:
                self._entries.pop(entry.ref, None)
                self._changed.notify_all()

    def close(self) -> None:
        """Delete the downloaded adapters (the engine is closed by its owner)."""
        for entry in self._entries.values():
            if entry.directory is not None:
                shutil.rmtree(entry.directory, ignore_errors=True)
        self._entries.clear()
