"""Canary splits without Ray: side picking, the verdict, the shared row, and a split over fake engines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from lmaas import db
from lmaas.errors import InvalidInputError
from lmaas.serve.canary import (
    CANARY, PROMOTED, ROLLED_BACK, RUNNING, STABLE, CALLER, ROUTED, CanaryEngine, CanaryState, CanaryStore, HealthWindow, Routed, SideStats,
    evaluate, pick_side, rollout_id,
)
from lmaas.serve.options import CanaryOptions, ServedModel
from lmaas.serve.engine import Engine, EngineStats, GenerationRequest, SamplingParams, TokenEvent


def test_pick_side_weights_and_stickiness():
    picks = [pick_side(10, None) for _ in range(4000)]
    assert 300 < picks.count(CANARY) < 500
    assert pick_side(0, "u") == STABLE and pick_side(100, "u") == CANARY
    users = [f"user-{i}" for i in range(1000)]
    sides = {u: pick_side(30, u, salt="app/m") for u in users}
    assert all(pick_side(30, u, salt="app/m") == sides[u] for u in users)  # sticky
    assert 230 < list(sides.values()).count(CANARY) < 370


def test_verdicts():
    policy = CanaryOptions(ref="m:2", min_requests=10, max_error_rate=0.1, max_latency_ratio=2, promote_after_s=60)
    fast, slow = SideStats(100, 0, 0.1), SideStats(10, 0, 0.5)
    assert evaluate(policy, fast, SideStats(9, 9, None), running_for_s=100) is None  # too few requests
    state, reason = evaluate(policy, fast, SideStats(10, 2, 0.1), running_for_s=1)
    assert state == ROLLED_BACK and "error rate 20.0%" in reason
    state, reason = evaluate(policy, fast, slow, running_for_s=1)
    assert state == ROLLED_BACK and "5.0x" in reason and "p99" in reason
    assert evaluate(policy, fast, SideStats(10, 0, 0.15), running_for_s=30) is None
    assert evaluate(policy, fast, SideStats(10, 0, 0.15), running_for_s=61)[0] == PROMOTED


def test_health_window_slides():
    window = HealthWindow()
    for i in range(10):
        window.record(i != 0, 0.01 * i, now=100.0 + i)
    assert window.stats(100, now=110) == SideStats(10, 1, 0.09)
    assert window.stats(5, now=110).requests == 5


def test_canary_options_validate():
    with pytest.raises(ValueError, match="weight"):
        CanaryOptions(ref="m:2", weight=150)
    with pytest.raises(ValueError, match="multiplexed"):
        ServedModel(ref="m", multiplexed=True, canary={"ref": "m:2"})
    assert rollout_id("m", CanaryOptions(ref="m:2").policy()) != rollout_id("m", CanaryOptions(ref="m:2", weight=20).policy())
    assert rollout_id("m", CanaryOptions(ref="m:2").policy()) == rollout_id("m", CanaryOptions(ref="m:2", max_replicas=3).policy())


def test_store_transition_happens_once(tmp_path):
    engine = db.connect(f"sqlite:///{tmp_path / 'x.db'}")
    store = CanaryStore(engine)
    first = store.ensure("app", "m", "r1", "m", "m:2", 10)
    assert first.state == RUNNING and first.weight == 10
    assert store.ensure("app", "m", "r1", "m", "m:2", 50).weight == 10  # same rollout: kept
    assert store.transition("app", "m", "r1", state=ROLLED_BACK, weight=0, reason="slow", detail={"p99": 1})
    assert not store.transition("app", "m", "r1", state=ROLLED_BACK, weight=0, reason="slow", detail={})
    assert not store.transition("app", "m", "r1", state=PROMOTED, weight=100, reason="ok", detail={})
    assert store.get("app", "m").routed_weight == 0
    from lmaas.db.schema import events

    with engine.connect() as conn:
        rows = conn.execute(sa.select(events).where(events.c.action == "deployment.canary.rollback")).mappings().all()
    assert len(rows) == 1 and rows[0]["detail"]["reason"] == "slow" and rows[0]["target"] == "app/m"
    assert store.ensure("app", "m", "r2", "m", "m:3", 20).state == RUNNING  # a new rollout restarts it
    store.reset("app", ["m"])
    assert store.get("app", "m") is None


class FakeEngine(Engine):
    def __init__(self, name: str, fail: bool = False, delay: float = 0.0) -> None:
        self.model_id, self.fail, self.delay, self.calls = name, fail, delay, 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("engine exploded")
        if request.prompt == "bad":
            raise InvalidInputError("bad prompt", param="prompt")
        yield TokenEvent(request.request_id, 1, self.model_id, 1, 1, "length")

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0)


def _request(prompt: str = "hi") -> GenerationRequest:
    return GenerationRequest("r", prompt, SamplingParams(max_tokens=1))


def test_broken_canary_is_retried_on_stable_and_rolled_back(tmp_path):
    store = CanaryStore(db.connect(f"sqlite:///{tmp_path / 'x.db'}"))
    policy = CanaryOptions(ref="m:2", weight=50, min_requests=5, max_error_rate=0.1)
    stable, canary = FakeEngine("stable"), FakeEngine("canary", fail=True)
    split = CanaryEngine("app", "m", stable, canary, "m", policy, store, "r1")

    async def run() -> list[str]:
        answered = []
        for _ in range(40):
            routed = Routed()
            ROUTED.set(routed)
            texts = [e.text async for e in split.generate(_request())]
            answered.append(texts[0])
            assert routed.side == STABLE and routed.ref == "m"
        with pytest.raises(InvalidInputError):  # a 4xx is the request's fault: not retried, not counted
            [e async for e in split.generate(_request("bad"))]
        await asyncio.sleep(0.1)
        split._read_at = 0.0  # the split as the database has it now
        await split.check()  # outcomes arrived faster than the periodic check: run it once more
        return answered

    answered = asyncio.run(run())
    assert set(answered) == {"stable"}  # every request succeeded
    assert canary.calls >= 5
    state = store.get("app", "m")
    assert state.state == ROLLED_BACK and "error rate" in state.reason


def test_sticky_split_follows_the_caller(tmp_path):
    store = CanaryStore(db.connect(f"sqlite:///{tmp_path / 'x.db'}"))
    policy = CanaryOptions(ref="m:2", weight=50, sticky=True, min_requests=1000)
    split = CanaryEngine("app", "m", FakeEngine("stable"), FakeEngine("canary"), "m", policy, store, "r1")

    async def sides(user: str) -> set[str]:
        CALLER.set(user)
        return {(await split.generate(_request()).__anext__()).text for _ in range(10)}

    seen = [asyncio.run(sides(f"u{i}")) for i in range(20)]
    assert all(len(s) == 1 for s in seen) and {"stable", "canary"} == set().union(*seen)


def test_a_replaced_replica_never_overwrites_its_successors_row(tmp_path):
    store = CanaryStore(db.connect(f"sqlite:///{tmp_path / 'x.db'}"))
    store.restart("app", "m", "new", "m", "m:3", 40)  # the deploy writes the new rollout first
    old = store.ensure("app", "m", "old", "m", "m:2", 10, replace_before=0.0)  # the old gateway, started earlier
    assert old.rollout == "new" and old.weight == 40
    assert store.ensure("app", "m", "newer", "m", "m:4", 5).rollout == "newer"  # a replica newer than the row replaces it


def test_a_replica_being_replaced_does_not_restart_a_finished_rollout(tmp_path):
    store = CanaryStore(db.connect(f"sqlite:///{tmp_path / 'x.db'}"))
    policy = CanaryOptions(ref="m:2", weight=100, min_requests=1, promote_after_s=0.01)
    split = CanaryEngine("app", "m", FakeEngine("stable"), FakeEngine("canary"), "m", policy, store, "r1")

    async def run() -> CanaryState:
        ROUTED.set(Routed())
        for _ in range(6):
            [e async for e in split.generate(_request())]
        await asyncio.sleep(0.05)  # past promote_after_s
        split._read_at = 0.0
        await split.check()
        assert store.get("app", "m").state == PROMOTED
        store.reset("app", ["m"])  # the promotion's redeploy: the model has no canary any more
        split._read_at = 0.0
        state = await split.current()
        assert await split.check() is None
        return state

    state = asyncio.run(run())
    assert state.state == PROMOTED and split.weight(state) == 100  # keeps routing by the last state it saw
    assert store.get("app", "m") is None  # and never writes a fresh running row (which it would promote again)
