"""Ray connection helpers that need no running cluster: address checks, runtime environment."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import lmaas
from lmaas import cluster
from lmaas.config import Settings
from lmaas.errors import ConfigError, UnreachableError


def test_runtime_env_carries_settings_and_ships_the_package_when_asked(tmp_path, lmaas_env):
    settings = Settings(home=tmp_path, storage="s3://b/p", s3_endpoint_url="http://127.0.0.1:9000")
    local = cluster.runtime_env(settings, ship_package=False)
    assert "py_modules" not in local
    assert local["env_vars"]["LMAAS_STORAGE"] == "s3://b/p"
    assert local["env_vars"]["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9000"
    assert local["env_vars"]["LMAAS_DATABASE_URL"] == settings.database_url
    remote = cluster.runtime_env(settings, ship_package=True)
    [module] = remote["py_modules"]
    assert Path(module) == Path(lmaas.__file__).parent
    assert (Path(module) / "storage.py").exists()


@pytest.mark.parametrize(
    ("address", "remote"),
    [("ray://head:10001", True), ("127.0.0.1:6379", False), ("localhost:6379", False), ("203.0.113.9:6379", True)],
)
def test_remote_addresses_are_recognized(address, remote):
    assert cluster.is_remote(address) is remote


def test_probe_fails_fast_on_a_closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UnreachableError, match=f"127.0.0.1:{port} is unreachable"):
        cluster.probe(f"127.0.0.1:{port}", timeout=1)


def test_probe_accepts_a_listening_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cluster.probe(f"ray://127.0.0.1:{s.getsockname()[1]}", timeout=1)


@pytest.mark.parametrize("address", ["nonsense", "host:", ":6379", "host:port"])
def test_probe_rejects_malformed_addresses(address):
    with pytest.raises(ConfigError, match="RAY_ADDRESS"):
        cluster.probe(address)


def test_inside_a_ray_job_the_jobs_runtime_env_wins(tmp_path, lmaas_env, monkeypatch):
    import json

    settings = Settings(home=tmp_path)
    env = cluster.runtime_env(settings, ship_package=True)
    assert cluster._without_job_fields(env) == env  # not inside a job: unchanged
    job = {"runtime_env": {"working_dir": "gcs://pkg.zip", "py_modules": ["x"], "env_vars": {"LMAAS_HOME": "/job"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    merged = cluster._without_job_fields(env)
    assert "py_modules" not in merged
    assert "LMAAS_HOME" not in merged["env_vars"]
    assert merged["env_vars"]["LMAAS_STORAGE"] == settings.storage
