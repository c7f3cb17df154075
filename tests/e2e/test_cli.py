"""The `lmaas` CLI as a user runs it: real subprocesses, real servers, one-line errors."""

from __future__ import annotations

import json
import socket

import pytest
import sqlalchemy as sa

import lmaas
from lmaas import db


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released again: nothing listens there


def assert_one_line_error(result, *words: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def test_help_and_version(cli, lmaas_env):
    result = cli("--help", env=lmaas_env)
    assert result.returncode == 0
    for command in ("status", "quickstart", "version"):
        assert command in result.stdout
    result = cli("version", env=lmaas_env)
    assert result.returncode == 0 and result.stdout.strip() == lmaas.__version__


def test_status_without_a_cluster(cli, lmaas_env, tmp_path):
    result = cli("status", env=lmaas_env)
    assert result.returncode == 0, result.stderr
    for word in ("storage", "database", "ray", "SQLite", str(tmp_path / "home" / "store")):
        assert word in result.stdout
    data = json.loads(cli("status", "--json", env=lmaas_env).stdout)
    assert data["ok"] is True
    assert [c["name"] for c in data["components"]] == ["storage", "database", "ray"]
    ray_line = data["components"][2]
    assert ray_line["ok"] and ray_line["target"] == "local"


def test_status_with_a_running_cluster(cli, lmaas_env, ray_cluster):
    env = {**lmaas_env, "RAY_ADDRESS": ray_cluster.address_info["gcs_address"]}
    result = cli("status", "--json", env=env, timeout=240)
    assert result.returncode == 0, result.stderr
    ray_line = json.loads(result.stdout)["components"][2]
    assert ray_line["ok"] is True
    assert "1 node(s), 2 CPU, 0 GPU" in ray_line["detail"]


def test_status_against_s3_and_postgres(cli, lmaas_env, s3_server, postgres_url):
    env = {
        **lmaas_env,
        "LMAAS_STORAGE": s3_server.uri("status"),
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "LMAAS_DATABASE_URL": postgres_url,
    }
    result = cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    components = {c["name"]: c for c in json.loads(result.stdout)["components"]}
    assert components["storage"]["ok"] and "bucket reachable" in components["storage"]["detail"]
    assert components["database"]["detail"].startswith("PostgreSQL ")
    assert f"schema {db.head_revision()}" in components["database"]["detail"]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"LMAAS_STORAGE": "s3://nope/x", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, ("s3://nope/x", "unreachable")),
        ({"LMAAS_STORAGE": "gs://bucket"}, ("LMAAS_STORAGE", "unsupported scheme")),
        ({"LMAAS_DATABASE_URL": "oracle://x@y/z"}, ("LMAAS_DATABASE_URL", "unsupported database")),
        ({"LMAAS_DATABASE_URL": "postgresql://u:pw@127.0.0.1:{port}/db"}, ("database", "unreachable")),
        ({"RAY_ADDRESS": "127.0.0.1:{port}"}, ("Ray cluster", "unreachable")),
        ({"RAY_ADDRESS": "not-an-address"}, ("RAY_ADDRESS", "host:port")),
    ],
    ids=["s3-unreachable", "bad-scheme", "bad-db", "db-unreachable", "ray-unreachable", "ray-malformed"],
)
def test_status_bad_settings_fail_in_one_line(cli, lmaas_env, overrides, words):
    port = closed_port()
    env = {**lmaas_env, **{k: v.format(port=port) for k, v in overrides.items()}}
    result = cli("status", env=env, timeout=60)
    assert_one_line_error(result, *words)


def test_quickstart_joined_to_a_cluster_against_s3_and_postgres(cli, lmaas_env, ray_cluster, s3_server, postgres_url):
    env = {
        **lmaas_env,
        "RAY_ADDRESS": ray_cluster.address_info["gcs_address"],
        "LMAAS_STORAGE": s3_server.uri("quickstart"),
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "LMAAS_DATABASE_URL": postgres_url,
    }
    result = cli("quickstart", "--tasks", "2", "--corpus-files", "10", "--train-steps", "6", env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "What quickstart did" in result.stdout
    assert "joined" in result.stdout
    assert "tiny-lm:1 (alias production) trained and registered" in result.stdout

    from lmaas.storage import Storage

    storage = Storage(s3_server.uri("quickstart"), endpoint_url=s3_server.endpoint)
    [summary] = storage.list_published("selfcheck")
    storage.verify(summary)
    assert any(p.endswith("/loss.png") for p in storage.list("runs"))  # checkpoints and run record on S3
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        actions = [r[0] for r in conn.execute(sa.text("select action from events order by id"))]
    assert len([a for a in actions if a not in ("model.register", "alias.set")]) == 3  # the self-check's
    assert actions[-2:] == ["model.register", "alias.set"]  # the demo model, in PostgreSQL
    engine.dispose()


def test_quickstart_starts_its_own_cluster_and_runs_twice(cli, lmaas_env, tmp_path):
    """What `make demo` runs, on the embedded defaults; the second run must work too."""
    for run in ("created", "unchanged"):
        result = cli("quickstart", "--tasks", "2", "--corpus-files", "20", "--train-steps", "8", env=lmaas_env, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "started a local cluster" in result.stdout
        assert "What quickstart did" in result.stdout
        assert f"stdlib-demo:1 {run}" in result.stdout  # the second run reuses the dataset version
        trained = "trained and registered" if run == "created" else "reused"
        assert f"tiny-lm:1 (alias production) {trained}" in result.stdout  # ... and the model
        assert "Traceback" not in result.stderr
    store = tmp_path / "home" / "store" / "selfcheck"
    assert len(list(store.glob("*/summary/_manifest.json"))) == 2
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'home' / 'lmaas.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from events where action = 'selfcheck'")).scalar_one() == 2
    engine.dispose()


def test_status_without_s3_credentials_says_so(cli, lmaas_env):
    env = {k: v for k, v in lmaas_env.items() if not k.startswith("AWS_")}
    env.update(LMAAS_STORAGE="s3://nope/x", AWS_ENDPOINT_URL="http://127.0.0.1:9", HOME=lmaas_env["LMAAS_HOME"])
    assert_one_line_error(cli("status", env=env, timeout=60), "no S3 credentials", "AWS_ACCESS_KEY_ID")
