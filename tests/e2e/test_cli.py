"""The `lmaas` CLI as a user runs it: real subprocesses, real servers, one-line errors."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

import lmaas
from lmaas import db

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import wait_for  # noqa: E402


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
    data = json.loads(result.stdout)
    assert [n["cpus"] for n in data["nodes"]] == [2.0] and data["nodes"][0]["alive"] and data["nodes"][0]["head"]
    assert data["resources"]["total"]["CPU"] == 2.0 and isinstance(data["deployments"], list) and data["jobs"] == []
    assert isinstance(data["traffic"], dict)  # model -> recent requests and 5xx of the gateway (none runs here)
    table = cli("status", env=env, timeout=240)
    assert table.returncode == 0, table.stderr
    for word in ("nodes", "alive", "free:", "jobs: none queued or running"):
        assert word in table.stdout, word


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


def free_port() -> int:
    return closed_port()


def assert_quickstart_steps(stdout: str, *, trained: str, port: int) -> None:
    """Every step quickstart reports, in its words."""
    assert "What quickstart did" in stdout
    assert f"tiny-lm:1 (alias production) {trained}" in stdout
    reused = trained == "reused"
    assert f"tiny-lm:2 (alias int8) int8-dynamic of tiny-lm:1 {'reused' if reused else 'measured and registered'}" in stdout
    assert f"minilm:1 (pretrained embedding model) {'reused' if reused else 'registered'}" in stdout
    lm = "vllm" if importlib.util.find_spec("vllm") else "lmaas"  # the demo's LM serves on vLLM wherever it is installed (make test installs it)
    served = f"tiny-lm -> tiny-lm:1 ({lm}), tiny-lm-int8 -> tiny-lm:2 (lmaas), minilm -> minilm:1 (lmaas) at http://127.0.0.1:{port}/v1"
    assert served in stdout
    assert "POST /v1/completions" in stdout and "24 tokens" in stdout
    assert "POST /v1/chat/completions   tiny-lm-int8, stream:" in stdout
    assert "minilm: 2 x 384 floats" in stdout
    assert "tiny-lm:2 <- compress-int8-dynamic of tiny-lm:1 <- trained on stdlib-demo:1" in stdout
    assert f"curl http://127.0.0.1:{port}/v1/completions" in stdout
    assert "API key for this demo (scope inference, expires in 30 days): lmaas_" in stdout


def printed_key(stdout: str) -> str:
    return next(line.split("=", 1)[1].strip() for line in stdout.splitlines() if line.strip().startswith("export LMAAS_API_KEY="))


def assert_demo_registry(registry) -> None:
    """What quickstart says it registered is in the registry, with lineage and the compression report."""
    production, int8, minilm = registry.resolve("tiny-lm@production"), registry.resolve("tiny-lm@int8"), registry.resolve("minilm")
    assert (production.ref, production.dataset, production.task) == ("tiny-lm:1", "stdlib-demo:1", "causal-lm")
    assert (int8.ref, int8.parent, int8.run) == ("tiny-lm:2", "tiny-lm:1", "compress-int8-dynamic")
    assert 0 < int8.metrics["size_ratio"] < 0.5  # measured, stored with the version
    assert (minilm.ref, minilm.task) == ("minilm:1", "embedding")
    registry.verify(minilm.ref)


def test_quickstart_starts_its_own_cluster_then_a_second_run_joins_one_and_reuses_everything(cli, lmaas_env, ray_cluster, s3_server, postgres_url):
    """What `make demo` runs, then the same on a cluster it joins, both against S3 and PostgreSQL.

    The first run starts its own local cluster (no RAY_ADDRESS), as `make demo` does; its endpoints
    stop with it. The second joins the session's cluster, reuses what the first made (dataset,
    models) and leaves its deployments up: call them as a user would. It hands out a fresh key,
    revoking the first one's. Both run with signing keys and `LMAAS_REQUIRE_SIGNATURE=1`: every
    version quickstart registers (trained, compressed, imported) is signed, and its replicas load
    them only after checking that. (The embedded defaults, SQLite and local files, run the same
    steps in the README tour.)
    """
    from openai import AuthenticationError, OpenAI
    from ray import serve

    from lmaas.registry.store import generate_signing_key

    private, public = generate_signing_key()
    env = {
        **lmaas_env,
        "LMAAS_STORAGE": s3_server.uri("quickstart"),
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "LMAAS_DATABASE_URL": postgres_url,
        "LMAAS_SIGNING_KEY": private, "LMAAS_VERIFY_KEY": public, "LMAAS_REQUIRE_SIGNATURE": "1",
    }
    port = free_port()
    keys: list[str] = []
    try:
        first = cli("quickstart", "--tasks", "2", "--corpus-files", "10", "--train-steps", "6", "--port", str(port), env=env, timeout=400)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "started a local cluster" in first.stdout and "Traceback" not in first.stderr
        assert "stdlib-demo:1 created" in first.stdout
        assert_quickstart_steps(first.stdout, trained="trained and registered", port=port)
        assert "the endpoints stop with it" in first.stdout
        assert "created tenant default and its admin key" in first.stdout
        keys.append(printed_key(first.stdout))

        joined = {**env, "RAY_ADDRESS": ray_cluster.address_info["gcs_address"]}
        second = cli("quickstart", "--tasks", "2", "--corpus-files", "10", "--train-steps", "6", "--port", str(port), env=joined, timeout=400)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "joined" in second.stdout and "Traceback" not in second.stderr
        assert "stdlib-demo:1 unchanged" in second.stdout  # the second run reuses the dataset version
        assert_quickstart_steps(second.stdout, trained="reused", port=port)
        assert "The deployments stay up on the cluster" in second.stdout
        assert "created tenant default and its admin key" not in second.stdout  # shown once
        keys.append(printed_key(second.stdout))

        denied = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="lmaas_nope", max_retries=0, timeout=60)
        with pytest.raises(Exception, match="401|invalid_api_key"):
            denied.models.list()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=keys[1], max_retries=0, timeout=60)
        assert {m.id for m in client.models.list().data} >= {"tiny-lm", "tiny-lm-int8", "minilm"}
        out = client.completions.create(model="tiny-lm-int8", prompt="def ", max_tokens=5, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5
        assert len(client.embeddings.create(model="minilm", input="hello").data[0].embedding) == 384
        # each run revokes the key the run before handed out (the gateway caches a key for 2 s)
        first_client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=keys[0], max_retries=0, timeout=60)

        def first_key_refused() -> bool:
            try:
                first_client.models.list()
            except AuthenticationError:  # 401; any other error fails the test
                return True
            return False

        wait_for(first_key_refused, 10, "the first run's key refused", interval=0.5)
    finally:
        serve.shutdown()

    from lmaas.auth import KeyStore
    from lmaas.registry import ModelRegistry
    from lmaas.storage import Storage

    storage = Storage(s3_server.uri("quickstart"), endpoint_url=s3_server.endpoint)
    summaries = storage.list_published("selfcheck")
    assert len(summaries) == 2  # one self-check per run
    for summary in summaries:
        storage.verify(summary)
    assert any(p.endswith("/loss.png") for p in storage.list("runs"))  # checkpoints and run record on S3
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    assert_demo_registry(ModelRegistry(storage, engine))
    verifying = ModelRegistry(storage, engine, verify_key=bytes.fromhex(public), require_signature=True)
    for ref in ("tiny-lm@production", "tiny-lm@int8", "minilm"):
        assert verifying.verify(ref).signature, ref
    active = [k for k in KeyStore(db.connect(postgres_url)).list_keys(include_revoked=False) if k.name == "quickstart demo"]
    assert len(active) == 1 and keys[0] != keys[1]
    with engine.connect() as conn:
        actions = [r[0] for r in conn.execute(sa.text("select action from events order by id"))]
    assert actions.count("model.register") == 3 and actions.count("alias.set") == 3  # tiny-lm:1, tiny-lm:2, minilm:1, once
    assert actions.count("selfcheck") == 2
    engine.dispose()


def test_status_without_s3_credentials_says_so(cli, lmaas_env):
    env = {k: v for k, v in lmaas_env.items() if not k.startswith("AWS_")}
    env.update(LMAAS_STORAGE="s3://nope/x", AWS_ENDPOINT_URL="http://127.0.0.1:9", HOME=lmaas_env["LMAAS_HOME"])
    assert_one_line_error(cli("status", env=env, timeout=60), "no S3 credentials", "AWS_ACCESS_KEY_ID")
