"""vLLM as the serving engine: one Serve replica running vLLM's CPU build, called with the real `openai` client.

The model is a tiny random-weight Llama with 32-dimensional attention heads (vLLM's CPU kernels have
none for lmaas's `tiny` size's 16). The same weights also run in lmaas's own engine in this process:
greedy decoding is deterministic, so both engines must give the same tokens, texts and logprobs.
One vLLM replica serves every test here (it starts in ~30 s with `enforce_eager`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_port, http_status, wait_for  # noqa: E402
from serve_helpers import EMBEDDING_DIR, ClientLoop, make_causal_lm, replica_processes  # noqa: E402

openai = pytest.importorskip("openai")
pytest.importorskip("vllm", reason="vLLM is part of `make test`'s install (the vllm extra)")
pytestmark = pytest.mark.timeout(400)

APP = "lmaas-vllm-test"
KEY = "lmaas_vllmtest_" + "k" * 40
QUOTA_KEY = "lmaas_vllmquota_" + "q" * 40
PROMPT = "def f(x):"
CONTEXT = 1024
"""vtiny's context: room for a prompt listing tools (~450 tokens of this 512-token vocabulary)."""
VLLM_ENGINE = {"engine": "vllm", "enforce_eager": True, "max_batch_size": 16, "num_threads": 1}
MODEL = {"ref": "vtiny", "min_replicas": 2, "max_replicas": 2, "num_cpus": 0.3, "graceful_shutdown_timeout_s": 5, "health_check_period_s": 1,
         "refresh_interval_s": 0, "engine": VLLM_ENGINE}
"""Two replicas: the kill test takes one away while the other answers."""


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """(base URL, model dir, settings) of a Serve app whose `vtiny` runs on vLLM; Serve shuts down at module end."""
    from ray import serve

    from lmaas import db
    from lmaas.auth import KeyStore, Limits
    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry
    from lmaas.serve.deployments import build_app, http_port, run_app

    root = tmp_path_factory.mktemp("vllm")
    settings = load_settings(home=root / "home")
    registry = ModelRegistry.from_settings(settings)
    model_dir = make_causal_lm(root / "lm", max_seq_len=CONTEXT, initializer_range=0.5, num_attention_heads=2, num_key_value_heads=1)
    registry.register_version("vtiny", model_dir, task="causal-lm")
    # ~47M parameters with 64-dimensional heads: vLLM serves it, several times slower per token than vtiny (the canary test's)
    slow = make_causal_lm(root / "slow", size="small", max_seq_len=128, hidden_size=512, num_hidden_layers=16, intermediate_size=1408,
                          num_attention_heads=8, num_key_value_heads=8)
    registry.register_version("vslow", slow, task="causal-lm")
    keys = KeyStore(db.connect(settings.database_url))
    keys.create_key("default", ["inference"], create_tenant=True, secret=KEY)
    keys.create_key("default", ["inference"], secret=QUOTA_KEY, limits=Limits(tpd=120))
    args = {
        "models": [MODEL],
        "ingress": {"num_cpus": 0.1},
        "env": settings.env(),
    }
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        run_app(build_app(args), APP)
        base = f"http://127.0.0.1:{http_port()}"
        wait_for(lambda: http_status(base + "/healthz") == 200, 120, "Serve ingress")
        yield base, model_dir, settings
    finally:
        serve.shutdown()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(served):
    """The same weights in lmaas's own engine, in this process: `(run(prompt_or_ids, SamplingParams) -> events, tokenizer)`."""
    import asyncio

    from lmaas.serve.engine import CausalLMEngine, GenerationRequest

    engine = CausalLMEngine(served[1], num_threads=1)

    def run(prompt, params):
        async def collect():
            return [e async for e in engine.generate(GenerationRequest("ref", prompt, params))]

        return asyncio.run(collect())

    yield run, engine
    asyncio.run(engine.close())


def test_the_replica_runs_vllm_and_answers_what_lmaas_engine_answers(served, client, reference):
    from ray import serve

    from lmaas.serve.options import deployment_name
    from lmaas.serve.engine import SamplingParams

    info = serve.get_deployment_handle(deployment_name("vtiny"), APP).info.remote().result(timeout_s=30)
    assert info["engine"] == "vllm" and info["version"] == "vtiny:1" and info["max_context"] == CONTEXT
    run, engine = reference
    expected = run(PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    out = client.completions.create(model="vtiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == "".join(e.text for e in expected)
    assert out.choices[0].finish_reason == "length"
    prompt_tokens = len(engine.tokenizer.encode(PROMPT, add_special_tokens=False))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 12)
    assert out.usage.total_tokens == prompt_tokens + 12


def test_streams_give_the_same_text_as_whole_answers(client):
    whole = client.completions.create(model="vtiny", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(
        model="vtiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    messages = [{"role": "user", "content": "import os"}]
    chat = client.chat.completions.create(model="vtiny", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    stream = list(client.chat.completions.create(
        model="vtiny", messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert chat.usage.completion_tokens == 8 == stream[-1].usage.completion_tokens
    assert chat.choices[0].finish_reason == "length"


def test_tokenize_through_the_gateway_counts_what_vllm_bills(served, client):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    out = httpx.post(served[0] + "/v1/tokenize", json={"model": "vtiny", "prompt": PROMPT}, headers=headers, timeout=30).json()
    assert out["count"] == client.completions.create(model="vtiny", prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    assert out["max_model_len"] == CONTEXT
    back = httpx.post(served[0] + "/v1/detokenize", json={"model": "vtiny", "tokens": out["tokens"]}, headers=headers, timeout=30)
    assert back.json() == {"prompt": PROMPT}
    anonymous = httpx.post(served[0] + "/v1/tokenize", json={"model": "vtiny", "prompt": PROMPT}, timeout=30)
    assert anonymous.status_code == 401


def test_logprobs_match_lmaas_engine_and_stop_strings_end_the_text(client, reference):
    from lmaas.serve.engine import SamplingParams

    run, _ = reference
    expected = run(PROMPT, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3))
    out = client.completions.create(model="vtiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(len(top) == 3 for top in lp.top_logprobs)
    for got, want in zip(lp.token_logprobs, expected):
        assert got == pytest.approx(want.logprob, abs=1e-3)  # fp32 on both sides; kernels differ in summation order
    chat = client.chat.completions.create(
        model="vtiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)

    text = client.completions.create(model="vtiny", prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(model="vtiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_seeded_sampling_repeats_and_bad_fields_are_400s_naming_them(client):
    def sample(seed):
        return client.completions.create(model="vtiny", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1  # 16 tokens sampled from a near-uniform random model: a collision is ~impossible
    for kwargs, param in (
        ({"max_tokens": 2 * CONTEXT}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"prompt": "x " * 600}, "prompt"),
        ({"logprobs": 50}, "logprobs"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="vtiny", **{"prompt": PROMPT, "max_tokens": 4, **kwargs})
        assert err.value.body["param"] == param, err.value.body


def test_n_choices_on_vllm(client):
    kwargs = {"model": "vtiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 11, "extra_body": {"ignore_eos": True}}
    out = client.completions.create(n=2, **kwargs)
    assert [c.index for c in out.choices] == [0, 1] and out.choices[0].text != out.choices[1].text
    assert out.choices[0].text == client.completions.create(**kwargs).choices[0].text
    assert out.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(
        model="vtiny", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i) for i in range(2)]
    assert texts[0] == texts[1] and texts[0] and chunks[-1].usage.completion_tokens == 10


def test_structured_output_follows_the_schema(client):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "level": {"type": "integer", "enum": [1, 2, 3]}},
        "required": ["ok", "level"],
        "additionalProperties": False,
    }
    messages = [{"role": "user", "content": "status?"}]
    for seed in (1, 2, 3):
        out = client.chat.completions.create(
            model="vtiny", messages=messages, max_tokens=64, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "status", "schema": schema, "strict": True}},
        )
        value = json.loads(out.choices[0].message.content)  # a random-weight model, yet always valid JSON of the schema
        assert set(value) == {"ok", "level"} and isinstance(value["ok"], bool) and value["level"] in (1, 2, 3), value
        assert out.choices[0].finish_reason == "stop"
    anything = client.chat.completions.create(model="vtiny", messages=messages, max_tokens=64, seed=4, response_format={"type": "json_object"},
                                              presence_penalty=0.5)
    text = anything.choices[0].message.content
    assert text.startswith("{")  # any object: a random model may still be writing its first key at 64 tokens ...
    if anything.choices[0].finish_reason == "stop":  # ... and when it closed the object, the text parses
        assert isinstance(json.loads(text), dict)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="vtiny", messages=messages, max_tokens=8,
                                       response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}})
    assert err.value.body["param"] == "response_format"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["paris", "rome"]}, "metric": {"type": "boolean"}},
                   "required": ["city", "metric"], "additionalProperties": False},
}}
LEVEL = {"type": "function", "function": {
    "name": "set_level",
    "parameters": {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["level"],
                   "additionalProperties": False},
}}
TOOLS = [WEATHER, LEVEL]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _valid_call(call, names=tuple(SCHEMAS)) -> dict:
    """The call's arguments, checked against its tool's parameters schema."""
    import jsonschema

    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names, call
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def test_a_named_tool_choice_calls_that_function_with_arguments_of_its_schema(served, client):
    import httpx

    for seed in (1, 2, 3):  # a random-weight model, yet every call is valid JSON of the function's parameters
        out = client.chat.completions.create(model="vtiny", messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=64, seed=seed)
        message = out.choices[0].message
        assert message.content is None and len(message.tool_calls) == 1, message
        _valid_call(message.tool_calls[0], ("get_weather",))
        assert out.choices[0].finish_reason == "stop"  # as vLLM (and OpenAI) for a named tool choice
    counted = httpx.post(served[0] + "/v1/tokenize", json={"model": "vtiny", "messages": ASK, "tools": TOOLS},
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    plain = client.chat.completions.create(model="vtiny", messages=ASK, max_tokens=1)
    assert out.usage.prompt_tokens == counted["count"] > plain.usage.prompt_tokens + 100  # the tools are in the prompt
    assert 0 < out.usage.completion_tokens <= 64 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_required_gives_calls_of_the_given_tools_and_finish_reason_tool_calls(client):
    for seed in (1, 2):
        out = client.chat.completions.create(model="vtiny", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                             max_tokens=96, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        assert len(choice.message.tool_calls) == 1
        _valid_call(choice.message.tool_calls[0])
    out = client.chat.completions.create(model="vtiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, seed=3)
    if out.choices[0].finish_reason == "tool_calls":  # parallel calls: a random model may still be adding calls at max_tokens
        assert len(out.choices[0].message.tool_calls) >= 1
        for call in out.choices[0].message.tool_calls:
            _valid_call(call)
    else:
        assert out.choices[0].finish_reason == "length" and out.choices[0].message.tool_calls == []


def test_a_streamed_tool_call_assembles_to_the_whole_answers_call(client):
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]  # the client's helper parses strict tools' arguments
    # strict tools throughout: `strict` is part of the tool's JSON in the prompt, so it changes what greedy decoding gives
    kwargs = {"model": "vtiny", "messages": ASK, "tools": strict, "tool_choice": NAMED, "max_tokens": 64, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    pieces = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first = pieces[0]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function", "get_weather", "")
    assert first.id.startswith("call_") and all(p.id is None and p.function.name is None for p in pieces[1:])
    arguments = "".join(p.function.arguments for p in pieces)
    assert arguments == whole.choices[0].message.tool_calls[0].function.arguments  # greedy: the same call
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.parsed_arguments == json.loads(arguments) and final.choices[0].finish_reason == "stop"

    required = list(client.chat.completions.create(**{**kwargs, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 96},
                                                   stream=True))
    calls = [tc for c in required if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and [c.choices[0].finish_reason for c in required if c.choices][-1] == "tool_calls"
    _valid_call(calls[0])


def test_a_conversation_with_tool_calls_and_tool_answers_continues(client):
    call = client.chat.completions.create(model="vtiny", messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=64, seed=1)
    tool_call = call.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [tool_call.model_dump()]},
        {"role": "tool", "tool_call_id": tool_call.id, "content": "sunny, 21 C"},
    ]
    out = client.chat.completions.create(model="vtiny", messages=history, tools=TOOLS, tool_choice="none", max_tokens=8,
                                         extra_body={"ignore_eos": True})
    assert isinstance(out.choices[0].message.content, str) and out.choices[0].message.tool_calls == []
    assert out.usage.prompt_tokens > call.usage.prompt_tokens and out.usage.completion_tokens == 8
    again = client.chat.completions.create(model="vtiny", messages=history, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "set_level"}},
                                           max_tokens=64, seed=2)
    _valid_call(again.choices[0].message.tool_calls[0], ("set_level",))


def test_auto_tool_choice_answers_and_bad_tool_requests_are_400s_naming_the_field(client):
    # "auto", the default with tools: the random model writes no <tool_call> block, so its text is the content
    auto = client.chat.completions.create(model="vtiny", messages=ASK, max_tokens=4, tools=TOOLS)
    assert auto.choices[0].message.tool_calls in (None, []) and auto.choices[0].message.content
    for kwargs, param in (
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]}, "tools.0.function.parameters"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="vtiny", messages=ASK, max_tokens=4, **kwargs)
        assert err.value.body["param"] == param, (kwargs, err.value.body)


def test_token_quota_cuts_off_within_one_request(served):
    quota = openai.OpenAI(base_url=served[0] + "/v1", api_key=QUOTA_KEY, max_retries=0, timeout=120)
    used = answered = 0
    for _ in range(30):
        try:
            out = quota.completions.create(model="vtiny", prompt=PROMPT, max_tokens=10, extra_body={"ignore_eos": True})
        except openai.RateLimitError as exc:
            assert exc.body["param"] == "tpd"
            break
        used += out.usage.total_tokens
        answered += 1
    else:
        pytest.fail("never cut off")
    assert 120 <= used < 120 + used / answered + 1  # reached the limit, overshot by at most one request


def test_engine_gauges_come_from_vllm(served, client):
    from ray import serve

    from lmaas.serve.options import deployment_name

    handle = serve.get_deployment_handle(deployment_name("vtiny"), APP)
    for _ in range(20):  # two replicas: ask until the one that answers `stats` has served a request too
        client.completions.create(model="vtiny", prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
        stats = handle.stats.remote().result(timeout_s=30)
        if stats["finished_requests"]:
            break
    # the KV cache vLLM allocated: 16 sequences x 128 tokens at least (lmaas sizes it from max_batch_size)
    assert stats["kv_cache_capacity"] >= 16 * 128 and stats["max_batch_size"] == 16
    assert stats["generated_tokens"] >= 4 and stats["finished_requests"] >= 1


def test_auto_picks_vllm_only_for_what_it_can_load(served, tmp_path):
    from lmaas.serve.options import EngineOptions
    from lmaas.serve.engine import vllm

    auto = EngineOptions()
    assert auto.causal_lm_engine(served[1]) == "vllm"
    tiny = make_causal_lm(tmp_path / "tiny")  # 16-dimensional heads
    assert auto.causal_lm_engine(tiny) == "lmaas" and "head size 16" in vllm.unsupported(tiny)
    config = json.loads((served[1] / "config.json").read_text())
    quantized = tmp_path / "q"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "lmaas", "scheme": "int8-dynamic"}}))
    assert auto.causal_lm_engine(quantized) == "lmaas" and "int8-dynamic" in vllm.unsupported(quantized)
    assert EngineOptions(engine="lmaas").causal_lm_engine(served[1]) == "lmaas"


def test_a_slow_vllm_canary_is_rolled_back_while_clients_run(served, monkeypatch):
    """A canary (its own vLLM replica, a 47M-parameter version) whose p99 latency is past 2x the stable side's is
    rolled back while clients run; every request is answered; afterwards only the stable version answers."""
    from lmaas.serve.canary import CanaryStore
    from lmaas.serve.deployments import deploy_models
    from lmaas.serve.options import ServedModel

    base, _, settings = served
    canary = {"ref": "vslow:1", "weight": 50, "min_requests": 6, "max_latency_ratio": 2, "window_s": 120, "num_cpus": 0.3,
              "graceful_shutdown_timeout_s": 5}  # its engine is the served model's (vLLM)
    store = CanaryStore.from_settings(settings)
    for name, value in settings.env().items():  # `deploy_models` keeps its records in this app's database, as `lmaas deploy` would
        monkeypatch.setenv(name, value)
    try:
        deploy_models([ServedModel(**MODEL, canary=canary)], env=settings.env(), app_name=APP)
        with ClientLoop(base, KEY, threads=2, model="vtiny", max_tokens=32) as loop:
            wait_for(lambda: (state := store.get(APP, "vtiny")) is not None and state.state == "rolled_back", 180, "rollback")
            rolled_back_at = len(loop.answers)
            time.sleep(3)  # past the gateway's state TTL: no more canary answers
            settled = len(loop.answers)
            wait_for(lambda: len(loop.answers) >= settled + 6, 60, "answers after the rollback")
        assert loop.failed() == []
        assert "vslow:1" in {a[3] for a in loop.answers[:rolled_back_at]}
        assert {a[3] for a in loop.answers[settled:]} == {"vtiny:1"}
        state = store.get(APP, "vtiny")
        assert state.routed_weight == 0 and "p99" in state.reason, state
    finally:
        deploy_models([ServedModel(**MODEL)], env=settings.env(), app_name=APP)  # the canary's deployment goes


def test_a_killed_vllm_replica_costs_at_most_one_percent_and_leaves_no_engine_process(served):
    """SIGKILL one of the two vLLM replicas under load: <= 1% of requests fail, Serve starts a replacement, and the
    killed replica's vLLM engine processes (EngineCore, its worker) exit too instead of holding their memory."""
    import psutil
    from ray import serve

    from lmaas.serve.ingress import _running_replicas
    from lmaas.serve.options import deployment_name

    base = served[0]
    deployment = deployment_name("vtiny")

    def running() -> int:
        app = serve.status().applications.get(APP)
        return _running_replicas(app.deployments.get(deployment)) if app else 0

    before = {name: pid for name, (pid, _) in replica_processes(APP, deployment).items()}
    assert len(before) == 2 and running() == 2, before
    victim, pid = min(before.items())
    engine_processes = psutil.Process(pid).children(recursive=True)
    assert any("EngineCore" in " ".join(p.cmdline()) or "VLLM" in p.name() for p in engine_processes), [p.name() for p in engine_processes]
    with ClientLoop(base, KEY, threads=2, model="vtiny") as loop:
        wait_for(lambda: len(loop.answers) >= 30, 60, "30 answers before the kill")
        os.kill(pid, signal.SIGKILL)

        def recovered() -> bool:
            now = {name for name, _ in replica_processes(APP, deployment).items()}
            return victim not in now and len(now) == 2 and running() == 2

        wait_for(recovered, 150, "two running replicas after the kill", interval=1)  # a vLLM replica starts in ~30-60 s here
        after = len(loop.answers)
        wait_for(lambda: len(loop.answers) >= after + 30, 60, "30 answers after the recovery")
    failed = loop.failed()
    assert len(failed) <= 0.01 * len(loop.answers), (len(loop.answers), failed[:3])
    assert all(a[1] == 200 for a in loop.answers[after:]), loop.answers[after:][:3]
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in engine_processes), 60,
             "the killed replica's vLLM processes to exit")


def test_a_batch_on_vllm_answers_every_line_as_the_vllm_replicas_do(served, client, tmp_path):
    """`lmaas batch` with `engine: vllm`: a Ray Data actor runs its own vLLM engine; greedy completion and chat
    lines get exactly the bodies the served vLLM replicas answer the same requests with."""
    from lmaas.batch import BatchConfig, run_batch
    from lmaas.registry import ModelRegistry

    lines = []
    for i in range(12):
        body = {"max_tokens": 6 + i % 3, "temperature": 0}
        if i % 2:
            lines.append({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": {"prompt": f"def f{i}(x):", **body}})
        else:
            lines.append({"custom_id": f"m{i}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"messages": [{"role": "user", "content": f"print {i}"}], **body}})
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_batch(BatchConfig(input=str(source), model="vtiny", output=str(output), concurrency=1, num_cpus=0.3, lines_per_block=6,
                                   engine=VLLM_ENGINE), registry=ModelRegistry.from_settings(served[2]))
    assert (result.completed, result.failed) == (12, 0)
    answers = {o["custom_id"]: o["response"]["body"] for o in map(json.loads, output.read_text().splitlines())}
    for line in lines:
        body = {"model": "vtiny", **line["body"]}
        if line["url"] == "/v1/completions":
            online = client.completions.create(**body).model_dump()
            assert answers[line["custom_id"]]["choices"][0]["text"] == online["choices"][0]["text"], line
        else:
            online = client.chat.completions.create(**body).model_dump()
            assert answers[line["custom_id"]]["choices"][0]["message"]["content"] == online["choices"][0]["message"]["content"], line
        assert answers[line["custom_id"]]["usage"] == {k: online["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def test_embeddings_on_vllm_pooling_equal_lmaas_embedding_engine():
    """vLLM's pooling runner loads the pretrained MiniLM directory and gives lmaas's embedding engine's vectors and token counts."""
    import asyncio

    from lmaas.errors import InvalidInputError
    from lmaas.serve.engine import EmbeddingEngine, VLLMEmbeddingEngine

    texts = ["a cat sat on the mat", "def f(x):\n    return x", "x " * 400]  # the last is past MiniLM's 256 tokens: truncated alike

    async def run():
        engine = VLLMEmbeddingEngine(EMBEDDING_DIR, num_threads=1)
        try:
            got = await engine.embed(texts)
            engine.max_tokens_per_request = 10
            with pytest.raises(InvalidInputError) as err:
                await engine.embed(texts)
            assert err.value.param == "input"
            assert engine.stats().finished_requests == 1 and engine.healthy()
        finally:
            await engine.close()
        reference = EmbeddingEngine(EMBEDDING_DIR, num_threads=1)
        try:
            return got, await reference.embed(texts)
        finally:
            await reference.close()

    (vectors, tokens), (expected, expected_tokens) = asyncio.run(run())
    assert tokens == expected_tokens
    for got, want in zip(vectors, expected):
        assert len(got) == len(want) == 384
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4  # fp32 both; kernels sum in other orders


def test_a_colocated_vllm_model_is_served_by_the_gateway_itself_and_follows_its_alias(served, reference):
    """`colocated: true`: no model deployment, the gateway's replica runs vLLM; answers equal lmaas's engine's, usage is
    metered, `list_deployments` shows the gateway's replica, and an alias move under load fails no request.

    Last in the module: it replaces the module's app (one gateway serving the colocated model)."""
    import httpx

    from lmaas.registry import ModelRegistry
    from lmaas.serve.deployments import INGRESS_NAME, build_app, list_deployments, run_app
    from lmaas.serve.engine import SamplingParams
    from ray import serve

    base, model_dir, settings = served
    registry = ModelRegistry.from_settings(settings)
    registry.register_version("vcolo", model_dir, task="causal-lm")
    other = make_causal_lm(settings.home.parent / "colo2", max_seq_len=CONTEXT, initializer_range=0.5, num_attention_heads=2,
                           num_key_value_heads=1, seed=7)
    registry.register_version("vcolo", other, task="causal-lm")
    registry.set_alias("vcolo", "production", 1)
    model = {"ref": "vcolo@production", "name": "vcolo", "colocated": True, "num_cpus": 0.3, "refresh_interval_s": 1,
             "health_check_period_s": 1, "engine": VLLM_ENGINE}
    run_app(build_app({"models": [model], "ingress": {"num_cpus": 0.1}, "env": settings.env()}), APP)
    wait_for(lambda: http_status(base + "/healthz") == 200, 120, "the colocated gateway")

    assert set(serve.status().applications[APP].deployments) == {INGRESS_NAME}  # no replica of its own
    (row,) = list_deployments(APP)
    assert (row.name, row.status, row.running, row.engine, row.serving) == ("vcolo", "HEALTHY", 1, "vllm", "vcolo:1"), row

    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    out = client.completions.create(model="vcolo", prompt=PROMPT, max_tokens=12, temperature=0)
    run, engine = reference
    expected = run(PROMPT, SamplingParams(max_tokens=12, temperature=0))
    assert out.choices[0].text == "".join(e.text for e in expected)  # vLLM in the gateway gives what lmaas's engine gives
    counted = httpx.post(base + "/v1/tokenize", json={"model": "vcolo", "prompt": PROMPT}, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert out.usage.prompt_tokens == counted["count"] and out.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model="vcolo", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 8 and any(c.choices and c.choices[0].delta.content for c in chunks)
    assert http_status(base + "/readyz") == 200

    def greedy() -> str:
        return client.completions.create(model="vcolo", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}).choices[0].text

    before = greedy()
    with ClientLoop(base, KEY, threads=2, model="vcolo", max_tokens=8) as loop:
        wait_for(lambda: len(loop.answers) >= 6, 60, "answers before the move")
        registry.set_alias("vcolo", "production", 2)
        # the gateway loads version 2 next to version 1 (which keeps answering), then swaps
        wait_for(lambda: list_deployments(APP)[0].serving == "vcolo:2", 180, "the gateway serving version 2")
        swapped = len(loop.answers)
        wait_for(lambda: len(loop.answers) >= swapped + 6, 60, "answers after the swap")
    assert not loop.failed(), loop.failed()[:3]
    after = greedy()
    assert after != before  # other weights answer now
    # each answer names the version that generated it, also while the alias had moved and version 1 still answered
    texts = {"vcolo:1": before, "vcolo:2": after}
    assert {version for _, _, _, version in loop.answers} == set(texts)
    wrong = [(version, body) for _, _, body, version in loop.answers if json.loads(body)["choices"][0]["text"] != texts[version]]
    assert not wrong, wrong[:3]
