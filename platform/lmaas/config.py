"""Settings: where lmaas keeps its files and metadata and which Ray cluster it uses.

One pydantic settings object, read from the environment:

| variable              | default                                   |
|-----------------------|-------------------------------------------|
| `LMAAS_HOME`          | `~/.lmaas`                                |
| `LMAAS_STORAGE`       | `file://$LMAAS_HOME/store` (or `s3://bucket/prefix`) |
| `LMAAS_DATABASE_URL`  | `sqlite:///$LMAAS_HOME/lmaas.db` (or `postgresql://...`) |
| `RAY_ADDRESS`         | unset: start a local Ray cluster          |
| `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` | unset: AWS itself; set for MinIO, moto, Ceph... |

Library functions take explicit arguments; only the CLI, `jobs/` and `deployments/` call
`load_settings()` and `load_config()` (a job's YAML config plus `--set key=value` overrides).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lmaas.errors import ConfigError

BaseModelT = TypeVar("BaseModelT", bound=BaseModel)
STORAGE_SCHEMES = ("file", "s3")
DATABASE_DRIVERS = ("sqlite", "postgresql")


class Settings(BaseSettings):
    """Where lmaas keeps artifacts and metadata, and which Ray cluster it talks to."""

    model_config = SettingsConfigDict(env_prefix="LMAAS_", extra="ignore", frozen=True, populate_by_name=True)

    home: Path = Field(default_factory=lambda: Path("~/.lmaas"))
    """Directory for local state: the default store, the SQLite database, logs."""

    storage: str = ""
    """Artifact store URI: `file:///abs/path` or `s3://bucket/prefix`. Empty: `file://$home/store`."""

    database_url: str = ""
    """SQLAlchemy URL: `sqlite:///path` or `postgresql://user:pass@host/db`. Empty: SQLite under home."""

    ray_address: str | None = Field(default=None, validation_alias=AliasChoices("RAY_ADDRESS", "LMAAS_RAY_ADDRESS"))
    """Ray cluster to join (`auto`, `host:6379`, `ray://host:10001`). Unset: start a local cluster."""

    s3_endpoint_url: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "LMAAS_S3_ENDPOINT_URL")
    )
    """S3-compatible endpoint (MinIO, Ceph, moto). Unset: AWS. Credentials come from the usual AWS variables."""

    batch_token_discount: float = Field(default=0.5, ge=0, le=1)
    """Batches (`/v1/batches`): the fraction of their tokens that counts against per-day token quotas and in
    `billable_tokens` (`LMAAS_BATCH_TOKEN_DISCOUNT`; 0.5, as OpenAI's batch discount)."""

    max_running_jobs_per_tenant: int = Field(default=4, ge=1)
    """Job queue: jobs of one tenant admitted to the cluster at once (`LMAAS_MAX_RUNNING_JOBS_PER_TENANT`)."""

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        # frozen model: defaults that depend on `home` are filled through object.__setattr__
        storage = self.storage.strip() or f"file://{self.home / 'store'}"
        object.__setattr__(self, "storage", normalize_storage_uri(storage))
        url = self.database_url.strip() or f"sqlite:///{self.home / 'lmaas.db'}"
        object.__setattr__(self, "database_url", validate_database_url(url))
        if self.ray_address is not None and not self.ray_address.strip():
            object.__setattr__(self, "ray_address", None)
        return self

    def env(self, *, secrets: bool = True) -> dict[str, str]:
        """The variables that give a worker process (Ray task, Serve replica) these same settings.

        Args:
            secrets: include the credentials (a database URL with a password, `AWS_ACCESS_KEY_ID` /
                `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`). Without them (what a queued job's
                runtime_env carries: Ray shows it on the dashboard) the process takes them from
                its node's own environment (`ray start` run with them, an instance role).
        """
        env = {
            "LMAAS_HOME": str(self.home),
            "LMAAS_STORAGE": self.storage,
        }
        if secrets or not _has_password(self.database_url):
            env["LMAAS_DATABASE_URL"] = self.database_url
        if self.s3_endpoint_url:
            env["AWS_ENDPOINT_URL_S3"] = self.s3_endpoint_url
        if self.batch_token_discount != Settings.model_fields["batch_token_discount"].default:
            env["LMAAS_BATCH_TOKEN_DISCOUNT"] = str(self.batch_token_discount)
        credentials = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
        for name in (*credentials, "AWS_DEFAULT_REGION", "AWS_REGION"):
            if os.environ.get(name) and (secrets or name not in credentials):
                env[name] = os.environ[name]
        # what loading a version checks and decrypts with: the public verify key and the path of the
        # encryption key's file (each node reads its own copy), never a private or raw key
        for name in ("LMAAS_VERIFY_KEY", "LMAAS_REQUIRE_SIGNATURE", "LMAAS_ENCRYPTION_KEY_FILE"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        return env


    def worker_env(self) -> dict[str, str]:
        """What a Ray process of lmaas runs with (Serve replicas, job drivers and workers, helper actors).

        `env(secrets=False)`, with the credentials it leaves out passed by reference: they go to a
        file only this user can read (`$LMAAS_HOME/secrets/<hash>.json`, named by its content) and
        the environment carries its path (`LMAAS_SECRETS_FILE`) and their names
        (`LMAAS_SECRET_NAMES`), never their values: Ray shows runtime environments on its dashboard
        and in `serve status`. A process on another node reads the file if it is there; a variable
        its node's own environment sets wins (`apply_secrets_file`).
        """
        env = self.env(secrets=False)
        secret = {k: v for k, v in self.env(secrets=True).items() if k not in env}
        if secret:
            text = json.dumps(secret, sort_keys=True)
            folder = self.home / "secrets"
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = folder / (hashlib.sha256(text.encode()).hexdigest()[:20] + ".json")
            if not path.exists():
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, path)
            env[SECRETS_FILE_ENV] = str(path)
            env[SECRET_NAMES_ENV] = ",".join(sorted(secret))
        return env


SECRETS_FILE_ENV = "LMAAS_SECRETS_FILE"
SECRET_NAMES_ENV = "LMAAS_SECRET_NAMES"


def apply_secrets_file() -> None:
    """Set the credentials `Settings.worker_env` passed by reference that this process's environment lacks.

    Called when lmaas is imported (so a Ray worker has them before it opens the store) and by
    `load_settings`. Nothing happens without `LMAAS_SECRETS_FILE`, or when every named variable is set.

    Raises:
        ConfigError: a named variable is unset and the file is not on this node (the message names them).
    """
    path = os.environ.get(SECRETS_FILE_ENV)
    if not path:
        return
    missing = [n for n in os.environ.get(SECRET_NAMES_ENV, "").split(",") if n and not os.environ.get(n)]
    if not missing:
        return
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise ConfigError(
            f"{', '.join(missing)} unset on this node and {SECRETS_FILE_ENV} {path} is not readable here: start this node's "
            "Ray (`ray start`, cluster.yaml) with them in its environment", param=SECRETS_FILE_ENV) from None
    for name in missing:
        if isinstance(values.get(name), str):
            os.environ[name] = values[name]


def _has_password(url: str) -> bool:
    """Whether a database URL carries a password (`postgresql://user:secret@host/db`)."""
    from sqlalchemy.engine import make_url

    try:
        return bool(make_url(url).password)
    except Exception:  # noqa: BLE001 - a malformed URL is refused elsewhere; keep it out of job envs
        return True


def normalize_storage_uri(uri: str) -> str:
    """Return `uri` as `file:///abs/path` or `s3://bucket/prefix` (no trailing slash).

    A plain path is taken as a local directory.

    Raises:
        ConfigError: unknown scheme, or an `s3://` URI without a bucket.
    """
    parsed = urlparse(uri)
    if not parsed.scheme or (len(parsed.scheme) == 1 and uri[1:3] in (":\\", ":/")):
        return f"file://{Path(uri).expanduser().resolve()}"
    if parsed.scheme not in STORAGE_SCHEMES:
        raise ConfigError(
            f"LMAAS_STORAGE={uri!r}: unsupported scheme {parsed.scheme!r}; use file:///path or s3://bucket/prefix",
            param="storage",
        )
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"LMAAS_STORAGE={uri!r}: a file URI needs an absolute path, as file:///abs/path", param="storage")
        return f"file://{Path(parsed.path).expanduser().resolve()}"
    if not parsed.netloc:
        raise ConfigError(f"LMAAS_STORAGE={uri!r}: an s3 URI needs a bucket, as s3://bucket/prefix", param="storage")
    return f"s3://{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")


def validate_database_url(url: str) -> str:
    """Check that `url` is a SQLAlchemy URL for a supported database and return it.

    Raises:
        ConfigError: the URL does not parse or names an unsupported database.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"LMAAS_DATABASE_URL={redact_url(url)!r} is not a database URL; use sqlite:///path or postgresql://user@host/db",
            param="database_url",
        ) from None
    if parsed.get_backend_name() not in DATABASE_DRIVERS:
        raise ConfigError(
            f"LMAAS_DATABASE_URL: unsupported database {parsed.get_backend_name()!r}; use sqlite or postgresql",
            param="database_url",
        )
    return url


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, for messages and `lmaas status`."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@", 1)
    return url


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment (plus explicit `overrides`).

    Raises:
        ConfigError: a setting is malformed; the message names the variable.
    """
    apply_secrets_file()
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, ConfigError):
            raise cause from None
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"setting {field!r}: {first['msg']}", param=field) from None


def load_config(model: type[BaseModelT], path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> BaseModelT:
    """Build a job or app config from a YAML file plus dotted `key=value` overrides.

    `overrides` come from the command line (`--set optim.lr=3e-4 --set workers=2`); each value
    is parsed as YAML, so numbers, booleans and lists keep their types.

    Args:
        model: the pydantic config class (validates itself on construction).
        path: YAML file; None starts from the class defaults.
        overrides: `dotted.key=value` strings, applied in order.

    Raises:
        ConfigError: unreadable file, malformed override, or a value the config rejects;
            the message names the file and the field.
    """
    import yaml

    data: dict[str, Any] = {}
    where = str(path) if path else model.__name__
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}", param="config") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}", param="config") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of settings, not {type(loaded).__name__}", param="config")
        data = loaded or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value", param=key or "override")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part!r} is not a section", param=key)
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "config"
        raise ConfigError(f"{where}: {field}: {first['msg']}", param=field) from None
