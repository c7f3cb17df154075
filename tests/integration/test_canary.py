"""Canary rollouts on a real Serve app (`lmaas.serve.canary`), over real HTTP with API keys.

Models: `tiny:1` and `tiny:2` (random tiny Llamas, different seeds), `slow:1` (~47M parameters,
several times tiny's latency at 32 tokens) and `broken:1` (packaged with the wrong tokenizer: every generation fails).
Every served name splits between `tiny:1` and a canary; responses carry `X-Lmaas-Model-Version`,
so each test counts which side answered. The module ends with a schemathesis fuzz of the same gateway.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_port, http_status, wait_for  # noqa: E402
from serve_helpers import make_causal_lm, make_mismatched_lm  # noqa: E402

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.timeout(600)

APP = "lmaas-canary-test"
KEY = "lmaas_canarytest_" + "k" * 40
DEPLOY_KEY = "lmaas_canarydeploy_" + "d" * 40
ADMIN_KEY = "lmaas_canaryadmin_" + "a" * 40
BOB_KEY = "lmaas_canarybob_" + "b" * 40
"""Tenant `bob`'s key (deploy and models): another tenant than the one whose deployments these are."""
FUZZ_EXAMPLES = 3
"""schemathesis cases per operation and mode (valid, invalid input)."""
HEADER = "X-Lmaas-Model-Version"


@pytest.fixture(scope="module")
def gateway(ray_cluster, tmp_path_factory):
    """(base URL, canary store, database engine, registry) of a running app; Serve shuts down at module end."""
    from ray import serve

    from lmaas import db
    from lmaas.auth import KeyStore
    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry
    from lmaas.serve.canary import CanaryStore
    from lmaas.serve.deployments import build_app, run_app

    root = tmp_path_factory.mktemp("canary")
    settings = load_settings(home=root / "home")
    registry = ModelRegistry.from_settings(settings)
    for seed in (0, 1):
        registry.register_version("tiny", make_causal_lm(root / f"lm{seed}", seed=seed, max_seq_len=128), task="causal-lm")
    # ~47M parameters (~190 MB read per decoded token): decode time, not per-call overhead, sets its latency
    slow = make_causal_lm(root / "slow", size="small", max_seq_len=128, hidden_size=512, num_hidden_layers=16, intermediate_size=1408)
    registry.register_version("slow", slow, task="causal-lm")
    registry.register_version("broken", make_mismatched_lm(root / "broken"), task="causal-lm")
    engine = db.connect(settings.database_url)
    keys = KeyStore(engine)
    keys.create_key("default", ["inference"], create_tenant=True, secret=KEY)
    keys.create_key("default", ["inference", "deploy"], secret=DEPLOY_KEY)
    keys.create_key("default", ["admin"], secret=ADMIN_KEY)

    small = {"num_cpus": 0.05, "graceful_shutdown_timeout_s": 5, "health_check_period_s": 2, "refresh_interval_s": 0,
             "engine": {"num_threads": 1, "engine": "lmaas"}}  # the slow canary must stay slow (vLLM would serve it faster)
    canary = {"num_cpus": 0.05, "graceful_shutdown_timeout_s": 5, "min_requests": 1000}

    def model(name: str, **canary_options) -> dict:
        return {"ref": "tiny:1", "name": name, **small, "canary": {**canary, **canary_options}}

    args = {
        "models": [
            model("split", ref="tiny:2", weight=10),
            model("sticky", ref="tiny:2", weight=50, sticky=True),
            model("guarded", ref="slow:1", weight=30, min_requests=6, max_latency_ratio=2, window_s=120),
            model("promoted", ref="tiny:2", weight=50, min_requests=4, promote_after_s=6, window_s=120, max_latency_ratio=100),  # a cold first call is no verdict here
            model("broken", ref="broken:1", weight=50, min_requests=5, max_error_rate=0.2, window_s=120, max_latency_ratio=100),
        ],
        "ingress": {"num_cpus": 0.05},
        "env": settings.env(),
        "tenant_caps": {"tenants": {"bob": {"max_deployments": 0}}},  # (what each tenant may deploy; bob: nothing more)
    }
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        run_app(build_app(args), APP)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_status(base + "/healthz") == 200, 60, "Serve ingress")
        yield base, CanaryStore(engine), engine, registry
    finally:
        serve.shutdown()
        _kill_applier(settings.env())


def _kill_applier(env: dict) -> None:
    import ray

    from lmaas.serve.deployments import applier

    try:
        ray.kill(applier(env))
    except Exception:  # noqa: BLE001
        pass


def complete(base: str, model: str, *, user: str | None = None, max_tokens: int = 4, client=None) -> tuple[int, str | None]:
    """(status, version header) of one completion."""
    body = {"model": model, "prompt": "def f(x):", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if user is not None:
        body["user"] = user
    post = (client or httpx).post
    r = post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    return r.status_code, r.headers.get(HEADER) or r.text[:200]


def test_weighted_split_sends_about_ten_percent_to_the_canary(gateway):
    base = gateway[0]
    with httpx.Client() as client:
        answers = [complete(base, "split", client=client) for _ in range(100)]
    assert {s for s, _ in answers} == {200}
    versions = [v for _, v in answers]
    assert set(versions) <= {"tiny:1", "tiny:2"}
    assert 1 <= versions.count("tiny:2") <= 22, versions.count("tiny:2")  # Binomial(100, 0.1): 10 +- 4 sd


def test_sticky_split_keeps_each_user_on_one_side(gateway):
    base = gateway[0]
    seen = {}
    with httpx.Client() as client:
        for i in range(12):
            seen[f"user-{i}"] = {complete(base, "sticky", user=f"user-{i}", max_tokens=1, client=client)[1] for _ in range(4)}
    assert all(len(v) == 1 for v in seen.values()), seen
    assert set().union(*seen.values()) == {"tiny:1", "tiny:2"}  # 50/50 over 12 users: both sides (p of not ~ 5e-4)


def _audit(engine, action: str) -> list[dict]:
    import sqlalchemy as sa

    from lmaas.db.schema import events

    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(events).where(events.c.action == action)).mappings()]


class Loop:
    """Clients calling `model` in threads until stopped; every answer (status, version) is kept."""

    def __init__(self, base: str, model: str, threads: int = 3, max_tokens: int = 4) -> None:
        self.base, self.model, self.answers, self._stop = base, model, [], threading.Event()
        self.max_tokens = max_tokens
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                try:
                    self.answers.append(complete(self.base, self.model, client=client, max_tokens=self.max_tokens))
                except Exception as exc:  # noqa: BLE001 - a failed request is a finding
                    self.answers.append((0, repr(exc)))

    def __enter__(self) -> "Loop":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def test_slow_canary_is_rolled_back_while_clients_run(gateway):
    base, store, engine, _ = gateway
    with Loop(base, "guarded", threads=2, max_tokens=32) as loop:  # 32 tokens: decode time, not overhead, sets the latency
        wait_for(lambda: store.get(APP, "guarded") is not None and store.get(APP, "guarded").state == "rolled_back", 180, "rollback")
        rolled_back_at = len(loop.answers)
        time.sleep(3)  # past the gateway's state TTL: no more canary answers
        settled = len(loop.answers)
        time.sleep(3)
    assert [a for a in loop.answers if a[0] != 200] == []
    assert "slow:1" in {v for _, v in loop.answers[:rolled_back_at]}
    assert {v for _, v in loop.answers[settled:]} == {"tiny:1"}
    state = store.get(APP, "guarded")
    assert state.routed_weight == 0 and "p99" in state.reason
    events = [e for e in _audit(engine, "deployment.canary.rollback") if e["target"] == f"{APP}/guarded"]
    assert len(events) == 1 and "p99" in events[0]["detail"]["reason"] and events[0]["detail"]["canary"]["requests"] >= 6


def test_broken_canary_is_rolled_back_on_error_rate_while_clients_get_answers(gateway):
    base, store, engine, _ = gateway
    with Loop(base, "broken", threads=2) as loop:
        wait_for(lambda: store.get(APP, "broken") is not None and store.get(APP, "broken").state == "rolled_back", 120, "rollback")
        time.sleep(2)  # past the gateway's state TTL
        settled = len(loop.answers)
        wait_for(lambda: len(loop.answers) >= settled + 4, 60, "answers after the rollback")
    # the canary failed every request it got; the gateway answered each one from the stable version
    assert [a for a in loop.answers if a[0] != 200] == []
    assert {v for _, v in loop.answers} == {"tiny:1"}
    state = store.get(APP, "broken")
    assert state.routed_weight == 0 and "error rate" in state.reason
    events = [e for e in _audit(engine, "deployment.canary.rollback") if e["target"] == f"{APP}/broken"]
    assert len(events) == 1 and "max_error_rate" in events[0]["detail"]["reason"], events
    canary = events[0]["detail"]["canary"]
    assert canary["requests"] >= 5 and canary["errors"] == canary["requests"], canary


def test_healthy_canary_is_promoted(gateway):
    from ray import serve

    base, store, engine, _ = gateway
    with Loop(base, "promoted", threads=2) as loop:
        wait_for(lambda: (store.get(APP, "promoted") or store.get(APP, "nothing")) is not None
                 and store.get(APP, "promoted").state == "promoted", 120, "promotion")
        time.sleep(2)  # past the gateway's state TTL: every replica sends all of it to the canary
        promoted_at = len(loop.answers)

        def redeployed() -> bool:  # the promotion's redeploy is done: tiny:2 is the stable version, no canary left
            listed = _listed(base).get("promoted") or {}
            return listed.get("ref") == "tiny:2" and (listed.get("change") or {}).get("op") == "promote" \
                and listed["change"].get("status") == "done"

        wait_for(redeployed, 180, "the promotion redeploy")
        after = len(loop.answers)
        wait_for(lambda: len(loop.answers) >= after + 6, 120, "answers after the redeploy")
    events = [e for e in _audit(engine, "deployment.canary.promote") if e["target"] == f"{APP}/promoted"]
    assert len(events) == 1 and "healthy" in events[0]["detail"]["reason"]
    failed = [a for a in loop.answers if a[0] != 200]
    assert len(failed) <= 2, failed  # a redeploy may refuse a request or two while the old gateway drains
    # from the promotion on, through the redeploy, no answer came from the old version
    assert {v for s, v in loop.answers[promoted_at:] if s == 200} == {"tiny:2"}, loop.answers[promoted_at:][:20]
    assert _listed(base)["promoted"]["canary"] is None
    # the canary's deployment, replicas and all, became the stable one
    deployments = serve.status().applications[APP].deployments
    assert "model-promoted-canary" in deployments and "model-promoted" not in deployments, sorted(deployments)


def _deployments(base: str, key: str = DEPLOY_KEY) -> httpx.Response:
    return httpx.get(base + "/api/v1/deployments", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _steady(method: str, url: str, **kwargs) -> httpx.Response:
    """One request, tried again for up to 60 s while the gateway restarts (a deploy replaces its replicas)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            response = httpx.request(method, url, timeout=60, **kwargs)
            if response.status_code not in (502, 503, 504) or time.monotonic() > deadline:
                return response
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def _listed(base: str) -> dict[str, dict]:
    """Deployments by name; {} while the gateway cannot answer (a redeploy on a loaded machine): callers wait for a state."""
    try:
        r = _deployments(base)
    except httpx.TimeoutException:
        return {}
    return {d["name"]: d for d in r.json()["data"]} if r.status_code == 200 else {}


def test_cli_lists_a_remote_gateways_deployments(gateway):
    import os
    import subprocess

    from conftest import BIN

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"LMAAS_URL": gateway[0], "LMAAS_API_KEY": DEPLOY_KEY, "COLUMNS": "250"}
    result = subprocess.run([str(BIN / "lmaas"), "deployments"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tiny:2 10% running" in next(line for line in result.stdout.splitlines() if " split " in line), result.stdout


def test_deployments_rest_api(gateway):
    base = gateway[0]
    auth = {"Authorization": f"Bearer {DEPLOY_KEY}"}
    assert _deployments(base, KEY).status_code == 403  # inference only: no `deploy` scope
    listed = _listed(base)
    assert listed["split"]["canary"]["ref"] == "tiny:2" and listed["split"]["canary"]["state"] == "running"
    bad = httpx.patch(base + "/api/v1/deployments/split", json={"weight": 150}, headers=auth, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "weight"
    unknown = httpx.post(base + "/api/v1/deployments", json={"ref": "nope:9"}, headers=auth, timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "ref"
    bad_canary = httpx.post(base + "/api/v1/deployments", json={"ref": "tiny:1", "canary": {"ref": "tiny:2", "weight": 150}}, headers=auth, timeout=60)
    assert bad_canary.status_code == 400 and "weight" in bad_canary.json()["error"]["param"]

    body = {"ref": "tiny:1", "name": "rest-m", "min_replicas": 0, "initial_replicas": 0, "num_cpus": 0.05,
            "canary": {"ref": "tiny:2", "weight": 20, "min_replicas": 0, "initial_replicas": 0, "num_cpus": 0.05}}
    created = httpx.post(base + "/api/v1/deployments", json=body, headers=auth, timeout=60)
    assert created.status_code == 202, created.text
    assert created.json()["deployment"]["canary"]["weight"] == 20 and created.json()["change"]["status"] == "pending"
    # done: the applier's deploy returned, so the deployment's record is written
    wait_for(lambda: (_listed(base).get("rest-m") or {}).get("change", {}).get("status") == "done", 180, "the created deployment")
    # the deployment is recorded: its versions show it in their lineage and cannot be archived or deleted
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert _listed(base)["rest-m"]["tenant"] == "default"
    refused = _steady("POST", base + "/api/v1/models/tiny/versions/2/archive", headers=admin)  # (archiving is undone easily, were it let through)
    assert refused.status_code == 409 and f"{APP}/rest-m" in refused.json()["error"]["message"], refused.text
    # (the fixture's own served names, started without `lmaas deploy`, are recorded by the gateway: split and sticky serve tiny:1 too)
    serving = set(_steady("GET", base + "/api/v1/models/tiny/versions/1/lineage", headers=admin).json()["deployments"])
    assert {f"{APP}/rest-m", f"{APP}/split", f"{APP}/sticky"} <= serving, serving
    patched = httpx.patch(base + "/api/v1/deployments/rest-m", json={"weight": 40}, headers=auth, timeout=60)
    assert patched.status_code == 202 and patched.json()["deployment"]["canary"]["weight"] == 40
    try:
        wait_for(lambda: (_listed(base).get("rest-m") or {}).get("change", {}).get("status") == "done"
                 and _listed(base)["rest-m"]["canary"]["weight"] == 40, 180, "the patched weight")
    except TimeoutError:
        raise AssertionError(f"the patched weight, not ready after 180 s: {_listed(base).get('rest-m')}") from None
    deleted = httpx.delete(base + "/api/v1/deployments/rest-m", headers=auth, timeout=60)
    assert deleted.status_code == 202 and deleted.json()["deployment"] is None
    wait_for(lambda: "rest-m" not in _listed(base) and "split" in _listed(base), 180, "the deleted deployment")
    wait_for(lambda: f"{APP}/rest-m" not in _steady("GET", base + "/api/v1/models/tiny/versions/1/lineage", headers=admin).json()["deployments"], 60,
             "the deleted deployment's record")
    actions = {e["action"] for e in _audit(gateway[2], "deployment.deploy") + _audit(gateway[2], "deployment.undeploy")}
    assert actions == {"deployment.deploy", "deployment.undeploy"}


def test_another_tenants_deployments_cannot_be_taken_over(gateway, tmp_path):
    """bob (deploy scope, his own model) tries to replace, change, remove and read the default tenant's deployments."""
    from lmaas.auth import KeyStore

    base, _, engine, registry = gateway
    KeyStore(engine).create_key("bob", ["inference", "deploy", "models:read"], create_tenant=True, secret=BOB_KEY)
    registry.acting_for("bob").register_version("bob-lm", make_causal_lm(tmp_path / "bob", seed=3, max_seq_len=128), task="causal-lm")
    bob = {"Authorization": f"Bearer {BOB_KEY}"}

    def kept() -> dict:
        listed = _listed(base)
        return {n: (d["ref"], d["tenant"], d["canary"]["ref"], d["canary"]["weight"]) for n, d in listed.items() if n in ("split", "sticky")}

    wait_for(lambda: {"split", "sticky"} <= set(kept()), 120, "the gateway's listing")  # (a previous test's redeploy may still be settling)
    before = kept()
    assert before["split"] == ("tiny:1", "default", "tiny:2", 10), before
    taken = _steady("POST", base + "/api/v1/deployments", json={"ref": "bob-lm", "name": "split", "num_cpus": 0.05}, headers=bob)
    assert taken.status_code == 409 and taken.json()["error"]["param"] == "name", taken.text
    for method, body in (("PATCH", {"weight": 90}), ("PATCH", {"ref": "bob-lm"}), ("DELETE", None)):
        r = _steady(method, base + "/api/v1/deployments/split", json=body, headers=bob)
        assert r.status_code == 404 and r.json()["error"]["param"] == "name", (method, r.text)
    assert _steady("GET", base + "/api/v1/deployments/split", headers=bob).status_code == 404
    assert _steady("GET", base + "/api/v1/deployments", headers=bob).json()["data"] == []
    hidden = _steady("POST", base + "/api/v1/deployments", json={"ref": "tiny:1", "name": "bob-tiny"}, headers=bob)
    assert hidden.status_code == 404 and hidden.json()["error"]["param"] == "ref"
    # caps for non-admins: replicas, CPUs, GPUs; custom resources are an admin's
    for extra, param in (({"num_gpus": 8}, "num_gpus"), ({"max_replicas": 50}, "max_replicas"), ({"num_cpus": 64}, "num_cpus"),
                         ({"resources": {"head": 1}}, "resources")):
        r = _steady("POST", base + "/api/v1/deployments", json={"ref": "bob-lm", "name": "bob-chat", **extra}, headers=bob)
        assert r.status_code == 403 and r.json()["error"]["param"] == param, (extra, r.text)
    counted = _steady("POST", base + "/api/v1/deployments", json={"ref": "bob-lm", "name": "bob-chat", "num_cpus": 0.05}, headers=bob)
    assert counted.status_code == 403 and counted.json()["error"]["param"] == "name" and "its limit" in counted.text, counted.text
    # the CLI against the gateway, with bob's key: none of them listed
    import os
    import subprocess

    from conftest import BIN

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"LMAAS_URL": base, "LMAAS_API_KEY": BOB_KEY, "COLUMNS": "250"}
    listed = subprocess.run([str(BIN / "lmaas"), "deployments"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and " split " not in listed.stdout and " sticky " not in listed.stdout, listed.stdout + listed.stderr
    wait_for(lambda: kept() == before, 30, "the default tenant's deployments, unchanged")


def test_oversized_bodies_get_413_on_every_route(gateway):
    base = gateway[0]
    auth = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    big = b'{"name": "' + b"x" * (4 * 1024 * 1024 + 1) + b'"}'  # the default ingress.max_body_bytes is 4 MiB
    for path in ("/v1/completions", "/api/v1/tenants", "/api/v1/deployments"):
        r = httpx.post(base + path, content=big, headers=auth, timeout=60)
        assert r.status_code == 413, (path, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] == "request_too_large"


def test_schemathesis_finds_no_server_error_or_schema_violation(gateway):
    """Fuzz every operation of the gateway's `/openapi.json` (`/v1` and `/api/v1`) as an admin: valid and invalid input.

    The same run from a shell: see README, "Security". Bounded: `FUZZ_EXAMPLES` cases per operation and
    mode, derandomized (the same cases each run) so the suite stays repeatable.
    """
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

    base = gateway[0]
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    schema = schemathesis.openapi.from_url(base + "/openapi.json", headers=headers, timeout=30)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures, statuses, operations = [], [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith(("/v1/", "/api/v1/")):
            continue  # /healthz, /readyz: no input, and /readyz's 503 while replicas update is its documented answer
        operations.append(operation.label)
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def fuzz(case) -> None:  # noqa: ANN001
                response = case.call(base_url=base, headers=headers, timeout=60)
                statuses.append(response.status_code)
                try:
                    case.validate_response(response, checks=checks, headers=headers)
                except BaseException as exc:  # noqa: BLE001 - schemathesis raises a group of failures; keep going
                    failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {str(exc)[:400]}")

            try:
                fuzz()
            except Unsatisfiable:  # no invalid input exists for this operation (a bare GET)
                pass
    assert "POST /api/v1/deployments" in operations and "POST /v1/chat/completions" in operations
    assert len(statuses) >= 2 * len(operations)
    assert failures == [], "\n".join(failures[:20])

