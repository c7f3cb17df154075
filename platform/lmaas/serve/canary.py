"""Canary rollouts on the gateway: split a model's traffic between its stable and canary deployments,
watch both sides, roll the canary back or promote it. No Ray and no HTTP here.

    models:
      - ref: tiny-lm@production
        canary: {ref: "tiny-lm:7", weight: 10, sticky: true, max_error_rate: 0.05, max_latency_ratio: 2, promote_after_s: 600}

How it holds together across gateway replicas:

- The split's state (weight, running / rolled_back / promoted, why) is one row of the `canaries`
  table per (Serve app, served model), keyed by `rollout`: a hash of the stable reference and the
  canary's settings. Each replica reads the row with a short TTL (`STATE_TTL_S`) and routes by it.
  A redeploy with a changed canary starts a new rollout (a new hash resets the row); a replica
  restart with the same settings finds the row as it was, so a rolled-back canary stays rolled back.
- Each replica keeps a sliding window of its own outcomes per side (server errors, latency). When it
  sees the canary fail the policy, it moves the row `running -> rolled_back` with a conditional
  UPDATE (`WHERE rollout = :mine AND state = 'running'`) and writes the audit event in the same
  transaction: exactly one replica wins and the log holds exactly one event. Promotion works alike
  (`running -> promoted`), then the winner asks for the redeploy that makes the canary stable.
- A canary request that fails with a server error before its first token is retried on the stable
  side, so a broken canary costs clients latency, not errors, while the window counts the failure.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine as DbEngine

from lmaas import db
from lmaas.db.schema import canaries
from lmaas.errors import LmaasError
from lmaas.serve.engine import Engine, EngineStats, GenerationRequest, SamplingParams, TokenEvent, Tokenized

log = logging.getLogger("lmaas.serve")

RUNNING, ROLLED_BACK, PROMOTED = "running", "rolled_back", "promoted"
STABLE, CANARY = "stable", "canary"
STATE_TTL_S = 1.0
"""How long a gateway replica trusts the split it read from the database."""
EVALUATE_EVERY_S = 0.5
ACTOR = "gateway"
"""How the audit log names the gateway when it rolls back or promotes on its own."""


class CanaryPolicy(Protocol):
    """What the watch needs of `options.CanaryOptions`."""

    ref: str
    weight: int
    sticky: bool
    max_error_rate: float
    max_latency_ratio: float
    min_requests: int
    window_s: float
    promote_after_s: float | None


# ---- who is asking, and which side answered (per request, set by the HTTP router) ----


@dataclass
class Routed:
    """Filled in by the engine that served a request: the reference of the side that answered."""

    ref: str | None = None
    side: str | None = None


CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("lmaas_canary_caller", default=None)
"""The identity sticky splits hash: the request's `user` field, `X-Lmaas-User` header, or API key id."""
ROUTED: contextvars.ContextVar[Routed | None] = contextvars.ContextVar("lmaas_routed", default=None)


def pick_side(weight: int, key: str | None, salt: str = "") -> str:
    """`CANARY` for about `weight`% of calls: by a stable hash of `key` (sticky), else at random."""
    if weight <= 0:
        return STABLE
    if weight >= 100:
        return CANARY
    if key is None:
        return CANARY if random.random() * 100 < weight else STABLE
    bucket = int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:8], 16) % 100
    return CANARY if bucket < weight else STABLE


def rollout_id(stable_ref: str, canary: dict[str, Any]) -> str:
    """The hash that names one rollout: a changed stable reference or canary setting starts a new one."""
    text = json.dumps({"stable": stable_ref, "canary": canary}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---- the shared state ----


@dataclass(frozen=True)
class CanaryState:
    """One row of `canaries`."""

    app: str
    model: str
    rollout: str
    stable_ref: str
    canary_ref: str
    weight: int
    state: str
    reason: str
    started_at: float
    updated_at: float

    @property
    def routed_weight(self) -> int:
        """The canary's share of traffic now: its weight while running, 0 rolled back, 100 promoted (until the redeploy)."""
        return {RUNNING: self.weight, ROLLED_BACK: 0, PROMOTED: 100}.get(self.state, 0)


class CanaryStore:
    """The `canaries` table: every gateway replica's view of each split."""

    def __init__(self, engine: DbEngine) -> None:
        self.engine = engine

    @classmethod
    def from_settings(cls, settings: Any = None) -> "CanaryStore":
        from lmaas.config import load_settings

        return cls(db.connect((settings or load_settings()).database_url))

    def get(self, app: str, model: str) -> CanaryState | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(canaries).where(canaries.c.app == app, canaries.c.model == model)).mappings().first()
        return _state(row) if row else None

    def list(self, app: str) -> dict[str, CanaryState]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(canaries).where(canaries.c.app == app)).mappings().all()
        return {r["model"]: _state(r) for r in rows}

    def ensure(
        self, app: str, model: str, rollout: str, stable_ref: str, canary_ref: str, weight: int, *, replace_before: float = float("inf")
    ) -> CanaryState:
        """The row of this rollout: kept as it is when it exists, else (re)started at `weight`.

        Args:
            replace_before: replace another rollout's row only if it started before this time (a gateway
                replica passes its own start, so a replica being replaced never overwrites its successor's row).
        """
        now = time.time()
        values = {"rollout": rollout, "stable_ref": stable_ref, "canary_ref": canary_ref, "weight": weight, "state": RUNNING,
                  "reason": "started", "started_at": now, "updated_at": now}
        with self.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE; PostgreSQL: the unique constraint settles a race
            row = conn.execute(sa.select(canaries).where(canaries.c.app == app, canaries.c.model == model)).mappings().first()
            if row is None:
                conn.execute(canaries.insert().values(app=app, model=model, **values))
            elif row["rollout"] != rollout and row["started_at"] < replace_before:
                conn.execute(canaries.update().where(canaries.c.id == row["id"]).values(**values))
            else:
                return _state(row)
        return self.get(app, model)  # type: ignore[return-value]

    def restart(self, app: str, model: str, rollout: str, stable_ref: str, canary_ref: str, weight: int) -> CanaryState:
        """Start this rollout afresh (a deploy): running at `weight`, whatever the row held."""
        self.reset(app, [model])
        return self.ensure(app, model, rollout, stable_ref, canary_ref, weight)

    def transition(self, app: str, model: str, rollout: str, *, state: str, weight: int, reason: str, detail: dict[str, Any], actor: str = ACTOR) -> bool:
        """Move a running rollout to `state` and audit it, if it is still running: True for the one caller that did."""
        action = {ROLLED_BACK: "deployment.canary.rollback", PROMOTED: "deployment.canary.promote"}[state]
        with self.engine.begin() as conn:
            done = conn.execute(
                canaries.update()
                .where(canaries.c.app == app, canaries.c.model == model, canaries.c.rollout == rollout, canaries.c.state == RUNNING)
                .values(state=state, weight=weight, reason=reason[:2000], updated_at=time.time())
            ).rowcount
            if done == 1:
                db.record_event(conn, actor=actor, action=action, target=f"{app}/{model}", detail={"reason": reason, **detail})
        return done == 1

    def reset(self, app: str, models: list[str]) -> None:
        """Forget these models' rollouts (a deploy starts each canary afresh)."""
        if models:
            with self.engine.begin() as conn:
                conn.execute(canaries.delete().where(canaries.c.app == app, canaries.c.model.in_(models)))


def _state(row: Any) -> CanaryState:
    return CanaryState(**{k: row[k] for k in CanaryState.__dataclass_fields__})


# ---- the watch ----


@dataclass(frozen=True)
class SideStats:
    requests: int
    errors: int
    p99_s: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class HealthWindow:
    """Outcomes of one side over a sliding time window: (time, ok, latency)."""

    def __init__(self) -> None:
        self._outcomes: deque[tuple[float, bool, float]] = deque()

    def record(self, ok: bool, latency_s: float, now: float | None = None) -> None:
        self._outcomes.append((time.time() if now is None else now, ok, latency_s))

    def clear(self) -> None:
        self._outcomes.clear()

    def stats(self, window_s: float, now: float | None = None) -> SideStats:
        cutoff = (time.time() if now is None else now) - window_s
        while self._outcomes and self._outcomes[0][0] < cutoff:
            self._outcomes.popleft()
        latencies = sorted(lat for _, ok, lat in self._outcomes if ok)
        errors = sum(1 for _, ok, _ in self._outcomes if not ok)
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None
        return SideStats(len(self._outcomes), errors, p99)


def evaluate(policy: CanaryPolicy, stable: SideStats, canary: SideStats, *, running_for_s: float) -> tuple[str, str] | None:
    """`(ROLLED_BACK | PROMOTED, reason)` when the canary's window calls for it, else None (keep watching).

    Nothing is decided before the canary has `min_requests` outcomes in the window. The latency
    test needs a few stable outcomes to compare with (with few samples p99 is close to the max).
    """
    if canary.requests < policy.min_requests:
        return None
    if canary.error_rate > policy.max_error_rate:
        return ROLLED_BACK, (
            f"canary error rate {canary.error_rate:.1%} ({canary.errors}/{canary.requests}) exceeds max_error_rate {policy.max_error_rate:.1%}"
        )
    if canary.p99_s is not None and stable.p99_s and stable.requests >= min(5, policy.min_requests):
        ratio = canary.p99_s / stable.p99_s
        if ratio > policy.max_latency_ratio:
            return ROLLED_BACK, (
                f"canary p99 latency {canary.p99_s:.3f}s is {ratio:.1f}x the stable p99 {stable.p99_s:.3f}s "
                f"(max_latency_ratio {policy.max_latency_ratio:g}; {canary.requests} canary / {stable.requests} stable requests)"
            )
    if policy.promote_after_s is not None and running_for_s >= policy.promote_after_s:
        return PROMOTED, f"healthy for {running_for_s:.0f}s (promote_after_s {policy.promote_after_s:g}) over {canary.requests} canary requests"
    return None


class CanaryEngine(Engine):
    """One served name over two engines (stable and canary deployments), split and watched as above.

    Args:
        app, model_id: the Serve app and the served name (the row's key).
        stable, canary: the engines of each side (`DeploymentEngine`s in the gateway).
        stable_ref: the stable side's reference.
        policy: the canary's settings (`options.CanaryOptions`).
        store: the shared state.
        on_promote: called once, by the replica that promoted, to make the canary the stable version.
    """

    def __init__(
        self, app: str, model_id: str, stable: Engine, canary: Engine, stable_ref: str, policy: CanaryPolicy, store: CanaryStore,
        rollout: str, on_promote: Callable[[], None] | None = None,
    ) -> None:
        self.app, self.model_id = app, model_id
        self.sides = {STABLE: stable, CANARY: canary}
        self.refs = {STABLE: stable_ref, CANARY: policy.ref}
        self.policy, self.store, self.rollout, self.on_promote = policy, store, rollout, on_promote
        self.windows = {STABLE: HealthWindow(), CANARY: HealthWindow()}
        self._state: CanaryState | None = None
        self._read_at = 0.0
        self._evaluated_at = 0.0
        self._lock = asyncio.Lock()
        self._created_at = time.time()

    # -- the split --

    async def current(self) -> CanaryState | None:
        """The row this replica routes by (re-read after `STATE_TTL_S`); None when the database cannot be read."""
        if time.monotonic() - self._read_at < STATE_TTL_S:
            return self._state
        async with self._lock:
            if time.monotonic() - self._read_at >= STATE_TTL_S:
                try:
                    state = await asyncio.to_thread(self._read)
                except Exception:  # noqa: BLE001 - keep the last split; the next call tries again
                    log.exception("canary %s/%s: cannot read the split", self.app, self.model_id)
                    state = self._state
                if state is not None and self._state is not None and state.started_at != self._state.started_at:
                    for window in self.windows.values():
                        window.clear()
                self._state, self._read_at = state, time.monotonic()
        return self._state

    def start(self) -> None:
        """Write this rollout's row now (it is kept as it is when it exists), so listings show the split at once."""
        self._read()

    def _read(self) -> CanaryState:
        state = self.store.get(self.app, self.model_id)
        if state is None and self._state is not None and self._state.rollout == self.rollout:
            # a deploy removed this rollout's row (a promotion's redeploy, an undeploy): this replica is being
            # replaced, and writing the row afresh would restart the rollout (and promote it a second time)
            return self._state
        if state is None or (state.rollout != self.rollout and state.started_at < self._created_at):
            state = self.store.ensure(
                self.app, self.model_id, self.rollout, self.refs[STABLE], self.refs[CANARY], self.policy.weight, replace_before=self._created_at
            )
        return state

    def weight(self, state: CanaryState | None) -> int:
        if state is None or state.rollout != self.rollout:
            return self.policy.weight  # another rollout's row (this replica is being replaced): follow the config
        return state.routed_weight

    async def _side(self) -> str:
        state = await self.current()
        key = CALLER.get() if self.policy.sticky else None
        return pick_side(self.weight(state), key, salt=f"{self.app}/{self.model_id}")

    # -- outcomes --

    def _record(self, side: str, ok: bool, started: float) -> None:
        self.windows[side].record(ok, time.monotonic() - started)
        now = time.monotonic()
        if now - self._evaluated_at >= EVALUATE_EVERY_S:
            self._evaluated_at = now
            task = asyncio.get_running_loop().create_task(self.check())
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def check(self) -> str | None:
        """Evaluate the windows; perform a rollback or promotion if due. Returns the new state this replica set, if any."""
        state = await self.current()
        if state is None or state.rollout != self.rollout or state.state != RUNNING:
            return None
        window = self.policy.window_s
        stable, canary = self.windows[STABLE].stats(window), self.windows[CANARY].stats(window)
        verdict = evaluate(self.policy, stable, canary, running_for_s=time.time() - state.started_at)
        if verdict is None:
            return None
        new_state, reason = verdict
        detail = {
            "stable_ref": self.refs[STABLE], "canary_ref": self.refs[CANARY], "weight": state.weight, "window_s": window,
            "canary": {"requests": canary.requests, "errors": canary.errors, "error_rate": round(canary.error_rate, 4), "p99_s": canary.p99_s},
            "stable": {"requests": stable.requests, "errors": stable.errors, "error_rate": round(stable.error_rate, 4), "p99_s": stable.p99_s},
        }
        weight = 0 if new_state == ROLLED_BACK else 100
        won = await asyncio.to_thread(
            self.store.transition, self.app, self.model_id, self.rollout, state=new_state, weight=weight, reason=reason, detail=detail
        )
        self._read_at = 0.0  # re-read at once
        if not won:
            return None
        self._state = dataclasses.replace(state, state=new_state, weight=weight, reason=reason)
        log.warning("canary %s/%s %s: %s", self.app, self.model_id, new_state, reason)
        if new_state == PROMOTED and self.on_promote is not None:
            try:
                self.on_promote()
            except Exception:  # noqa: BLE001 - the split already sends everything to the canary
                log.exception("canary %s/%s: could not start the promotion redeploy", self.app, self.model_id)
        return new_state

    # -- the Engine interface --

    async def _routed(self, start: Callable[[Engine], AsyncIterator[TokenEvent]]) -> AsyncIterator[TokenEvent]:
        side = await self._side()
        started = time.monotonic()
        events = start(self.sides[side])
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            self._record(side, True, started)
            return
        except Exception as exc:  # noqa: BLE001 - sorted out below
            await events.aclose()
            if (isinstance(exc, LmaasError) and exc.status < 500) or side == STABLE:
                if not (isinstance(exc, LmaasError) and exc.status < 500):
                    self._record(side, False, started)
                raise  # a 4xx is the request's own fault (the same on either side); a stable failure is the client's answer
            self._record(side, False, started)
            side, started = STABLE, time.monotonic()  # the canary failed: answer from the stable side
            events = start(self.sides[STABLE])
            first = await events.__anext__()
        _mark(side, self.refs[side])
        ok = False
        try:
            yield first
            if first.finish_reason is None:
                async for event in events:
                    yield event
            ok = True
        except (GeneratorExit, asyncio.CancelledError):
            ok = None  # the client left: no verdict on the side
            raise
        finally:
            await events.aclose()
            if ok is not None:
                self._record(side, ok, started)

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        return self._routed(lambda engine: engine.generate(request))

    def generate_chat(  # type: ignore[override]
        self, request_id: str, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None
    ) -> AsyncIterator[TokenEvent]:
        return self._routed(lambda engine: engine.generate_chat(request_id, messages, params, tools=tools))

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        side = await self._side()
        started = time.monotonic()
        try:
            out = await self.sides[side].embed(texts)
        except Exception as exc:  # noqa: BLE001 - sorted out below
            if isinstance(exc, LmaasError) and exc.status < 500:
                raise
            self._record(side, False, started)
            if side == STABLE:
                raise
            side, started = STABLE, time.monotonic()
            out = await self.sides[STABLE].embed(texts)
        self._record(side, True, started)
        _mark(side, self.refs[side])
        return out

    async def tokenize(self, prompt: str | list[dict], **options: bool) -> Tokenized:
        """The stable side's tokenizer (a canary of another tokenizer answers its own generations, not this)."""
        return await self.sides[STABLE].tokenize(prompt, **options)

    async def detokenize(self, ids: list[int]) -> str:
        return await self.sides[STABLE].detokenize(ids)

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0)

    async def close(self) -> None:
        for engine in self.sides.values():
            await engine.close()


def _mark(side: str, ref: str) -> None:
    routed = ROUTED.get()
    if routed is not None:
        routed.side, routed.ref = side, ref


_background: set[asyncio.Task] = set()
