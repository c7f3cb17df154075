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
"""Append-only record of what happened (who did what to which thing, and how it went): the audit log.

Database triggers (migration 0006) refuse UPDATE and DELETE on it, on SQLite and PostgreSQL."""

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
    sa.Column("tenant", sa.String(200), nullable=False, default="default"),
    sa.UniqueConstraint("name", "version"),
    sa.Index(None, "name", "content_hash"),
)
"""Immutable dataset versions: one row per ingest that produced new content (shards in the store)."""

dataset_uploads = sa.Table(
    "dataset_uploads",
    metadata,
    sa.Column("prefix", sa.String(500), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
)
"""Dataset versions being published: recorded before the shards are uploaded, removed with the
`datasets` insert; `versions.gc` deletes prefixes of rows older than its grace period."""

registered_models = sa.Table(
    "registered_models",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("tenant", sa.String(200), nullable=False, default="default"),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("tags", sa.JSON, nullable=False, default=dict),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
    sa.Column("last_version", sa.Integer, nullable=False, default=0),
    sa.Column("public", sa.Boolean, nullable=False, default=False),
)
"""One row per model name; `last_version` is the version counter, locked while allocating."""

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("registered_models.id"), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("status", sa.String(20), nullable=False, default="ready"),
    sa.Column("task", sa.String(50), nullable=False),
    sa.Column("prefix", sa.String(500), nullable=False, unique=True),
    sa.Column("files", sa.JSON, nullable=False),
    sa.Column("manifest_sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
    sa.Column("run", sa.String(500), nullable=True),
    sa.Column("dataset", sa.String(500), nullable=True),
    sa.Column("dataset_sha256", sa.String(64), nullable=True),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("model_versions.id"), nullable=True),
    sa.Column("metrics", sa.JSON, nullable=False, default=dict),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("signature", sa.String(200), nullable=True),
    sa.Column("encrypted", sa.Boolean, nullable=False, default=False),
    sa.UniqueConstraint("model_id", "version"),
    sa.Index(None, "dataset"),
    sa.Index(None, "parent_id"),
)
"""Immutable model versions; a row exists only once every file is uploaded and verified."""

model_version_parents = sa.Table(
    "model_version_parents",
    metadata,
    sa.Column("version_id", sa.Integer, sa.ForeignKey("model_versions.id"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("model_versions.id"), nullable=False),
    sa.Index(None, "parent_id"),
)
"""The second and later parents of a version with several (a merge); the first is `model_versions.parent_id`."""

model_aliases = sa.Table(
    "model_aliases",
    metadata,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("registered_models.id"), primary_key=True),
    sa.Column("alias", sa.String(64), primary_key=True),
    sa.Column("version_id", sa.Integer, sa.ForeignKey("model_versions.id"), nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False, default=time.time),
)
"""Movable names (`production`, `staging`) pointing at one version each."""

model_uploads = sa.Table(
    "model_uploads",
    metadata,
    sa.Column("prefix", sa.String(500), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
    sa.Column("files", sa.JSON, nullable=True),
    sa.Column("tenant", sa.String(200), nullable=True),
)
"""Uploads in progress: gc leaves their files alone for a grace period, then collects them.

`tenant` is who opened a two-step upload (None: an admin); to anyone else it does not exist.

`files` is set for a two-step upload only: `{path: {"size", "sha256", "stored": {"size", "sha256"} | null}}`,
the files the client declared and, once each has landed, what the store holds (ciphertext if encrypted).
"""

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("tpm", sa.Integer, nullable=True),
    sa.Column("tpd", sa.BigInteger, nullable=True),
    sa.Column("storage_bytes", sa.BigInteger, nullable=True),
)
"""Who owns models, datasets and keys; `rpm`/`tpm`/`tpd` are the tenant-wide limits, `storage_bytes`
the most its model versions and files may hold in the artifact store (NULL: no limit)."""

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
    sa.Column("name", sa.String(200), nullable=False, default=""),
    sa.Column("secret_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("scopes", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
    sa.Column("created_by", sa.String(200), nullable=False, default=""),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("last_used_at", sa.Float, nullable=True),
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("tpm", sa.Integer, nullable=True),
    sa.Column("tpd", sa.BigInteger, nullable=True),
    sa.Index(None, "tenant"),
)
"""API keys: only the sha256 of the secret is kept; the secret is shown once, at creation."""

rate_counters = sa.Table(
    "rate_counters",
    metadata,
    sa.Column("subject", sa.String(100), primary_key=True),
    sa.Column("window", sa.String(8), primary_key=True),
    sa.Column("start", sa.BigInteger, primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
)
"""Fixed-window counters (`key:<id>` / `tenant:<name>`, `rpm`/`tpm`/`tpd`, window start), bumped by atomic UPSERTs."""

usage = sa.Table(
    "usage",
    metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("day", sa.Integer, primary_key=True),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("batch_requests", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("batch_prompt_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("batch_completion_tokens", sa.BigInteger, nullable=False, server_default="0"),
)
"""Inference usage per tenant, key, model and UTC day (days since the epoch); `batch_*`: lines of offline batches
(`/v1/batches`), counted apart (billed at a discount, `Settings.batch_token_discount`)."""

responses = sa.Table(
    "responses",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("version", sa.String(300), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Index(None, "created_at"),
)
"""Which model version produced each OpenAI response `id`, so feedback can be filed against it."""

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("response_id", sa.String(100), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("version", sa.String(300), nullable=True),
    sa.Column("rating", sa.Integer, nullable=False),
    sa.Column("comment", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
    sa.Index(None, "version"),
    sa.Index(None, "response_id"),
)
"""User ratings of responses, stored against the model version that produced each one."""

queued_jobs = sa.Table(
    "queued_jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("entrypoint", sa.Text, nullable=True),
    sa.Column("resources", sa.JSON, nullable=False),
    sa.Column("submission_id", sa.String(100), nullable=True, unique=True),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
    sa.Column("admitted_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("message", sa.Text, nullable=False, default=""),
    sa.Index(None, "state", "priority", "id"),
)
"""The job queue (`lmaas jobs`): one row per submitted job; `state` moves queued -> submitted ->
running -> succeeded | failed | cancelled, admission to Ray happening highest priority first, FIFO."""

canaries = sa.Table(
    "canaries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("app", sa.String(100), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("rollout", sa.String(64), nullable=False),
    sa.Column("stable_ref", sa.String(300), nullable=False),
    sa.Column("canary_ref", sa.String(300), nullable=False),
    sa.Column("weight", sa.Integer, nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("started_at", sa.Float, nullable=False, default=time.time),
    sa.Column("updated_at", sa.Float, nullable=False, default=time.time),
    sa.UniqueConstraint("app", "model"),
)
"""Canary rollouts (`serve.canary`): one row per served model of a Serve app that has a canary. `rollout`
is a hash of the canary's configuration; `state` moves running -> rolled_back | promoted, each move
made by one conditional UPDATE so exactly one gateway replica performs it."""

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("app", sa.String(100), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("tenant", sa.String(200), nullable=False),
    sa.Column("ref", sa.String(300), nullable=False),
    sa.Column("canary_ref", sa.String(300), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
    sa.Column("updated_at", sa.Float, nullable=False, default=time.time),
    sa.UniqueConstraint("app", "name"),
    sa.Index(None, "ref"),
    sa.Index(None, "canary_ref"),
)
"""Who owns each served name of a Serve app and what it serves (`serve.records`): written when a
deploy is applied, removed by undeploy. Only the owner tenant (or an admin) may replace, change or
remove a deployment; a version a row names by number (`name:3`) cannot be archived or deleted."""

files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(200), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("path", sa.String(700), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, default=time.time),
    sa.Index(None, "tenant", "created_at"),
)
"""Uploaded files (`registry.files`, the OpenAI files API): one row per file, written once its bytes
are in the store under `path` (`uploads/<tenant>/files/<id>/<filename>`) and checked for its purpose."""
