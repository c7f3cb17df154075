"""Rate limits and quotas shared by every gateway replica, and the usage they meter.

State lives in the metadata database, so replicas agree: one row per (subject, window, window
start) in `rate_counters`, bumped by an atomic `INSERT ... ON CONFLICT DO UPDATE ... RETURNING`
(SQLite 3.35+ and PostgreSQL). Windows are fixed and aligned to the epoch (a minute, a UTC day):
a client can burst up to twice a limit across a window boundary, never more.

- Requests per minute: `admit` bumps the counter and refuses (429) when the new count passes the
  limit; the refused request is rolled back, so it does not count.
- Tokens per minute/day: `admit` refuses while the tokens already counted reach the limit;
  `record` adds a response's prompt + completion tokens once it is finished. A request is admitted
  on the tokens counted so far, so a limit is overshot by at most the requests then in flight.
  Token counters run only while a limit reads them: a limit set in the middle of a window counts
  from when the gateway sees it (after its key cache's TTL).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from lmaas.auth.entities import WINDOWS, Principal
from lmaas.db.schema import rate_counters, responses, usage
from lmaas.errors import RateLimitError

_WHAT = {"rpm": "requests per minute", "tpm": "tokens per minute", "tpd": "tokens per day"}
_KEEP_SECONDS = 2 * 86400
BATCH_FIELDS = ("batch_requests", "batch_prompt_tokens", "batch_completion_tokens")


def _insert(conn: Connection):  # noqa: ANN202 - the dialect's insert construct
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def window_start(window: str, now: float) -> int:
    period = WINDOWS[window]
    return int(now // period) * period


def bump(conn: Connection, subject: str, window: str, start: int, amount: int) -> int:
    """Add `amount` to one counter atomically and return its new value."""
    stmt = _insert(conn)(rate_counters).values(subject=subject, window=window, start=start, count=amount)
    stmt = stmt.on_conflict_do_update(
        index_elements=["subject", "window", "start"], set_={"count": rate_counters.c["count"] + stmt.excluded["count"]}
    ).returning(rate_counters.c["count"])
    return int(conn.execute(stmt).scalar_one())


class Quotas:
    """Admit requests under their key's and tenant's limits; record what they used.

    Args:
        engine: the metadata database every replica shares.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def admit(self, principal: Principal, *, now: float | None = None) -> None:
        """Count one request against `principal`'s limits.

        Raises:
            RateLimitError (429): a limit is reached; `retry_after` is the seconds until its window ends.
        """
        metered = principal.metered()
        if not metered or principal.anonymous:
            return
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            for subject, window, limit in metered:
                start = window_start(window, now)
                if window == "rpm":
                    count = bump(conn, subject, window, start, 1)
                    over = count > limit
                else:
                    count = conn.execute(
                        sa.select(rate_counters.c["count"]).where(
                            rate_counters.c.subject == subject, rate_counters.c.window == window, rate_counters.c.start == start
                        )
                    ).scalar_one_or_none() or 0
                    over = count >= limit
                if over:
                    retry = math.ceil(start + WINDOWS[window] - now)
                    who = "this API key" if subject.startswith("key:") else f"tenant {principal.tenant!r}"
                    raise RateLimitError(
                        f"rate limit reached: {who} allows {limit} {_WHAT[window]}; retry after {retry} s", retry_after=retry, param=window
                    )

    def record(
        self,
        principal: Principal,
        *,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        response_id: str | None = None,
        version: str | None = None,
        now: float | None = None,
    ) -> None:
        """Add one finished request to the token counters and usage, and remember which version answered it."""
        self.record_many([UsageRecord(principal, model, prompt_tokens, completion_tokens, response_id, version, now)])

    def record_many(self, records: list["UsageRecord"]) -> None:
        """`record` for several finished requests in one transaction: counters and usage rows that the
        requests share are bumped once by their sum (16 requests of one key and model: one usage upsert)."""
        records = [r for r in records if not r.principal.anonymous]
        if not records:
            return
        counters: dict[tuple[str, str, int], int] = {}
        rows: dict[tuple[str, str, str, int], list[int]] = {}
        answered = []
        latest = 0.0
        for r in records:
            now = time.time() if r.now is None else r.now
            latest = max(latest, now)
            tokens = int(r.prompt_tokens) + int(r.completion_tokens)
            # only the token counters a limit reads: an unlimited key's request is one usage upsert
            for subject, window, _ in r.principal.metered() if tokens else ():
                if window != "rpm":
                    at = (subject, window, window_start(window, now))
                    counters[at] = counters.get(at, 0) + tokens
            row = rows.setdefault((r.principal.tenant, r.principal.key_id, r.model, int(now // 86400)), [0, 0, 0])
            row[0] += 1
            row[1] += int(r.prompt_tokens)
            row[2] += int(r.completion_tokens)
            if r.response_id:
                answered.append(dict(
                    id=r.response_id, tenant=r.principal.tenant, key_id=r.principal.key_id, model=r.model, version=r.version,
                    created_at=now, prompt_tokens=int(r.prompt_tokens), completion_tokens=int(r.completion_tokens),
                ))
        with self.engine.begin() as conn:
            for (subject, window, start), tokens in counters.items():
                bump(conn, subject, window, start, tokens)
            for (tenant, key_id, model, day), (requests, prompt, completion) in rows.items():
                stmt = _insert(conn)(usage).values(
                    tenant=tenant, key_id=key_id, model=model, day=day, requests=requests, prompt_tokens=prompt, completion_tokens=completion,
                )
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["tenant", "key_id", "model", "day"],
                    set_={
                        "requests": usage.c.requests + stmt.excluded.requests,
                        "prompt_tokens": usage.c.prompt_tokens + stmt.excluded.prompt_tokens,
                        "completion_tokens": usage.c.completion_tokens + stmt.excluded.completion_tokens,
                    },
                ))
            if answered:
                conn.execute(_insert(conn)(responses).values(answered).on_conflict_do_nothing(index_elements=["id"]))
            if random.random() < 0.01:  # old windows are never read again
                conn.execute(rate_counters.delete().where(rate_counters.c.start < latest - _KEEP_SECONDS))

    def record_batch(
        self, *, tenant: str, key_id: str, model: str, requests: int, prompt_tokens: int, completion_tokens: int, discount: float,
        now: float | None = None,
    ) -> None:
        """Add a batch's answered lines (or a part of them) to usage, apart from online requests (`batch_*`), and their
        tokens times `discount` to the key's and tenant's per-day token counters (batches wait for capacity, so they
        count at a discount, as OpenAI bills them, and never against the per-minute limits).

        A limit reached later by a batch's tokens refuses the tenant's next requests and batches, not the batch itself.
        """
        now = time.time() if now is None else now
        tokens = math.ceil((int(prompt_tokens) + int(completion_tokens)) * discount)
        with self.engine.begin() as conn:
            if tokens:
                for subject in (f"key:{key_id}", f"tenant:{tenant}"):
                    bump(conn, subject, "tpd", window_start("tpd", now), tokens)
            stmt = _insert(conn)(usage).values(
                tenant=tenant, key_id=key_id, model=model, day=int(now // 86400), requests=0, prompt_tokens=0, completion_tokens=0,
                batch_requests=requests, batch_prompt_tokens=prompt_tokens, batch_completion_tokens=completion_tokens,
            )
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["tenant", "key_id", "model", "day"],
                set_={name: usage.c[name] + stmt.excluded[name] for name in BATCH_FIELDS},
            ))

    def usage(
        self,
        *,
        tenant: str | None = None,
        key_id: str | None = None,
        model: str | None = None,
        since: dt.date | None = None,
        until: dt.date | None = None,
        batch_discount: float = 1.0,
    ) -> list[dict[str, Any]]:
        """Requests and tokens per (tenant, key, model) over the UTC days `since`..`until` (inclusive): online
        (`requests`, `*_tokens`) and in batches (`batch_*`); `billable_tokens` counts batch tokens times `batch_discount`."""
        query = sa.select(
            usage.c.tenant,
            usage.c.key_id,
            usage.c.model,
            sa.func.sum(usage.c.requests).label("requests"),
            sa.func.sum(usage.c.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(usage.c.completion_tokens).label("completion_tokens"),
            *(sa.func.sum(usage.c[name]).label(name) for name in BATCH_FIELDS),
        ).group_by(usage.c.tenant, usage.c.key_id, usage.c.model).order_by(usage.c.tenant, usage.c.key_id, usage.c.model)
        for column, value in ((usage.c.tenant, tenant), (usage.c.key_id, key_id), (usage.c.model, model)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(usage.c.day >= _day(since))
        if until is not None:
            query = query.where(usage.c.day <= _day(until))
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
        for row in rows:
            for field in ("requests", "prompt_tokens", "completion_tokens", *BATCH_FIELDS):
                row[field] = int(row[field] or 0)
            row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
            row["batch_total_tokens"] = row["batch_prompt_tokens"] + row["batch_completion_tokens"]
            row["billable_tokens"] = row["total_tokens"] + math.ceil(row["batch_total_tokens"] * batch_discount)
        return rows


def _day(date: dt.date) -> int:
    return (date - dt.date(1970, 1, 1)).days


@dataclass(frozen=True)
class UsageRecord:
    """One finished request's usage, as `Quotas.record` takes it."""

    principal: Principal
    model: str
    prompt_tokens: int
    completion_tokens: int
    response_id: str | None = None
    version: str | None = None
    now: float | None = None


class UsageWriter:
    """Group commit for a gateway's event loop: `await writer.record(r)` returns once `r` is in the database,
    and every record handed in while one transaction runs goes into the next (`Quotas.record_many`).

    Under load, one transaction (in a worker thread) carries many requests' usage instead of each
    request taking the database's write lock and a thread hop of its own; a lone request still
    waits for exactly one transaction. A failed write fails every request of its batch alike.
    """

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[UsageRecord, asyncio.Future]]] = {}

    async def record(self, record: UsageRecord) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        pending = self._pending.get(loop)
        if pending is None:  # no writer runs on this loop: start one
            pending = self._pending[loop] = []
            _keep(loop.create_task(self._write(loop)))
        pending.append((record, done))
        await asyncio.shield(done)  # a caller that leaves does not take the record out of its batch

    async def _write(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            await asyncio.sleep(0)  # let the requests that finish in this turn of the loop join the batch
            while batch := self._pending[loop][:]:
                del self._pending[loop][: len(batch)]
                try:
                    await asyncio.to_thread(self.quotas.record_many, [r for r, _ in batch])
                except Exception as exc:  # noqa: BLE001 - handed to every request of the batch
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                else:
                    for _, done in batch:
                        if not done.done():
                            done.set_result(None)
        finally:
            for _, done in self._pending.pop(loop, []):  # the loop is closing: nobody writes these any more
                if not done.done():
                    done.set_exception(RuntimeError("usage writer stopped"))


_tasks: set[asyncio.Task] = set()


def _keep(task: asyncio.Task) -> None:
    """Hold a reference to a writer task until it ends (the loop keeps only weak ones)."""
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
