"""The continuous-batching engine, driven directly (no HTTP): exactness, joining mid-batch, sampling, limits."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_helpers import EMBEDDING_DIR, make_causal_lm  # noqa: E402

from lmaas.errors import ConfigError, InvalidInputError
from lmaas.serve.engine import CausalLMEngine, EmbeddingEngine, GenerationRequest, SamplingParams, VLLMEngine

PROMPTS = ["def f(x):", "import os\nclass Foo:\n    def bar(self, a, b):\n        return a", "x", "    for line in lines:\n        if not"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # a large init scale makes the random model's greedy output vary from token to token
    model_dir = make_causal_lm(tmp_path_factory.mktemp("lm"), max_seq_len=128, initializer_range=0.5)
    engine = CausalLMEngine(model_dir, max_batch_size=8, num_threads=2)
    yield engine
    asyncio.run(engine.close())


def run(coro):
    return asyncio.run(coro)


async def collect(engine, request_id, prompt, **params):
    events = [e async for e in engine.generate(GenerationRequest(request_id, prompt, SamplingParams(**params)))]
    return events


def test_greedy_batched_equals_transformers_generate_token_for_token(engine):
    async def main():
        return await asyncio.gather(*(collect(engine, f"g{i}", p, max_tokens=24, temperature=0) for i, p in enumerate(PROMPTS)))

    outputs = run(main())
    for prompt, events in zip(PROMPTS, outputs):
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        ref = engine.model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False, max_new_tokens=24
        )[0, len(ids) :].tolist()
        got = [e.token_id for e in events]
        assert got == ref, prompt
        assert len(set(got)) > 3  # not a degenerate repeat
        assert events[-1].completion_tokens == len(got) and events[-1].prompt_tokens == len(ids)
        assert "".join(e.text for e in events) == engine.tokenizer.decode(got, skip_special_tokens=True)


def test_a_request_that_joins_mid_batch_finishes_before_the_long_ones(engine):
    async def main():
        finished = {}
        decoding = asyncio.Event()  # set once the long ones are mid-decode

        async def timed(name, prompt, max_tokens, after: asyncio.Event | None = None):
            if after is not None:
                await after.wait()
            first = None
            async for e in engine.generate(GenerationRequest(name, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))):
                first = first or time.monotonic()
                if e.completion_tokens == 5:
                    decoding.set()
                if e.finish_reason:
                    finished[name] = (time.monotonic(), first, e.completion_tokens)

        await asyncio.gather(timed("long1", "def f(x):", 100), timed("long2", "x = ", 100), timed("short", "import", 3, after=decoding))
        return finished

    finished = run(main())
    assert finished["short"][2] == 3 and finished["long1"][2] == 100
    assert finished["short"][0] < min(finished["long1"][0], finished["long2"][0])


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    params = dict(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True)

    async def main():
        return await asyncio.gather(
            collect(engine, "s1", "def f(x):", seed=7, **params),
            collect(engine, "s2", "def f(x):", seed=7, **params),
            collect(engine, "s3", "def f(x):", seed=8, **params),
        )

    a, b, c = ([e.token_id for e in events] for events in run(main()))
    assert a == b
    assert a != c


def test_stop_strings_end_the_output_before_the_stop_text(engine):
    full = run(collect(engine, "full", "def f(x):", max_tokens=30, temperature=0, ignore_eos=True))
    text = "".join(e.text for e in full)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    events = run(collect(engine, "stopped", "def f(x):", max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))
    out = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert out == text[: text.find(stop)]
    assert stop not in out


def test_max_tokens_counts_and_finish_reason_length(engine):
    for n in (1, 5, 17):
        events = run(collect(engine, f"m{n}", "import", max_tokens=n, temperature=0, ignore_eos=True))
        assert len(events) == n and events[-1].completion_tokens == n and events[-1].finish_reason == "length"
        assert all(e.finish_reason is None for e in events[:-1])


def test_logprobs_and_top_logprobs(engine):
    events = run(collect(engine, "lp", "def f(x):", max_tokens=4, temperature=0, logprobs=3))
    for e in events:
        assert len(e.top_logprobs) == 3
        assert e.logprob <= 0 and e.top_logprobs[0].token_id == e.token_id  # greedy picks the most likely
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)


def test_context_and_parameter_errors_name_the_field(engine):
    async def first(prompt, **params):
        return await engine.generate(GenerationRequest("bad", prompt, SamplingParams(**params))).__anext__()

    for params, field in [
        (dict(max_tokens=200), "max_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(n=2), "n"),
        (dict(top_p=0), "top_p"),
    ]:
        with pytest.raises(InvalidInputError) as info:
            run(first("def f(x):", **params))
        assert info.value.param == field
    with pytest.raises(InvalidInputError, match="context") as info:
        run(first("def f(x): return x\n" * 100))
    assert info.value.param == "prompt"
    with pytest.raises(InvalidInputError) as info:
        run(first(""))
    assert info.value.param == "prompt"


def test_abort_frees_the_slot_and_queued_requests_run(tmp_path):
    engine = CausalLMEngine(make_causal_lm(tmp_path, max_seq_len=512), max_batch_size=1, num_threads=2)
    try:

        async def main():
            stream = engine.generate(GenerationRequest("hog", "def", SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)))
            await stream.__anext__()
            waiter = asyncio.create_task(collect(engine, "next", "x", max_tokens=2, temperature=0, ignore_eos=True))
            await asyncio.sleep(0.1)
            assert engine.stats().running == 1 and engine.stats().waiting == 1
            await stream.aclose()  # what a disconnecting client does
            events = await asyncio.wait_for(waiter, 10)
            return events

        events = run(main())
        assert events[-1].completion_tokens == 2
        deadline = time.monotonic() + 5
        while engine.stats().running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats().running == 0 and engine.stats().waiting == 0
    finally:
        run(engine.close())


def test_chat_template_default_and_from_tokenizer_config(engine, tmp_path):
    messages = [{"role": "user", "content": "hi"}]
    ids = engine.tokenize_chat(messages)
    assert engine.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    custom = CausalLMEngine(make_causal_lm(tmp_path, chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}>"), num_threads=1)
    try:
        assert custom.tokenizer.decode(custom.tokenize_chat(messages)) == "[hi]>"
    finally:
        run(custom.close())


def test_embeddings_match_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    texts = ["The cat sat on the mat.", "A quick brown fox", "def f(x): return x", "short"]
    engine = EmbeddingEngine(EMBEDDING_DIR, num_threads=2)
    vectors, tokens = run(engine.embed(texts))
    reference = SentenceTransformer(str(EMBEDDING_DIR), device="cpu").encode(texts, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(torch.tensor(vectors), reference.float(), dim=1)
    assert cosine.min() >= 0.999
    assert tokens > len(texts)


def test_embeddings_sorted_into_small_batches_come_back_in_input_order():
    from sentence_transformers import SentenceTransformer

    texts = ["a much longer sentence about cats, mats, foxes and functions that return things", "x", "def f(x): return x", "hi there",
             "another fairly long line of text, longer than most", "ok"]
    engine = EmbeddingEngine(EMBEDDING_DIR, num_threads=2, max_batch_size=2)  # 3 forward passes over length-sorted texts
    vectors, counts = engine.encode(texts)
    reference = SentenceTransformer(str(EMBEDDING_DIR), device="cpu").encode(texts, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(torch.tensor(vectors), reference.float(), dim=1)
    assert cosine.min() >= 0.999
    assert counts == [len(engine.tokenizer(t)["input_ids"]) for t in texts]


def test_a_small_embeddings_request_is_not_held_behind_a_large_one_and_requests_are_bounded():
    """Each forward pass takes texts from every waiting request in turn; a request over the token bound is refused whole."""
    engine = EmbeddingEngine(EMBEDDING_DIR, num_threads=2, max_batch_size=4, max_tokens_per_request=2000)
    large = [f"line {i} of one large request, a little longer than the small one" for i in range(120)]  # 30 passes alone
    passes: list[list[str]] = []
    encode = engine.encode
    engine.encode = lambda texts: passes.append(list(texts)) or encode(texts)

    async def scenario():
        big = asyncio.ensure_future(engine.embed(large))
        while not passes:  # the large request is being encoded
            await asyncio.sleep(0.005)
        small = await engine.embed(["hello"])
        return small, len(passes), await big

    (small, _), passes_when_small_done, (vectors, _) = run(scenario())
    assert passes_when_small_done <= 3, passes_when_small_done  # not after the large request's 30 passes
    assert any("hello" in p and len(p) == 4 for p in passes)  # it shared a pass with the large request
    assert torch.allclose(torch.tensor(small), torch.tensor(encode(["hello"])[0]), atol=1e-5)
    assert torch.allclose(torch.tensor(vectors), torch.tensor(encode(large)[0]), atol=1e-5)  # in input order
    with pytest.raises(InvalidInputError, match="at most 2,000") as info:
        run(engine.embed(["word " * 300] * 10))  # 10 x 256 tokens (truncated to the model's context)
    assert info.value.param == "input"


def test_vllm_engine_refuses_what_it_cannot_serve_naming_the_reason(tmp_path):
    from lmaas.serve.engine import vllm

    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 2, "vocab_size": 512}
    cases = {
        "int8": ({**llama, "quantization_config": {"quant_method": "lmaas", "scheme": "int8-dynamic"}}, "int8-dynamic format"),
        "heads": ({**llama, "num_attention_heads": 4}, "head size 16"),
        "arch": ({**llama, "architectures": ["BertModel"]}, "architecture BertModel"),
    }
    for name, (config, reason) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        assert reason in vllm.unsupported(tmp_path / name)
        with pytest.raises(ConfigError, match=reason if vllm.available() else "needs vLLM") as info:
            VLLMEngine(tmp_path / name)
        assert info.value.param == "engine"
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "config.json").write_text(json.dumps(llama))
    assert vllm.unsupported(tmp_path / "ok") is None
    if vllm.available():  # a misspelt pass-through argument is named before any engine starts
        with pytest.raises(ConfigError, match="engine_kwargs.gpu_memory_utilisation is not") as info:
            VLLMEngine(tmp_path / "ok", engine_kwargs={"gpu_memory_utilisation": 0.5})
        assert info.value.param == "engine_kwargs.gpu_memory_utilisation"


def test_vllm_on_cpu_keeps_the_model_in_the_engine_cores_process_unless_threads_are_bound(monkeypatch):
    """Without thread binding, the model runs in the engine core's process (vLLM's "uni" executor), not a worker of its own."""
    from lmaas.serve.engine import vllm

    keys = ("VLLM_TARGET_DEVICE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING")
    for key in keys:  # set, then removed: monkeypatch puts each back as it was after the test
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    vllm._prepare_process("cpu", None, None)
    assert [os.environ.get(k) for k in keys] == ["cpu", "nobind", "0"]

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")  # a user who binds threads gets vLLM's own worker process
    vllm._prepare_process("cpu", None, None)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # and an explicit choice is kept
    vllm._prepare_process("cpu", None, None)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
