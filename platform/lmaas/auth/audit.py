"""The audit log: the append-only `events` table, read back with filters.

Writes go through `lmaas.db.record_event` (the registry, key and tenant changes record theirs in
the same transaction as the change). UPDATE and DELETE on `events` are refused by database
triggers (migration 0006), so not even a bug in lmaas can rewrite history.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from lmaas.db.schema import events


def list_events(
    engine: Engine,
    *,
    tenant: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    outcome: str | None = None,
    since: float | None = None,
    until: float | None = None,
    offset: int = 0,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Events newest first; `action` ending in `*` matches a prefix (`key.*`), other filters match exactly.

    Args:
        since, until: epoch seconds bounding `created_at` (inclusive).
    """
    query = sa.select(events).order_by(events.c.id.desc()).offset(offset).limit(limit)
    for column, value in ((events.c.tenant, tenant), (events.c.actor, actor), (events.c.target, target), (events.c.outcome, outcome)):
        if value is not None:
            query = query.where(column == value)
    if action is not None:
        if action.endswith("*"):
            escaped = action[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(events.c.action.like(f"{escaped}%", escape="\\"))
        else:
            query = query.where(events.c.action == action)
    if since is not None:
        query = query.where(events.c.created_at >= since)
    if until is not None:
        query = query.where(events.c.created_at <= until)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]
