"""Settings: defaults under LMAAS_HOME, URI normalization, clear errors for bad values."""

from pathlib import Path

import pytest

from pydantic import BaseModel, Field

from lmaas.config import Settings, load_config, load_settings, normalize_storage_uri, redact_url
from lmaas.errors import ConfigError


def test_defaults_live_under_home(lmaas_env, tmp_path):
    settings = load_settings()
    home = tmp_path / "home"
    assert settings.home == home
    assert settings.storage == f"file://{home / 'store'}"
    assert settings.database_url == f"sqlite:///{home / 'lmaas.db'}"
    assert settings.ray_address is None
    assert settings.s3_endpoint_url is None


def test_environment_overrides(lmaas_env, monkeypatch):
    monkeypatch.setenv("LMAAS_STORAGE", "s3://bucket/some/prefix/")
    monkeypatch.setenv("LMAAS_DATABASE_URL", "postgresql://u:secret@db.example:5432/lmaas")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    settings = load_settings()
    assert settings.storage == "s3://bucket/some/prefix"
    assert settings.database_url.startswith("postgresql://")
    assert settings.ray_address == "ray://head:10001"
    assert settings.s3_endpoint_url == "http://127.0.0.1:9000"
    env = settings.env()
    assert env["LMAAS_STORAGE"] == "s3://bucket/some/prefix"
    assert env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9000"
    # the same settings come back from the variables a worker receives
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert load_settings() == settings


def test_a_jobs_environment_carries_no_credentials(lmaas_env, monkeypatch):
    """What a queued job's runtime_env gets (the dashboard shows it): settings, never a password or a cloud key."""
    monkeypatch.setenv("LMAAS_DATABASE_URL", "postgresql://u:hunter2@db.example:5432/lmaas")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrEXAMPLEKEY")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("LMAAS_VERIFY_KEY", "ab" * 32)
    monkeypatch.setenv("LMAAS_SIGNING_KEY", "cd" * 32)
    settings = load_settings()
    full, public = settings.env(), settings.env(secrets=False)
    assert "hunter2" in full["LMAAS_DATABASE_URL"] and full["AWS_SECRET_ACCESS_KEY"] == "wJalrEXAMPLEKEY"
    text = " ".join(f"{k}={v}" for k, v in public.items())
    for secret in ("hunter2", "AKIAEXAMPLE", "wJalrEXAMPLEKEY", "cd" * 32):
        assert secret not in text
    assert public["AWS_REGION"] == "eu-west-1" and public["LMAAS_VERIFY_KEY"] == "ab" * 32 and "LMAAS_SIGNING_KEY" not in full
    monkeypatch.setenv("LMAAS_DATABASE_URL", "sqlite:////tmp/lmaas.db")
    assert load_settings().env(secrets=False)["LMAAS_DATABASE_URL"] == "sqlite:////tmp/lmaas.db"  # nothing secret in it


def test_a_workers_environment_passes_credentials_by_a_file_only_its_user_reads(lmaas_env, monkeypatch):
    """`worker_env` (Serve apps, job drivers, helper actors): the credentials' names and a 0600 file's path, never their values;
    a process started with it gets them back from the file, and its own environment's values win."""
    import json
    import os
    import subprocess
    import sys

    monkeypatch.setenv("LMAAS_DATABASE_URL", "postgresql://u:hunter2@db.example:5432/lmaas")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrEXAMPLEKEY")
    env = load_settings().worker_env()
    text = " ".join(f"{k}={v}" for k, v in env.items())
    assert "hunter2" not in text and "AKIAEXAMPLE" not in text and "wJalrEXAMPLEKEY" not in text
    path = env["LMAAS_SECRETS_FILE"]
    assert env["LMAAS_SECRET_NAMES"] == "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY,LMAAS_DATABASE_URL"
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(os.path.dirname(path)).st_mode & 0o077 == 0
    assert load_settings().worker_env() == env  # the same content, the same file: a redeploy does not restart replicas

    def worker(extra: dict[str, str]) -> dict:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("LMAAS_", "AWS_"))}
        code = "import json, os, lmaas; from lmaas.config import load_settings; s = load_settings(); " \
               "print(json.dumps({'db': s.database_url, 'key': os.environ.get('AWS_SECRET_ACCESS_KEY')}))"
        out = subprocess.run([sys.executable, "-c", code], env={**base, **env, **extra}, capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr.strip().splitlines()[-1]}

    assert worker({}) == {"db": "postgresql://u:hunter2@db.example:5432/lmaas", "key": "wJalrEXAMPLEKEY"}
    assert worker({"AWS_SECRET_ACCESS_KEY": "the-nodes-own"})["key"] == "the-nodes-own"
    os.remove(path)
    assert "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, LMAAS_DATABASE_URL unset on this node" in worker({})["error"]


def test_s3_specific_endpoint_wins(lmaas_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:2")
    assert load_settings().s3_endpoint_url == "http://s3only:2"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/data/store/", "file:///data/store"),
        ("file:///data/store", "file:///data/store"),
        ("s3://b", "s3://b"),
        ("s3://b/p/q/", "s3://b/p/q"),
    ],
)
def test_storage_uri_normalization(uri, expected):
    assert normalize_storage_uri(uri) == expected


def test_relative_storage_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_storage_uri("store") == f"file://{tmp_path / 'store'}"


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("LMAAS_STORAGE", "gs://bucket/x", "unsupported scheme 'gs'"),
        ("LMAAS_STORAGE", "s3:///nobucket", "needs a bucket"),
        ("LMAAS_STORAGE", "file://host/path", "absolute path"),
        ("LMAAS_DATABASE_URL", "not a url", "not a database URL"),
        ("LMAAS_DATABASE_URL", "mysql://u@h/db", "unsupported database 'mysql'"),
    ],
)
def test_bad_settings_raise_config_error_naming_the_variable(lmaas_env, monkeypatch, variable, value, words):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert words in info.value.message
    assert variable in info.value.message


def test_password_is_redacted():
    assert redact_url("postgresql://u:hunter2@h/db") == "postgresql://u:***@h/db"
    assert "hunter2" not in redact_url("postgresql://u:hunter2@h/db")
    assert redact_url("sqlite:////x.db") == "sqlite:////x.db"


def test_settings_are_immutable(lmaas_env):
    settings = Settings()
    with pytest.raises(Exception):
        settings.storage = "s3://other"  # type: ignore[misc]


def test_empty_ray_address_means_local(lmaas_env, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "  ")
    assert load_settings().ray_address is None


def test_home_expands_user(monkeypatch, lmaas_env):
    monkeypatch.setenv("HOME", "/tmp/somebody")
    monkeypatch.setenv("LMAAS_HOME", "~/lm")
    assert load_settings().home == Path("/tmp/somebody/lm")


class Optim(BaseModel):
    lr: float = 1e-3
    betas: list[float] = [0.9, 0.95]


class JobConfig(BaseModel):
    name: str = "run"
    workers: int = Field(2, ge=1)
    optim: Optim = Optim()


def test_load_config_defaults_file_and_overrides(tmp_path):
    assert load_config(JobConfig) == JobConfig()
    path = tmp_path / "job.yaml"
    path.write_text("name: tiny\noptim:\n  lr: 0.01\n")
    config = load_config(JobConfig, path, ["workers=4", "optim.betas=[0.8, 0.9]", "name=from-cli"])
    assert config.name == "from-cli"
    assert config.workers == 4
    assert config.optim.lr == 0.01
    assert config.optim.betas == [0.8, 0.9]


@pytest.mark.parametrize(
    ("content", "overrides", "words"),
    [
        ("workers: 0\n", [], "workers"),
        ("- a list\n", [], "must be a mapping"),
        ("name: [unclosed\n", [], "not valid YAML"),
        ("", ["workers"], "not key=value"),
        ("name: tiny\n", ["name.deep=1"], "not a section"),
        ("", ["optim.lr=fast"], "optim.lr"),
    ],
)
def test_load_config_errors_name_the_field(tmp_path, content, overrides, words):
    path = tmp_path / "job.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=words):
        load_config(JobConfig, path, overrides)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(JobConfig, tmp_path / "nope.yaml")
