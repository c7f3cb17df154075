"""User feedback on responses, filed against the model version that produced each one.

The gateway records every OpenAI response `id` with the served model and the registry version it
resolved to (`responses` table, written by `Quotas.record`); feedback names that id.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from lmaas import db
from lmaas.auth.entities import Principal
from lmaas.db.schema import feedback, responses
from lmaas.errors import InvalidInputError, NotFoundError

RATINGS = range(1, 6)
"""Ratings are 1 (bad) to 5 (good); a thumbs up/down client sends 5 or 1."""


def record_feedback(engine: Engine, principal: Principal, response_id: str, rating: int, comment: str = "") -> dict[str, Any]:
    """Store a rating of one response.

    Raises:
        InvalidInputError: rating outside 1-5, or a comment over 10,000 characters.
        NotFoundError: no such response, or one another tenant received.
    """
    if isinstance(rating, bool) or not isinstance(rating, int) or rating not in RATINGS:
        raise InvalidInputError(f"rating must be a whole number from 1 to 5, not {rating!r}", param="rating")
    if len(comment) > 10_000:
        raise InvalidInputError("comment is longer than 10000 characters", param="comment")
    with engine.begin() as conn:
        row = conn.execute(sa.select(responses).where(responses.c.id == response_id)).mappings().first()
        if row is None or (principal.tenant_filter is not None and row["tenant"] != principal.tenant):
            raise NotFoundError(f"no response {response_id!r} (feedback needs the `id` of a response from this gateway)", param="response_id")
        values = dict(
            response_id=response_id, tenant=row["tenant"], key_id=principal.key_id, model=row["model"], version=row["version"],
            rating=rating, comment=comment, created_at=time.time(),
        )
        values["id"] = int(conn.execute(feedback.insert().values(**values)).inserted_primary_key[0])
        db.record_event(conn, actor=principal.actor, action="feedback.create", target=response_id, tenant=row["tenant"], detail={"rating": rating})
    return values


def feedback_summary(engine: Engine, *, tenant: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
    """Ratings per model version: count and mean, so versions can be compared."""
    query = (
        sa.select(
            feedback.c.model, feedback.c.version, sa.func.count().label("count"), sa.func.avg(feedback.c.rating).label("mean_rating")
        )
        .group_by(feedback.c.model, feedback.c.version)
        .order_by(feedback.c.model, feedback.c.version)
    )
    if tenant is not None:
        query = query.where(feedback.c.tenant == tenant)
    if model is not None:
        query = query.where(feedback.c.model == model)
    with engine.connect() as conn:
        return [{**dict(r), "count": int(r["count"]), "mean_rating": float(r["mean_rating"])} for r in conn.execute(query).mappings()]
