"""API keys, scopes, tenants, quotas, usage, feedback and the audit log.

Library tests run on SQLite and the real PostgreSQL server (`database_url`); HTTP tests start the
real apps on uvicorn: two OpenAI app "replicas" and one management app sharing one database, a
tiny random-weight LM owned by tenant `acme`, called with the real `openai` client and httpx.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from lmaas import db
from lmaas.auth import Auth, AuthConfig, KeyStore, Limits, Quotas
from lmaas.db.schema import api_keys, events, rate_counters
from lmaas.errors import AuthenticationError, InvalidInputError, RateLimitError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_port, wait_for  # noqa: E402
from serve_helpers import make_causal_lm  # noqa: E402

openai = pytest.importorskip("openai")


# ---- library, on SQLite and PostgreSQL ----


def test_keys_are_hashed_verified_expired_and_revoked(database_url):
    engine = db.connect(database_url)
    replica_a = KeyStore(engine, cache_ttl_s=0.5)
    # another process, another cache; it does not look for revocations here (see the next test), so the TTL alone applies
    replica_b = KeyStore(db.create_engine(database_url), cache_ttl_s=0.5, revocation_sync_s=3600)
    admin = replica_a.bootstrap()
    assert admin and admin.startswith("lmaas_") and replica_a.bootstrap() is None
    assert replica_b.verify(admin).is_admin

    key, secret = replica_a.create_key("acme", ["inference"], create_tenant=True, limits=Limits(rpm=5))
    with engine.connect() as conn:
        stored = conn.execute(sa.select(api_keys).where(api_keys.c.id == key.id)).mappings().one()
    assert secret not in str(dict(stored)) and stored["secret_sha256"] != secret
    principal = replica_b.verify(secret)
    assert (principal.tenant, principal.scopes, principal.key_limits.rpm) == ("acme", {"inference"}, 5)
    assert replica_a.get_key(key.id).last_used_at is not None

    assert replica_b.verify_cached(secret) == principal  # the gateway's path without the database
    assert replica_a.verify_cached(admin) is None  # never verified on this replica: the database must say

    replica_a.revoke_key(key.id)
    replica_b.verify(secret)  # still cached on the other replica...
    time.sleep(0.6)
    assert replica_b.verify_cached(secret) is None  # ...but not past the TTL
    with pytest.raises(AuthenticationError):
        replica_b.verify(secret)
    with pytest.raises(AuthenticationError):  # the refusal is cached too
        replica_b.verify_cached(secret)
    for bad in (None, "", "lmaas_nope", secret + "x"):
        with pytest.raises(AuthenticationError):
            replica_b.verify(bad)

    _, short = replica_a.create_key("acme", ["inference"], expires_in=0.3)
    replica_b.verify(short)
    time.sleep(0.4)
    with pytest.raises(AuthenticationError):
        replica_b.verify(short)


def test_revocation_reaches_every_replica_within_a_second_and_bad_keys_cannot_flush_the_cache(tmp_path):
    url = f"sqlite:///{tmp_path / 'lmaas.db'}"
    admin_side = KeyStore(db.connect(url))
    replica = KeyStore(db.create_engine(url), cache_ttl_s=60, failed_lookups_per_s=1000)  # another process, a long TTL
    key, secret = admin_side.create_key("acme", ["inference"], create_tenant=True)
    assert replica.verify(secret).key_id == key.id
    admin_side.revoke_key(key.id)
    revoked = time.monotonic()
    while True:  # the gateway's path: the cache first, the database (in a thread) when the cache cannot say
        try:
            replica.verify_cached(secret) or replica.verify(secret)
        except AuthenticationError:
            break
        assert time.monotonic() - revoked < 1.0, "still accepted a second after its revocation"
        time.sleep(0.02)

    # a flood of random keys evicts only other refusals, never the valid keys in the cache
    _, other = admin_side.create_key("acme", ["inference"])
    assert replica.verify(other).tenant == "acme"
    for i in range(2500):
        with pytest.raises(AuthenticationError):
            replica.verify(f"lmaas_flood{i}_" + "x" * 40)
    valid, refused = replica.cache_sizes()
    assert valid == 1 and refused <= 2000
    assert replica.verify_cached(other) is not None or replica.verify(other).tenant == "acme"

    # past the failed-lookup budget, unknown keys get 429 without a database query
    strict = KeyStore(db.create_engine(url), failed_lookups_per_s=2)  # bursts of 20
    outcomes = []
    for i in range(40):
        try:
            strict.verify(f"lmaas_burst{i}_" + "y" * 40)
        except (AuthenticationError, RateLimitError) as exc:
            outcomes.append(type(exc).__name__)
    assert outcomes.count("AuthenticationError") in range(20, 23) and outcomes.count("RateLimitError") >= 18, outcomes


def test_bad_key_input_names_the_field(database_url):
    keys = KeyStore(db.connect(database_url))
    cases = [
        (dict(scopes=["inference", "root"]), "scopes"),
        (dict(scopes=[]), "scopes"),
        (dict(scopes=["inference"], limits=Limits(rpm=-1)), "rpm"),
        (dict(scopes=["inference"], limits=Limits(tpd=-5)), "tpd"),
        (dict(scopes=["inference"], expires_in="3 fortnights"), "expires"),
        (dict(scopes=["inference"], expires_in="0d"), "expires"),
    ]
    for kwargs, param in cases:
        with pytest.raises(InvalidInputError) as info:
            keys.create_key("acme", create_tenant=True, **kwargs)
        assert info.value.param == param, (kwargs, info.value.message)
    with pytest.raises(InvalidInputError) as info:
        keys.create_key("../etc", ["inference"], create_tenant=True)
    assert info.value.param == "tenant"


def test_rate_limit_is_atomic_across_replicas(database_url):
    """Two 'replicas' (own engines, own caches) hammer one key concurrently: exactly `rpm` get in."""
    keys = KeyStore(db.connect(database_url))
    _, secret = keys.create_key("acme", ["inference"], create_tenant=True, limits=Limits(rpm=25))
    replicas = [Auth(db.create_engine(database_url)) for _ in range(2)]
    now = (int(time.time()) // 60) * 60 + 1.0  # one window for every attempt

    def attempt(i: int) -> bool:
        auth = replicas[i % 2]
        try:
            auth.quotas.admit(auth.keys.verify(secret), now=now)
            return True
        except RateLimitError as exc:
            assert exc.retry_after == 59 and exc.param == "rpm"
            return False

    with ThreadPoolExecutor(8) as pool:
        admitted = list(pool.map(attempt, range(60)))
    assert sum(admitted) == 25


def test_token_quota_and_usage(database_url):
    engine = db.connect(database_url)
    keys, quotas = KeyStore(engine), Quotas(engine)
    keys.create_tenant("acme", Limits(tpd=100))
    _, secret = keys.create_key("acme", ["inference"], limits=Limits(tpm=50))
    p = keys.verify(secret)
    now = (int(time.time()) // 86400) * 86400 + 10.0
    for i in range(3):
        quotas.admit(p, now=now)
        quotas.record(p, model="m", prompt_tokens=10, completion_tokens=10, response_id=f"r{i}", version="m:1", now=now)
    with pytest.raises(RateLimitError) as info:  # 60 >= 50 tokens this minute
        quotas.admit(p, now=now)
    assert info.value.param == "tpm"
    quotas.admit(p, now=now + 60)  # next minute
    quotas.record(p, model="m", prompt_tokens=30, completion_tokens=10, now=now + 60)
    with pytest.raises(RateLimitError) as info:  # the tenant's 100 tokens a day
        quotas.admit(p, now=now + 120)
    assert info.value.param == "tpd" and info.value.retry_after > 80000
    (row,) = quotas.usage(tenant="acme")
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (4, 60, 40, 100)
    with engine.connect() as conn:  # only the counters a limit reads
        assert {(r.subject.split(":")[0], r.window) for r in conn.execute(sa.select(rate_counters))} == {("key", "tpm"), ("tenant", "tpd")}
    free_key, free = keys.create_key("free", ["inference"], create_tenant=True)
    quotas.record(keys.verify(free), model="m", prompt_tokens=5, completion_tokens=5, now=now)  # no limits: usage only
    assert quotas.usage(tenant="free")[0]["total_tokens"] == 10
    with engine.connect() as conn:
        assert not conn.execute(sa.select(rate_counters).where(rate_counters.c.subject.in_([f"key:{free_key.id}", "tenant:free"]))).all()


def test_batch_tokens_count_apart_at_a_discount_against_the_daily_quota(database_url):
    engine = db.connect(database_url)
    keys, quotas = KeyStore(engine), Quotas(engine)
    keys.create_tenant("nightly", Limits(tpd=100))
    key, secret = keys.create_key("nightly", ["inference"])
    p = keys.verify(secret)
    now = (int(time.time()) // 86400) * 86400 + 10.0
    quotas.record(p, model="m", prompt_tokens=10, completion_tokens=10, now=now)
    quotas.record_batch(tenant="nightly", key_id=key.id, model="m", requests=30, prompt_tokens=90, completion_tokens=69, discount=0.5, now=now)
    (row,) = quotas.usage(tenant="nightly", batch_discount=0.5)
    assert (row["requests"], row["total_tokens"]) == (1, 20)  # online usage untouched
    assert (row["batch_requests"], row["batch_prompt_tokens"], row["batch_completion_tokens"], row["batch_total_tokens"]) == (30, 90, 69, 159)
    assert row["billable_tokens"] == 20 + 80  # 159 x 0.5, rounded up
    with pytest.raises(RateLimitError) as info:  # 20 online + 159 x 0.5 in a batch = the tenant's 100 tokens today
        quotas.admit(p, now=now)
    assert info.value.param == "tpd"
    quotas.admit(p, now=now + 86400)  # a new day
    assert quotas.usage(tenant="nightly", batch_discount=1.0)[0]["billable_tokens"] == 20 + 159


def test_usage_of_concurrent_requests_is_group_committed(database_url):
    """`UsageWriter`: 40 requests finishing at once share a few transactions, every one is counted
    (tokens, usage rows, response ids), each caller returns only after its record is committed, and a
    failed write fails the callers of its batch without losing the next batch."""
    import asyncio

    from lmaas.auth.quotas import UsageRecord, UsageWriter
    from lmaas.db.schema import responses

    engine = db.connect(database_url)
    keys, quotas = KeyStore(engine), Quotas(engine)
    keys.create_tenant("grp", Limits(tpd=10**6))
    _, secret = keys.create_key("grp", ["inference"], limits=Limits(tpm=10**6))
    p = keys.verify(secret)
    commits = []
    sa.event.listen(engine, "commit", lambda conn: commits.append(1))
    writer = UsageWriter(quotas)

    _, other_secret = keys.create_key("grp-other", ["inference"], create_tenant=True)
    other = keys.verify(other_secret)  # another tenant's requests in the same batches: its rows stay its own

    async def finish(i: int) -> bool:
        if i % 4 == 3:
            await writer.record(UsageRecord(other, "m", 100, 1, response_id=f"grp-other-{i}", version="m:1"))
        await writer.record(UsageRecord(p, "m", 3, i, response_id=f"grp-{i}", version="m:1"))
        with engine.connect() as conn:  # committed by the time the caller goes on
            return conn.execute(sa.select(responses.c.id).where(responses.c.id == f"grp-{i}")).first() is not None

    async def run() -> list[bool]:
        return await asyncio.gather(*(finish(i) for i in range(40)))

    assert all(asyncio.run(run()))
    assert 1 <= len(commits) <= 10, len(commits)  # one transaction per batch, not per request
    (row,) = quotas.usage(tenant="grp")
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (40, 120, sum(range(40)))
    (theirs,) = quotas.usage(tenant="grp-other")
    assert (theirs["requests"], theirs["prompt_tokens"], theirs["completion_tokens"]) == (10, 1000, 10)
    with engine.connect() as conn:
        tenants = {r.id: r.tenant for r in conn.execute(sa.select(responses.c.id, responses.c.tenant).where(responses.c.id.like("grp-%")))}
    assert {i for i, t in tenants.items() if t == "grp-other"} == {f"grp-other-{i}" for i in range(3, 40, 4)}
    with engine.connect() as conn:
        counted = {r.window: r.count for r in conn.execute(sa.select(rate_counters).where(rate_counters.c.subject.like("%grp%")))}
        counted |= {r.window: r.count for r in conn.execute(sa.select(rate_counters).where(rate_counters.c.subject == f"key:{p.key_id}"))}
    assert counted == {"tpd": 120 + sum(range(40)), "tpm": 120 + sum(range(40))}

    class Broken(Quotas):
        fail = True

        def record_many(self, records):  # noqa: ANN001, ANN202 - one failed write, as a database outage gives
            if Broken.fail:
                Broken.fail = False
                raise sa.exc.OperationalError("INSERT", {}, Exception("database is down"))
            return super().record_many(records)

    broken = UsageWriter(Broken(engine))

    async def outage() -> list:
        first = await asyncio.gather(*(broken.record(UsageRecord(p, "m", 1, 1)) for _ in range(3)), return_exceptions=True)
        return [*first, await broken.record(UsageRecord(p, "m", 1, 1))]

    results = asyncio.run(outage())
    assert all(isinstance(r, sa.exc.OperationalError) for r in results[:3]) and results[3] is None
    assert quotas.usage(tenant="grp")[0]["requests"] == 41


def test_audit_log_is_append_only(database_url):
    engine = db.connect(database_url)
    KeyStore(engine).create_key("acme", ["inference"], create_tenant=True)
    for statement in (events.update().values(outcome="forged"), events.delete()):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(statement)
    if engine.dialect.name == "postgresql":
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
            conn.exec_driver_sql("truncate events")
    with engine.connect() as conn:
        actions = conn.execute(sa.select(events.c.action, events.c.outcome)).all()
    assert ("key.create", "ok") in actions and ("tenant.create", "ok") in actions


# ---- HTTP: two inference replicas and the management app on one database ----


def _serve(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "uvicorn")
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """URLs of replicas A and B (OpenAI API) and the management app, an admin key, and the shared Auth."""
    from lmaas.registry import ModelRegistry
    from lmaas.serve.engine import CausalLMEngine
    from lmaas.serve.management import build_app
    from lmaas.serve.openai_app import build_openai_app
    from lmaas.storage import Storage

    root = tmp_path_factory.mktemp("gw")
    url = f"sqlite:///{root / 'lmaas.db'}"
    registry = ModelRegistry(Storage(f"file://{root / 'store'}"), db.connect(url))
    model_dir = make_causal_lm(root / "lm", max_seq_len=128, initializer_range=0.5)
    admin_auth = Auth(db.connect(url), registry=registry, config=AuthConfig(cache_ttl_s=1.0))
    admin = admin_auth.keys.bootstrap()
    admin_auth.keys.create_tenant("acme")
    admin_auth.keys.create_tenant("globex")
    registry.register_version("tiny", model_dir, task="causal-lm", tenant="acme")
    engine = CausalLMEngine(model_dir, model_id="tiny", max_batch_size=8, num_threads=2)
    servers = []
    urls = {}
    for name in ("a", "b"):
        # each replica has its own engine pool and caches, as separate processes would
        auth = Auth(db.create_engine(url), registry=registry, config=AuthConfig(cache_ttl_s=1.0))
        base, server, thread = _serve(build_openai_app({"tiny": engine}, auth=auth))
        urls[name] = base
        servers.append((server, thread))
    base, server, thread = _serve(build_app(registry, auth=Auth(db.create_engine(url), registry=registry, config=AuthConfig(cache_ttl_s=1.0))))
    urls["mgmt"] = base
    servers.append((server, thread))
    yield urls, admin, admin_auth
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def _key(gateway, tenant="acme", scopes=("inference",), **limits) -> tuple[str, str]:
    urls, admin, _ = gateway
    r = httpx.post(f"{urls['mgmt']}/api/v1/keys", json={"tenant": tenant, "scopes": list(scopes), **limits}, headers=_bearer(admin))
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["secret"]


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _client(base: str, secret: str):
    return openai.OpenAI(base_url=base + "/v1", api_key=secret, max_retries=0, timeout=60)


def _complete(base: str, secret: str, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 4, "ignore_eos": True, **extra}
    return httpx.post(f"{base}/v1/completions", json=body, headers=_bearer(secret), timeout=60)


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code:
        assert error["code"] == code
    return error


def test_missing_malformed_and_unknown_keys_get_401(gateway):
    urls, _, _ = gateway
    assert httpx.get(urls["a"] + "/healthz").status_code == 200
    assert httpx.get(urls["mgmt"] + "/healthz").status_code == 200
    for base, path in ((urls["a"], "/v1/models"), (urls["mgmt"], "/api/v1/models"), (urls["mgmt"], "/api/v1/usage")):
        for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}, _bearer("lmaas_0_nope")):
            r = httpx.get(base + path, headers=headers)
            error = _error(r, 401, "invalid_api_key")
            assert error["type"] == "invalid_request_error" and r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        _client(urls["a"], "wrong").completions.create(model="tiny", prompt="x", max_tokens=1)


def test_wrong_scope_gets_403(gateway):
    urls, _, _ = gateway
    _, reader = _key(gateway, scopes=["models:read"])
    _, user = _key(gateway)
    _error(_complete(urls["a"], reader), 403, "insufficient_scope")
    assert httpx.get(urls["mgmt"] + "/api/v1/models", headers=_bearer(reader)).status_code == 200
    _error(httpx.get(urls["mgmt"] + "/api/v1/models", headers=_bearer(user)), 403, "insufficient_scope")
    _error(httpx.post(urls["mgmt"] + "/api/v1/keys", json={"scopes": ["admin"]}, headers=_bearer(user)), 403)
    _error(httpx.get(urls["mgmt"] + "/api/v1/audit", headers=_bearer(reader)), 403)
    _error(httpx.delete(urls["mgmt"] + "/api/v1/models/tiny/versions/1", headers=_bearer(reader)), 403)


def test_other_tenants_model_is_404_until_an_admin_makes_it_public(gateway):
    urls, admin, _ = gateway
    _, acme = _key(gateway, scopes=["inference", "models:read"])
    _, globex = _key(gateway, tenant="globex", scopes=["inference", "models:read", "models:write"])
    assert _complete(urls["a"], acme).status_code == 200
    missing = _error(_complete(urls["a"], globex, model="nothing"), 404)
    hidden = _error(_complete(urls["a"], globex), 404)
    assert hidden["type"] == missing["type"] and "tiny" not in missing["message"].split("served:")[1]
    assert [m.id for m in _client(urls["b"], globex).models.list().data] == []
    for route, body in (("/v1/tokenize", {"model": "tiny", "prompt": "def f"}), ("/v1/detokenize", {"model": "tiny", "tokens": [5, 6]})):
        assert httpx.post(urls["a"] + route, json=body, headers=_bearer(acme)).status_code == 200
        _error(httpx.post(urls["a"] + route, json=body, headers=_bearer(globex)), 404)  # the tokenizer of a model globex cannot see
    assert [m.id for m in _client(urls["b"], acme).models.list().data] == ["tiny"]
    for path in ("/api/v1/models/tiny", "/api/v1/models/tiny/versions/1", "/api/v1/resolve?ref=tiny", "/api/v1/models/tiny/versions/1/files/config.json"):
        _error(httpx.get(urls["mgmt"] + path, headers=_bearer(globex)), 404)
    assert httpx.get(urls["mgmt"] + "/api/v1/models", headers=_bearer(globex)).json()["data"] == []
    _error(httpx.put(urls["mgmt"] + "/api/v1/models/tiny/aliases/x", json={"version": 1}, headers=_bearer(globex)), 404)

    _error(httpx.patch(urls["mgmt"] + "/api/v1/models/tiny", json={"public": True}, headers=_bearer(acme)), 403)
    r = httpx.patch(urls["mgmt"] + "/api/v1/models/tiny", json={"public": True}, headers=_bearer(admin))
    assert r.status_code == 200 and r.json()["public"] is True
    try:
        wait_for(lambda: _complete(urls["a"], globex).status_code == 200, 5, "public model visible")
        assert httpx.get(urls["mgmt"] + "/api/v1/models/tiny", headers=_bearer(globex)).status_code == 200
        # shared read-only: another tenant still cannot change it
        _error(httpx.put(urls["mgmt"] + "/api/v1/models/tiny/aliases/x", json={"version": 1}, headers=_bearer(globex)), 403)
    finally:
        httpx.patch(urls["mgmt"] + "/api/v1/models/tiny", json={"public": False}, headers=_bearer(admin))


def test_revoked_key_is_refused_on_another_replica_within_a_second(gateway):
    urls, admin, _ = gateway
    key_id, secret = _key(gateway)
    assert _complete(urls["b"], secret).status_code == 200  # cached on B now
    r = httpx.delete(f"{urls['mgmt']}/api/v1/keys/{key_id}", headers=_bearer(admin))
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    revoked = time.monotonic()
    wait_for(lambda: _complete(urls["b"], secret).status_code == 401, 5, "revocation on replica B")
    assert time.monotonic() - revoked < 1.0  # replicas look for revocations every 0.5 s
    listed = httpx.get(f"{urls['mgmt']}/api/v1/keys", headers=_bearer(admin)).json()["data"]
    assert all("secret" not in k and "secret_sha256" not in k for k in listed)


def test_rate_limit_429_with_retry_after_shared_by_replicas(gateway):
    urls, _, _ = gateway
    _, secret = _key(gateway, rpm=3)
    # rpm windows are whole minutes of the epoch: start with >= 15 s of this one left, so all four
    # calls (well under a second each here) fall in one window and the fourth is refused every time
    if (left := 60 - time.time() % 60) < 15:
        time.sleep(left + 0.1)
    statuses = [_complete(urls[r], secret).status_code for r in ("a", "b", "a")]
    assert statuses == [200, 200, 200]
    r = _complete(urls["b"], secret)
    error = _error(r, 429, "rate_limit_exceeded")
    assert 1 <= int(r.headers["retry-after"]) <= 60 and "3 requests per minute" in error["message"]
    with pytest.raises(openai.RateLimitError):
        _client(urls["a"], secret).completions.create(model="tiny", prompt="x", max_tokens=1)


def test_token_quota_cuts_a_loop_off_within_one_request(gateway):
    urls, _, _ = gateway
    _, secret = _key(gateway, tpd=100)
    used, answered = 0, 0
    for _ in range(30):
        r = _complete(urls["a" if answered % 2 else "b"], secret, max_tokens=8)
        if r.status_code == 429:
            assert r.json()["error"]["param"] == "tpd" and int(r.headers["retry-after"]) > 0
            break
        assert r.status_code == 200, r.text
        used += r.json()["usage"]["total_tokens"]
        answered += 1
    else:
        pytest.fail("never cut off")
    per_request = used / answered
    assert 100 <= used < 100 + per_request + 1  # reached the limit, overshot by at most one request


def test_usage_matches_returned_token_counts_and_feedback_finds_the_version(gateway):
    urls, admin, _ = gateway
    key_id, secret = _key(gateway)
    _, other = _key(gateway, tenant="globex")
    client = _client(urls["a"], secret)
    total, ids = 0, []
    for n in (3, 5):
        out = client.completions.create(model="tiny", prompt="import os", max_tokens=n, extra_body={"ignore_eos": True})
        total += out.usage.total_tokens
        ids.append(out.id)
    chat = _client(urls["b"], secret).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={"ignore_eos": True}
    )
    total += chat.usage.total_tokens
    chunks = list(client.completions.create(
        model="tiny", prompt="def", max_tokens=6, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
    ))
    total += chunks[-1].usage.total_tokens
    r = httpx.get(f"{urls['mgmt']}/api/v1/usage", params={"key_id": key_id}, headers=_bearer(admin)).json()
    assert r["total"]["total_tokens"] == total and r["total"]["requests"] == 4
    assert r["data"][0]["model"] == "tiny" and r["data"][0]["tenant"] == "acme"
    own = httpx.get(f"{urls['mgmt']}/api/v1/usage", headers=_bearer(other)).json()
    assert {row["tenant"] for row in own["data"]} <= {"globex"}  # non-admins see their tenant only

    r = httpx.post(f"{urls['mgmt']}/api/v1/feedback", json={"response_id": chunks[0].id, "rating": 5, "comment": "good"}, headers=_bearer(secret))
    assert r.status_code == 201 and r.json()["version"] == "tiny:1", r.text
    _error(httpx.post(f"{urls['mgmt']}/api/v1/feedback", json={"response_id": ids[0], "rating": 1}, headers=_bearer(other)), 404)
    _error(httpx.post(f"{urls['mgmt']}/api/v1/feedback", json={"response_id": ids[0], "rating": 9}, headers=_bearer(secret)), 400)
    summary = httpx.get(f"{urls['mgmt']}/api/v1/feedback", headers=_bearer(secret)).json()["data"]
    assert summary == [{"model": "tiny", "version": "tiny:1", "count": 1, "mean_rating": 5.0}]


def test_management_actions_are_audited(gateway, tmp_path):
    from registry_helpers import make_model_dir

    urls, admin, _ = gateway
    key_id, writer = _key(gateway, scopes=["models:read", "models:write"])
    src = make_model_dir(tmp_path / "m")
    files = [("files", (p.name, p.read_bytes())) for p in sorted(src.iterdir())]
    r = httpx.post(f"{urls['mgmt']}/api/v1/models/audited/versions", files=files, data={"task": "other"}, headers=_bearer(writer))
    assert r.status_code == 201 and r.json()["tenant"] == "acme", r.text
    assert httpx.put(f"{urls['mgmt']}/api/v1/models/audited/aliases/production", json={"version": 1}, headers=_bearer(writer)).status_code == 200
    _error(httpx.post(f"{urls['mgmt']}/api/v1/models/audited/versions/9/archive", headers=_bearer(writer)), 404)
    _error(httpx.delete(f"{urls['mgmt']}/api/v1/models/audited/versions/1", headers=_bearer(writer)), 409)

    page = httpx.get(f"{urls['mgmt']}/api/v1/audit", params={"actor": f"key:{key_id}"}, headers=_bearer(admin)).json()
    got = [(e["action"], e["target"], e["outcome"]) for e in page["data"]]
    assert ("model.register", "audited:1", "ok") in got and ("alias.set", "audited@production", "ok") in got
    assert ("http.post", "/api/v1/models/audited/versions/9/archive", "denied") in got
    assert ("http.delete", "/api/v1/models/audited/versions/1", "error") in got
    keys = httpx.get(f"{urls['mgmt']}/api/v1/audit", params={"action": "key.*", "target": f"key:{key_id}"}, headers=_bearer(admin)).json()
    assert [e["action"] for e in keys["data"]] == ["key.create"] and keys["data"][0]["actor"].startswith("key:")


def test_oversized_management_bodies_get_413_but_model_uploads_may_be_large(gateway):
    urls, admin, _ = gateway
    big = b'{"name": "' + b"x" * (4 * 1024 * 1024) + b'"}'  # past the default max_body_bytes (4 MiB)
    declared = httpx.post(f"{urls['mgmt']}/api/v1/tenants", content=big, headers={**_bearer(admin), "Content-Type": "application/json"})
    chunked = httpx.post(f"{urls['mgmt']}/api/v1/tenants", content=iter([big[:1 << 20], big[1 << 20:]]), headers=_bearer(admin))
    for r in (declared, chunked):
        assert _error(r, 413, "request_too_large")["message"] == "request body is larger than 4194304 bytes"
    # a model file upload is held to max_upload_bytes instead: this one reaches the route (an unknown upload: 404)
    upload = httpx.put(f"{urls['mgmt']}/api/v1/uploads/nope/files/model.safetensors", content=big, headers=_bearer(admin))
    assert _error(upload, 404)["param"] == "upload_id"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"scopes": ["inference", "superuser"]}, "scopes"),
        ({"scopes": ["inference"], "rpm": -1}, "rpm"),
        ({"scopes": ["inference"], "tpm": 2**40}, "tpm"),  # past the 32-bit column: 400, not a database error
        ({"scopes": ["inference"], "expires_in": "soon"}, "expires"),
        ({"scopes": ["inference"], "tenant": "Robert'); DROP TABLE api_keys;--"}, "tenant"),
        ({"scopes": ["inference"], "tenant": "nobody"}, "tenant"),
        ({"scopes": "inference"}, "scopes"),
    ],
)
def test_bad_key_requests_name_the_field(gateway, body, param):
    urls, admin, _ = gateway
    r = httpx.post(f"{urls['mgmt']}/api/v1/keys", json=body, headers=_bearer(admin))
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param, r.text


def _migrate_to(engine, revision: str) -> None:
    from alembic.runtime.environment import EnvironmentContext

    config, script = db._alembic()
    with engine.connect() as conn:
        with EnvironmentContext(config, script, fn=lambda rev, _ctx: script._upgrade_revs(revision, rev), destination_rev=revision) as env:
            env.configure(connection=conn, transaction_per_migration=False)
            with env.begin_transaction():
                env.run_migrations()
        conn.commit()


def test_migration_0006_gives_existing_rows_the_default_tenant(database_url):
    from lmaas.data import versions
    from lmaas.db.schema import datasets, registered_models

    engine = db.create_engine(database_url)
    _migrate_to(engine, "0005")
    with engine.begin() as conn:
        conn.execute(sa.text(
            "insert into registered_models (name, tenant, description, tags, created_at, last_version) values ('old', 'default', '', '{}', 1, 0)"
        ))
        conn.execute(sa.text(
            "insert into datasets (name, version, uri, sources, content_hash, tokenizer_hash, block_size, vocab_size, documents,"
            " train_rows, validation_rows, tokens, created_at) values ('wiki', 1, 'u', '[]', 'c', 't', 8, 16, 1, 1, 0, 8, 1)"
        ))
    db.upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.select(registered_models.c.tenant, registered_models.c.public)).one() == ("default", False)
        assert conn.execute(sa.select(datasets.c.tenant)).scalar_one() == "default"
    assert [v.ref for v in versions.list_versions(engine, tenant="default")] == ["wiki:1"]
    assert versions.list_versions(engine, tenant="acme") == []
    with pytest.raises(Exception, match="not found"):
        versions.get_version(engine, "wiki:1", tenant="acme")
