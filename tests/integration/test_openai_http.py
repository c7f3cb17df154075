"""The OpenAI-compatible API over real HTTP (uvicorn on 127.0.0.1), called with the real `openai` client."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_port  # noqa: E402
from serve_helpers import EMBEDDING_DIR, make_causal_lm  # noqa: E402

from lmaas.serve.engine import CausalLMEngine, EmbeddingEngine
from lmaas.serve.openai_app import build_openai_app

openai = pytest.importorskip("openai")
LM, EMB = "tiny-lm", "minilm"
CONTEXT = 1024
"""The LM's context: room for a prompt listing tools (~450 tokens of this 512-token vocabulary)."""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    lm = CausalLMEngine(make_causal_lm(tmp_path_factory.mktemp("lm"), max_seq_len=CONTEXT, initializer_range=0.5), model_id=LM, max_batch_size=16, num_threads=2)
    emb = EmbeddingEngine(EMBEDDING_DIR, model_id=EMB, num_threads=2)
    app = build_openai_app({LM: lm, EMB: emb}, max_body_bytes=1024 * 1024)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", lm
    uv.should_exit = True
    thread.join(10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_list(client):
    assert sorted(m.id for m in client.models.list().data) == [EMB, LM]


def test_completion_with_usage_and_logprobs(client):
    out = client.completions.create(model=LM, prompt="def f(x):", max_tokens=7, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 7 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7
    assert len(choice.logprobs.tokens) == 7 and all(len(t) == 2 for t in choice.logprobs.top_logprobs)


def test_n_choices_each_sample_on_their_own_and_usage_counts_them_all(client):
    kwargs = {"model": LM, "prompt": "def f(x):", "max_tokens": 6, "temperature": 1.0, "seed": 5, "extra_body": {"ignore_eos": True}}
    out = client.completions.create(n=3, **kwargs)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1  # their own seeds (5, 6, 7): 6 tokens from a random model do not collide
    assert out.choices[0].text == client.completions.create(**kwargs).choices[0].text  # choice 0 is the n=1 answer
    assert out == client.completions.create(n=3, **kwargs).model_copy(update={"id": out.id, "created": out.created})  # seeded: repeats
    one = client.completions.create(**kwargs).usage
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (one.prompt_tokens, 18)

    chunks = list(client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kwargs))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert texts == [c.text for c in out.choices]
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason == "length") == 3
    assert chunks[-1].usage.completion_tokens == 18

    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=LM, messages=messages, n=2, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content == chat.choices[1].message.content  # greedy
    assert chat.usage.completion_tokens == 8
    stream = list(client.chat.completions.create(model=LM, messages=messages, n=2, max_tokens=4, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True}))
    assert ["".join(c.choices[0].delta.content or "" for c in stream if c.choices and c.choices[0].index == i) for i in range(2)] == [
        chat.choices[0].message.content] * 2


def test_fields_this_engine_does_not_serve_are_400s_naming_them(server):
    chat = {"model": LM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for extra, param in (
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ):
        status, out = post(server[0] + "/v1/chat/completions", json.dumps({**chat, **extra}).encode())
        assert status == 400 and out["error"]["param"] == param, (extra, out)
    status, out = post(server[0] + "/v1/chat/completions", json.dumps({**chat, "response_format": {"type": "text"}, "tools": []}).encode())
    assert status == 200, out  # the defaults, sent explicitly, are fine


def test_chat_completion(client):
    out = client.chat.completions.create(
        model=LM, messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True}
    )
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 5 and len(out.choices[0].logprobs.content) == 5


def test_streaming_completion_and_chat_match_non_streaming(client):
    kwargs = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(model=LM, prompt="import os", **kwargs).choices[0].text
    chunks = list(client.completions.create(model=LM, prompt="import os", stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": "hi"}]
    chat_full = client.chat.completions.create(model=LM, messages=messages, **kwargs).choices[0].message.content
    chat_chunks = list(client.chat.completions.create(model=LM, messages=messages, stream=True, **kwargs))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == chat_full
    assert chat_chunks[-1].choices[0].finish_reason == "length"


def test_stream_ends_with_done(server):
    body = json.dumps({"model": LM, "prompt": "x", "max_tokens": 3, "stream": True}).encode()
    request = urllib.request.Request(server[0] + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.read().decode().split("\n\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_embeddings_match_sentence_transformers(client):
    from sentence_transformers import SentenceTransformer

    texts = ["The cat sat on the mat.", "Stock prices fell sharply today.", "def add(a, b): return a + b"]
    out = client.embeddings.create(model=EMB, input=texts)  # the client asks for base64 by default
    floats = client.embeddings.create(model=EMB, input=texts[0], encoding_format="float")
    reference = SentenceTransformer(str(EMBEDDING_DIR), device="cpu").encode(texts, convert_to_tensor=True).float()
    got = torch.tensor([d.embedding for d in out.data])
    assert torch.nn.functional.cosine_similarity(got, reference, dim=1).min() >= 0.999
    assert torch.nn.functional.cosine_similarity(torch.tensor(floats.data[0].embedding), reference[0], dim=0) >= 0.999
    assert out.usage.prompt_tokens > len(texts)


def test_sixteen_concurrent_streams_get_their_token_counts(server):
    client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)
    lengths = [3 + 4 * i for i in range(16)]

    async def one(i, n):
        stream = await client.completions.create(
            model=LM, prompt=f"def f{i}(x):", max_tokens=n, temperature=0.8, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def main():
        try:
            return await asyncio.gather(*(one(i, n) for i, n in enumerate(lengths)))
        finally:
            await client.close()

    assert asyncio.run(main()) == lengths


def test_disconnect_mid_stream_frees_the_engine_slot(server, client):
    url, engine = server
    stream = client.completions.create(model=LM, prompt="def", max_tokens=120, temperature=0, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    assert engine.stats().running == 1
    stream.close()
    deadline = time.monotonic() + 5
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats().running == 0


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": LM, "prompt": ""}, "prompt"),
        ({"model": LM, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": LM, "prompt": "x", "temperature": -1}, "temperature"),
        ({"model": LM, "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"model": LM, "prompt": "x", "n": 17}, "n"),
        ({"model": LM, "prompt": "x", "max_tokens": 2 * CONTEXT}, "max_tokens"),
        ({"model": LM, "prompt": "def f(x): return x\n" * 130}, "prompt"),
        ({"prompt": "x"}, "model"),
    ],
)
def test_bad_completion_requests_get_openai_errors(server, body, param):
    status, out = post(server[0] + "/v1/completions", json.dumps(body).encode())
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error" and out["error"]["message"]


def test_unknown_model_huge_body_and_bad_json(server, client):
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.completions.create(model="no-such-model", prompt="x")
    status, out = post(server[0] + "/v1/completions", b'{"model": "x", "prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}')
    assert status == 413 and "larger than" in out["error"]["message"]
    status, out = post(server[0] + "/v1/chat/completions", b"{not json")
    assert status == 400 and out["error"]["type"] == "invalid_request_error"
    status, out = post(server[0] + "/v1/embeddings", json.dumps({"model": EMB, "input": []}).encode())
    assert status == 400 and out["error"]["param"] == "input"
    status, out = post(server[0] + "/v1/embeddings", json.dumps({"model": EMB, "input": ["x"] * 2049}).encode())
    assert status == 400 and out["error"]["param"] == "input" and "2,048" in out["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=LM, input="x")


def test_tokenize_and_detokenize_agree_with_what_generation_counts(server, client):
    base, lm = server
    text = "def f(x):\n    return x"
    status, out = post(base + "/v1/tokenize", json.dumps({"model": LM, "prompt": text, "return_token_strs": True}).encode())
    assert status == 200 and out["tokens"] == lm.tokenizer.encode(text, add_special_tokens=False)
    assert out["count"] == len(out["tokens"]) == client.completions.create(model=LM, prompt=text, max_tokens=1).usage.prompt_tokens
    assert out["max_model_len"] == CONTEXT and len(out["token_strs"]) == out["count"]
    assert post(base + "/v1/detokenize", json.dumps({"model": LM, "tokens": out["tokens"]}).encode()) == (200, {"prompt": text})

    messages = [{"role": "user", "content": "hi"}]
    status, chat = post(base + "/v1/tokenize", json.dumps({"model": LM, "messages": messages}).encode())
    assert status == 200 and chat["token_strs"] is None
    assert chat["count"] == client.chat.completions.create(model=LM, messages=messages, max_tokens=1).usage.prompt_tokens
    for body, param in (({"model": LM}, "messages"), ({"model": LM, "prompt": "x", "messages": messages}, "messages"),
                        ({"model": LM, "prompt": ""}, "prompt")):
        status, err = post(base + "/v1/tokenize", json.dumps(body).encode())
        assert status == 400 and err["error"]["param"] == param, err
    status, err = post(base + "/v1/detokenize", json.dumps({"model": LM, "tokens": [10**6]}).encode())
    assert status == 400 and err["error"]["param"] == "tokens", err
    status, err = post(base + "/v1/tokenize", json.dumps({"model": "nope", "prompt": "x"}).encode())
    assert status == 404 and err["error"]["param"] == "model"


def test_prompt_lists_answer_each_prompt_as_alone_and_echo_starts_with_the_prompt(server, client):
    base, lm = server
    kwargs = {"model": LM, "max_tokens": 5, "temperature": 0, "extra_body": {"ignore_eos": True}}
    prompts = ["def f(x):", "import os"]
    alone = [client.completions.create(prompt=p, **kwargs) for p in prompts]
    batch = client.completions.create(prompt=prompts, n=2, **kwargs)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]  # choice i*n+j: prompt i's j-th
    assert [c.text for c in batch.choices] == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone) and batch.usage.completion_tokens == 20
    ids = [lm.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    assert [c.text for c in client.completions.create(prompt=ids, **kwargs).choices] == [a.choices[0].text for a in alone]

    echoed = client.completions.create(prompt=prompts[0], echo=True, **kwargs)
    assert echoed.choices[0].text == prompts[0] + alone[0].choices[0].text
    assert echoed.usage.completion_tokens == 5
    assert client.completions.create(prompt=ids[1], echo=True, **kwargs).choices[0].text == prompts[1] + alone[1].choices[0].text
    chunks = list(client.completions.create(prompt=prompts, echo=True, stream=True, stream_options={"include_usage": True}, **kwargs))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(2)]
    assert texts == [p + a.choices[0].text for p, a in zip(prompts, alone)]
    assert chunks[-1].usage.prompt_tokens == batch.usage.prompt_tokens and chunks[-1].usage.completion_tokens == 10

    for body, param in (({"prompt": "x", "echo": True, "logprobs": 1}, "echo"), ({"prompt": ["x"] * 65}, "prompt"),
                        ({"prompt": ["x", 5]}, "prompt")):
        status, err = post(base + "/v1/completions", json.dumps({"model": LM, "max_tokens": 2, **body}).encode())
        assert status == 400 and err["error"]["param"] == param, err


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["paris", "rome"]}}, "required": ["city"]},
}}


def test_tools_on_lmaas_engine_are_rendered_with_tool_choice_none_or_auto_and_forced_calls_are_400s(server, client):
    base, _ = server
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    kwargs = {"model": LM, "messages": messages, "max_tokens": 4, "temperature": 0, "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(**kwargs)
    with_tools = client.chat.completions.create(tools=[WEATHER], tool_choice="none", **kwargs)
    assert isinstance(with_tools.choices[0].message.content, str) and not with_tools.choices[0].message.tool_calls
    assert with_tools.choices[0].finish_reason == "length" and with_tools.usage.completion_tokens == 4
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # the system block listing the tool
    status, counted = post(base + "/v1/tokenize", json.dumps({"model": LM, "messages": messages, "tools": [WEATHER]}).encode())
    assert status == 200 and counted["count"] == with_tools.usage.prompt_tokens

    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                               "function": {"name": "get_weather", "arguments": '{"city": "paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    follow_up = client.chat.completions.create(**{**kwargs, "messages": history}, tools=[WEATHER], tool_choice="none")
    assert follow_up.usage.prompt_tokens > with_tools.usage.prompt_tokens

    chat = {"model": LM, "messages": messages, "max_tokens": 4, "tools": [WEATHER]}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):  # need structured output: vLLM's
        status, out = post(base + "/v1/chat/completions", json.dumps({**chat, "tool_choice": choice}).encode())
        assert status == 400 and out["error"]["param"] == "tool_choice", (choice, out)
    for choice in ("auto", None):  # (None: the default with tools, "auto") the random model writes no <tool_call>: text
        status, out = post(base + "/v1/chat/completions", json.dumps({**chat, "tool_choice": choice}).encode())
        assert status == 200 and isinstance(out["choices"][0]["message"]["content"], str), (choice, out)
        assert not out["choices"][0]["message"].get("tool_calls"), out
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=LM, messages=messages, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.value.body["param"] == "tool_choice"
