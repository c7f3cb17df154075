"""LoRA adapters served by name on their base model's deployment, called with the real `openai` client.

One base model (a random-weight Llama with 32-dimensional heads, which vLLM's CPU kernels take) is registered three
times (`base:1..3`, same weights) and served three ways: `base` (lmaas's engine, `max_adapters: 2`), `base-lru`
(lmaas's engine, `max_adapters: 1`) and, where vLLM is installed, `base-vllm` (vLLM's LoRA, `max_adapters: 2`). Two
real PEFT adapters (non-zero factors, different seeds) are registered as adapter versions of each base version, as
tenant `default`'s private models. Every answer is checked against PEFT run directly on the same base + adapter
(the base alone for the base): greedy tokens equal, logprobs within float tolerance.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_port, http_status, wait_for  # noqa: E402
from registry_helpers import make_adapter_dir, make_model_dir  # noqa: E402
from serve_helpers import make_hf_causal_lm  # noqa: E402

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(400)

APP = "lmaas-adapters-test"
KEY = "lmaas_adaptertest_" + "k" * 40
OTHER_KEY = "lmaas_adapterglobex_" + "g" * 40
"""An inference key of tenant `globex`, which owns none of the adapters."""
PROMPT = "def f(x):"
TOKENS = 12
ADAPTERS = {"base": ("support-bot", "legal-bot"), "base-lru": ("lru-a", "lru-b"), "base-vllm": ("v-support", "v-legal")}
"""Served base name -> its two adapter models (the first made with seed 1, the second with seed 2)."""


def _vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """(base URL, settings, base dir, {seed: adapter dir}) of a running Serve app; Serve shuts down at module end."""
    from ray import serve

    from lmaas import db
    from lmaas.auth import KeyStore
    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry
    from lmaas.serve.deployments import build_app, http_port, run_app

    root = tmp_path_factory.mktemp("adapters")
    settings = load_settings(home=root / "home")
    registry = ModelRegistry.from_settings(settings)
    base_dir = make_hf_causal_lm(root / "base", "llama", initializer_range=0.5)
    adapter_dirs = {seed: make_adapter_dir(root / f"adapter{seed}", base_dir, seed=seed, rank=4) for seed in (1, 2)}
    bases = ["base", "base-lru"] + (["base-vllm"] if _vllm() else [])
    for number, served_name in enumerate(bases, start=1):
        registry.register_version("base", base_dir, task="causal-lm")
        for seed, name in zip((1, 2), ADAPTERS[served_name]):
            registry.register_version(name, adapter_dirs[seed], task="adapter", parent=f"base:{number}")
    registry.set_public("base", True)  # globex may call the base, not default's adapters of it
    other = make_model_dir(root / "other", seed=3)
    registry.register_version("other-base", other, task="causal-lm")
    registry.register_version("orphan-bot", make_adapter_dir(root / "orphan", other, seed=4), task="adapter", parent="other-base:1")
    keys = KeyStore(db.connect(settings.database_url))
    keys.create_key("default", ["inference"], create_tenant=True, secret=KEY)
    keys.create_key("globex", ["inference"], create_tenant=True, secret=OTHER_KEY)

    common = {"num_cpus": 0.3, "refresh_interval_s": 0, "graceful_shutdown_timeout_s": 5}
    lmaas_engine = {"engine": "lmaas", "num_threads": 1, "max_batch_size": 16}
    models = [
        {"ref": "base:1", "name": "base", **common, "engine": {**lmaas_engine, "max_adapters": 2}},
        {"ref": "base:2", "name": "base-lru", **common, "engine": {**lmaas_engine, "max_adapters": 1}},
    ]
    if _vllm():
        models.append({"ref": "base:3", "name": "base-vllm", **common,
                       "engine": {"engine": "vllm", "enforce_eager": True, "num_threads": 1, "max_batch_size": 16, "max_model_len": 128,
                                  "max_adapters": 2, "max_adapter_rank": 8}})
    args = {"models": models, "ingress": {"num_cpus": 0.1}, "env": settings.env()}
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        run_app(build_app(args), APP)
        base = f"http://127.0.0.1:{http_port()}"
        wait_for(lambda: http_status(base + "/healthz") == 200, 60, "Serve ingress")
        yield base, settings, base_dir, adapter_dirs
    finally:
        serve.shutdown()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def peft_reference(served):
    """(adapter seed or None, prompt ids) -> (greedy token ids, their logprobs), from PEFT run directly (no lmaas code)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, base_dir, adapter_dirs = served
    models = {None: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()}
    for seed, directory in adapter_dirs.items():
        models[seed] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), directory).eval()
    cache: dict = {}

    def reference(seed: int | None, ids: list[int]) -> tuple[list[int], list[float]]:
        key = (seed, tuple(ids))
        if key not in cache:
            tokens, logprobs = list(ids), []
            with torch.no_grad():
                for _ in range(TOKENS):  # the whole sequence each step: no cache, no batching, nothing shared with the server
                    scores = torch.log_softmax(models[seed](torch.tensor([tokens])).logits[0, -1].float(), -1)
                    tokens.append(int(scores.argmax()))
                    logprobs.append(float(scores[tokens[-1]]))
            cache[key] = tokens[len(ids):], logprobs
        return cache[key]

    return reference


@pytest.fixture(scope="module")
def tokenizer(served):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served[2])


def _complete(client, model: str) -> tuple[str, list[float]]:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == TOKENS and out.model == model
    return out.choices[0].text, out.choices[0].logprobs.token_logprobs


def _check(got: tuple[str, list[float]], want: tuple[list[int], list[float]], tokenizer) -> None:  # noqa: ANN001
    text, logprobs = got
    assert text == tokenizer.decode(want[0], skip_special_tokens=True)
    assert logprobs == pytest.approx(want[1], abs=1e-3)  # fp32 on both sides; batched kernels differ in summation order


def _seed(model: str) -> int | None:
    """The adapter seed a model name stands for (None: a base)."""
    for names in ADAPTERS.values():
        if model in names:
            return names.index(model) + 1
    return None


def _prompt_ids(tokenizer) -> list[int]:  # noqa: ANN001
    return tokenizer.encode(PROMPT, add_special_tokens=False)


def test_base_and_two_adapters_at_once_each_get_their_own_weights(client, peft_reference, tokenizer):
    ids = _prompt_ids(tokenizer)
    wanted = {model: peft_reference(_seed(model), ids) for model in ("base", *ADAPTERS["base"])}
    assert wanted["base"][0] != wanted["support-bot"][0] != wanted["legal-bot"][0] != wanted["base"][0]  # the adapters change the answer
    for model, want in wanted.items():
        _check(_complete(client, model), want, tokenizer)
    models = ["base", "support-bot", "legal-bot"] * 3
    with ThreadPoolExecutor(len(models)) as pool:  # all at once: one replica, its continuous batch mixing the three
        answers = list(pool.map(lambda m: _complete(client, m), models))
    for model, got in zip(models, answers):
        _check(got, wanted[model], tokenizer)


def test_adapter_chat_and_stream_use_the_adapter(client, peft_reference, tokenizer, served):
    from lmaas.models.chat import chat_token_ids

    messages = [{"role": "user", "content": "def g(y):"}]
    want, _ = peft_reference(2, chat_token_ids(tokenizer, messages, True, None))
    chat = client.chat.completions.create(model="legal-bot", messages=messages, max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
    stream = client.completions.create(model="support-bot", prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == tokenizer.decode(peft_reference(1, _prompt_ids(tokenizer))[0], skip_special_tokens=True)


def test_an_adapter_answers_as_itself_in_headers_and_usage(client, served):
    from lmaas import db
    from lmaas.auth import Quotas

    raw = client.completions.with_raw_response.create(model="support-bot", prompt=PROMPT, max_tokens=3, temperature=0,
                                                      extra_body={"ignore_eos": True})
    assert raw.headers["X-Lmaas-Model-Version"] == "support-bot:1"
    out = raw.parse()
    rows = Quotas(db.connect(served[1].database_url)).usage(tenant="default", model="support-bot")
    assert rows and rows[0]["requests"] >= 1 and rows[0]["total_tokens"] >= out.usage.total_tokens


def test_lru_eviction_with_one_slot_still_answers_correctly(client, peft_reference, tokenizer):
    from ray import serve

    handle = serve.get_deployment_handle("model-base-lru", APP)
    ids = _prompt_ids(tokenizer)
    for model in ("lru-a", "lru-b", "lru-a", "lru-b", "base-lru", "lru-a"):
        _check(_complete(client, model), peft_reference(_seed(model), ids), tokenizer)
        loaded = handle.info.remote().result()["adapters"]
        assert loaded == ([f"{model}:1"] if model != "base-lru" else ["lru-b:1"])  # one slot: the last adapter used, nothing else
    models = ["lru-a", "lru-b", "base-lru"] * 2  # at once: an adapter waits for the other's requests to end before it swaps in
    with ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(lambda m: _complete(client, m), models))
    for model, got in zip(models, answers):
        _check(got, peft_reference(_seed(model), ids), tokenizer)
    assert len(handle.info.remote().result()["adapters"]) == 1


def test_missing_adapter_and_adapter_of_an_undeployed_base_are_404_naming_model(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-bot", prompt=PROMPT, max_tokens=2)
    assert missing.value.body["param"] == "model" and "no-such-bot" in missing.value.body["message"]
    with pytest.raises(openai.NotFoundError) as orphan:
        client.completions.create(model="orphan-bot", prompt=PROMPT, max_tokens=2)
    message = orphan.value.body["message"]
    assert orphan.value.body["param"] == "model"
    assert "'orphan-bot' is adapter orphan-bot:1 of other-base:1, which no deployment here serves with adapters enabled" in message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="orphan-bot", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_models_list_shows_the_adapters_a_tenant_may_call(client, served):
    cards = {m.id: m for m in client.models.list().data}
    assert {"base", "base-lru", "support-bot", "legal-bot", "lru-a", "lru-b"} <= set(cards)
    assert cards["support-bot"].parent == "base" and cards["lru-a"].parent == "base-lru" and cards["base"].parent is None
    assert "orphan-bot" not in cards  # its base is not served here
    other = openai.OpenAI(base_url=served[0] + "/v1", api_key=OTHER_KEY, max_retries=0)
    theirs = {m.id for m in other.models.list().data}
    assert {"base", "base-lru"} <= theirs and not theirs & {name for names in ADAPTERS.values() for name in names}


def test_another_tenant_cannot_call_a_private_adapter(served, peft_reference, tokenizer):
    """globex may call the public base; default's private adapters answer it exactly as models that do not exist."""
    other = openai.OpenAI(base_url=served[0] + "/v1", api_key=OTHER_KEY, max_retries=0, timeout=60)
    _check(_complete(other, "base"), peft_reference(None, _prompt_ids(tokenizer)), tokenizer)

    def refusal(model: str, chat: bool = False) -> dict:
        with pytest.raises(openai.NotFoundError) as info:
            if chat:
                other.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            else:
                other.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        return info.value.body

    missing = refusal("no-such-bot")
    for model in ("support-bot", "support-bot:1", "lru-a@production"):
        body = refusal(model)
        assert body["param"] == "model" and body["message"].replace(model, "X") == missing["message"].replace("no-such-bot", "X")
    assert refusal("legal-bot", chat=True)["param"] == "model"


def test_tenants_are_isolated_in_the_library(served):
    """The gateway's `AdapterRoutes` and the replica's `AdapterCache` take the tenant and enforce it themselves."""
    import asyncio

    from lmaas.errors import InvalidInputError, NotFoundError
    from lmaas.registry import ModelRegistry
    from lmaas.serve.adapters import AdapterBase, AdapterCache, AdapterRoutes
    from lmaas.serve.engine import AdapterRequest, CausalLMEngine

    _, settings, base_dir, _ = served
    registry = ModelRegistry.from_settings(settings)

    async def run() -> None:
        engine = CausalLMEngine(base_dir, max_adapters=1, num_threads=1)
        try:
            routes = AdapterRoutes(lambda: registry, [AdapterBase("base", "base:1", engine)])
            assert routes.resolve("support-bot", "globex") is None and routes.resolve("support-bot:1", "globex") is None
            assert routes.resolve("support-bot", "default").adapter == AdapterRequest("support-bot:1", "base:1", "default")
            assert routes.listed("globex") == [] and ("support-bot", "base") in routes.listed("default")
            cache = AdapterCache(engine, registry, settings.home / "adapter-test", "base:1", max_rank=16)
            with pytest.raises(NotFoundError):
                await cache.acquire(AdapterRequest("support-bot:1", "base:1", "globex"))
            with pytest.raises(InvalidInputError, match="adapts base:2"):
                await cache.acquire(AdapterRequest("lru-a:1", "base:2", "default"))
            await cache.acquire(AdapterRequest("support-bot:1", "base:1", "default"))
            assert cache.loaded() == ["support-bot:1"]
            await cache.release("support-bot:1")
            small = AdapterCache(engine, registry, settings.home / "adapter-test", "base:1", max_rank=2)
            with pytest.raises(InvalidInputError, match="rank 4"):
                await small.acquire(AdapterRequest("legal-bot:1", "base:1", None))
            cache.close()
        finally:
            await engine.close()

    asyncio.run(run())


@pytest.mark.skipif(not _vllm(), reason="vLLM is part of `make test`'s install (the vllm extra)")
def test_vllm_serves_the_base_and_two_adapters_at_once(client, peft_reference, tokenizer):
    from ray import serve

    assert serve.get_deployment_handle("model-base-vllm", APP).info.remote().result()["engine"] == "vllm"
    ids = _prompt_ids(tokenizer)
    models = ["base-vllm", "v-support", "v-legal"] * 3
    with ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(lambda m: _complete(client, m), models))
    for model, got in zip(models, answers):
        _check(got, peft_reference(_seed(model), ids), tokenizer)
