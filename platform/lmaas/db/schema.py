"""Every table lmaas keeps, as SQLAlchemy Core metadata.

A table added here also needs a migration under `migrations/versions/`; `tests/unit/test_db.py`
checks that the migrated schema and this metadata agree.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("tenant", sa.String(200), nullable=True),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("target", sa.String(500), nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False, default="ok"),
    sa.Column("detail", sa.JSON, nullable=False, default=dict),
    sa.Index(None, "action", "created_at"),
)
"""Append-only record of what happened (who did what to which thing, and how it went)."""

datasets = sa.Table(
    "datasets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("uri", sa.String(1000), nullable=False),
    sa.Column("sources", sa.JSON, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("tokenizer_hash", sa.String(64), nullable=False),
    sa.Column("block_size", sa.Integer, nullable=False),
    sa.Column("vocab_size", sa.Integer, nullable=False),
    sa.Column("documents", sa.Integer, nullable=False),
    sa.Column("train_rows", sa.Integer, nullable=False),
    sa.Column("validation_rows", sa.Integer, nullable=False),
    sa.Column("tokens", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
    sa.UniqueConstraint("name", "version"),
    sa.Index(None, "name", "content_hash"),
)
"""Immutable dataset versions: one row per ingest that produced new content (shards in the store)."""
