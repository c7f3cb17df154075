"""Serving a causal LM over HTTP: lmaas through Ray Serve vs a naive FastAPI + uvicorn `generate` server.

    PYTHONPATH=platform python bench/serve_llm.py [--new-tokens 64 --concurrency 1,4,16]

One run, same model (a 10.5M-parameter random-weight Llama whose vocab matches its tokenizer, so every token streams text, greedy, `ignore_eos` so every request
generates exactly --new-tokens), same client (httpx, streaming SSE `/v1/completions`):
  (a) baseline: FastAPI + uvicorn in one process, `model.generate` one request at a time behind a
      lock, each token streamed as it is produced;
  (b) lmaas: `lmaas.serve.deployments.build_app` on a local Ray cluster (HAProxy proxy), the model
      registered in a temporary registry, one replica running the continuous-batching engine.
At each concurrency it reports output tokens/s, p50/p99 time to first token and inter-token latency,
plus this machine's matmul roofline (measured GFLOP/s / (2 x params) tokens/s). Both servers stay up
and each concurrency level runs them back to back (never at the same time). Writes bench/results/serve_llm.json and serve_llm.png.
"""

# no `from __future__ import annotations`: FastAPI must resolve the baseline handler's local `Request` annotation

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import AUTH, free_port, matmul_gflops, pct, start_lmaas, stop_lmaas, wait_http  # noqa: E402

RESULTS = Path(__file__).parent / "results"
THREADS = 2


def build_model(root: Path) -> tuple[Path, int]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serve_helpers import stdlib_lines

    from lmaas.data.tokenizer import train_bpe
    from lmaas.models import build_model as build, model_config, parameter_count, save_model

    spec = train_bpe(stdlib_lines(), 2048)
    config = model_config("small", vocab_size=spec.vocab_size, max_seq_len=512, eos_id=spec.eos_id, hidden_size=384, intermediate_size=1024,
                          num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=3)
    model = build(config)
    return save_model(model, root / "model", tokenizer_dir=spec.save(root / "tok")), parameter_count(model)


# ---- (a) the naive baseline server (run in its own process) ----


def baseline_server(model_dir: str, port: int) -> None:
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    app = FastAPI()
    lock = asyncio.Lock()

    class QueueStreamer(BaseStreamer):
        def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
            self.loop, self.queue, self.first = loop, queue, True

        def put(self, value) -> None:  # noqa: ANN001
            if self.first:  # generate passes the prompt first
                self.first = False
                return
            self.loop.call_soon_threadsafe(self.queue.put_nowait, int(value.reshape(-1)[0]))

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    @app.post("/v1/completions")
    async def complete(request: Request):  # noqa: ANN202
        body = await request.json()
        ids = tokenizer.encode(body["prompt"], add_special_tokens=False)
        n = body["max_tokens"]

        async def stream():  # noqa: ANN202
            async with lock:  # one request at a time
                queue: asyncio.Queue = asyncio.Queue()
                streamer = QueueStreamer(asyncio.get_running_loop(), queue)

                def run() -> None:
                    with torch.inference_mode():
                        model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                                       max_new_tokens=n, min_new_tokens=n, max_length=None, streamer=streamer)

                thread = threading.Thread(target=run)
                thread.start()
                count = 0
                while (token := await queue.get()) is not None:
                    count += 1
                    yield f"data: {json.dumps({'choices': [{'text': tokenizer.decode([token])}]})}\n\n"
                thread.join()
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': count}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- the client ----


async def one_stream(client, url: str, model: str, prompt: str | list[int], n: int) -> dict:  # noqa: ANN001
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                arrivals.append(time.perf_counter() - start)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter() - start
    return {"ttft": arrivals[0], "itl": [b - a for a, b in zip(arrivals, arrivals[1:])], "tokens": tokens,
            "tpot": (end - arrivals[0]) / max(tokens - 1, 1)}


async def load(url: str, model: str, prompts: list[str], concurrency: int, requests: int, n: int) -> dict:
    import httpx

    queue = list(range(requests))
    results: list[dict] = []
    async with httpx.AsyncClient(headers=AUTH, timeout=600) as client:
        async def worker() -> None:
            while queue:
                i = queue.pop()
                results.append(await one_stream(client, url, model, prompts[i % len(prompts)], n))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    assert all(r["tokens"] == n for r in results), [r["tokens"] for r in results]
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])
    return {
        "concurrency": concurrency, "requests": requests, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
        "itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99),
    }


def sweep(name: str, url: str, model: str, prompts: list[str], levels: list[int], n: int) -> list[dict]:
    asyncio.run(load(url, model, prompts, 2, 2, 8))  # warm up
    out = []
    for c in levels:
        row = asyncio.run(load(url, model, prompts, c, max(4, 2 * c), n))
        print(f"{name:8s} c={c:2d}: {row['tokens_per_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:7.1f} p99 {row['ttft_p99_ms']:7.1f} ms  "
              f"ITL p50 {row['itl_p50_ms']:6.1f} p99 {row['itl_p99_ms']:6.1f} ms", flush=True)
        out.append(row)
    return out


def roofline(params: int) -> dict:
    gflops = matmul_gflops(THREADS)
    return {"matmul_gflops": gflops, "flops_per_token": 2 * params, "roofline_tokens_per_s": gflops * 1e9 / (2 * params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--proxy", choices=("haproxy", "default"), default="haproxy", help="Serve's HTTP proxy")
    parser.add_argument("--only", choices=("baseline", "lmaas"), help="run one side (for probing; writes no results)")
    parser.add_argument("--baseline-server", nargs=2, metavar=("MODEL_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        return baseline_server(args.baseline_server[0], int(args.baseline_server[1]))
    levels = [int(c) for c in args.concurrency.split(",")]
    root = Path(tempfile.mkdtemp(prefix="serve-llm-"))
    model_dir, params = build_model(root)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serve_helpers import stdlib_lines

    prompts = [line.strip()[:60] for line in stdlib_lines()[:64]]
    print(f"model: {params / 1e6:.1f}M params, {args.new_tokens} new tokens per request, {THREADS} torch threads, concurrency {levels}")

    # both servers stay up; each concurrency level runs the baseline then lmaas back to back, so load
    # from other work on a shared machine hits both sides alike (the idle side waits, using ~no CPU)
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--baseline-server", str(model_dir), str(port)])
    baseline, lmaas = [], []
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_http(base_url, 60)
        lmaas_url = start_lmaas(
            root / "home", [("bench-lm", model_dir, "causal-lm")],
            [{"ref": "bench-lm", "num_cpus": 1, "max_ongoing_requests": 64, "target_ongoing_requests": 32, "refresh_interval_s": 0,
              "engine": {"max_batch_size": 32, "num_threads": THREADS}}],
            haproxy=args.proxy == "haproxy",
        )
        for level in levels:
            if args.only != "lmaas":
                baseline += sweep("baseline", base_url, "m", prompts, [level], args.new_tokens)
            if args.only != "baseline":
                lmaas += sweep("lmaas", lmaas_url, "bench-lm", prompts, [level], args.new_tokens)
    finally:
        server.terminate()
        server.wait(30)
        stop_lmaas()
    if args.only:
        return
    roof = roofline(params)
    print(f"roofline: matmul {roof['matmul_gflops']:.1f} GFLOP/s -> {roof['roofline_tokens_per_s']:.0f} tok/s at 2 x params FLOPs/token")
    for b, m in zip(baseline, lmaas):
        print(f"c={b['concurrency']:2d}: lmaas/baseline tokens/s {m['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
              f"TTFT p50 {m['ttft_p50_ms'] / b['ttft_p50_ms']:.2f}x, ITL p50 {m['itl_p50_ms'] / b['itl_p50_ms']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    result = {"model_params": params, "new_tokens": args.new_tokens, "threads": THREADS, "cpus": os.cpu_count(), "baseline": baseline,
              "lmaas": lmaas, "roofline": roof, "note": "2-core shared machine, no GPU; numbers are noisy"}
    (RESULTS / "serve_llm.json").write_text(json.dumps(result, indent=2))
    plot(result)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("baseline", "lmaas"):
        rows = result[name]
        xs = [r["concurrency"] for r in rows]
        ax1.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=name)
        ax2.plot(xs, [r["ttft_p50_ms"] for r in rows], marker="o", label=f"{name} TTFT p50")
    ax1.axhline(result["roofline"]["roofline_tokens_per_s"], ls="--", c="gray", label="matmul roofline")
    ax1.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="output tokens/s", title="throughput")
    ax2.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="time to first token")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "serve_llm.png", dpi=100)


if __name__ == "__main__":
    main()
