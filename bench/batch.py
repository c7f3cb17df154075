"""Offline batch throughput: `lmaas batch` (Ray Data, model actors) vs the online API at 16 streams vs the engine alone.

    PYTHONPATH=platform python bench/batch.py [--lines 2000 --new-tokens 64 --size small] [--actors 2]

The same completion lines (greedy, `ignore_eos`, so every line generates exactly --new-tokens tokens) and the same
model (tests/serve_helpers.make_causal_lm's random-weight Llama of --size, served by lmaas's engine) three ways, one
after the other on one node, each with all its CPUs:
  (a) `lmaas batch`: `run_batch` on a running local Ray cluster, with its default placement (one 1-CPU actor, one torch
      thread, per CPU) or `--actors` actors sharing the CPUs, from the JSONL file to the published output: Ray Data's start and every actor's start, download and
      model load are on its clock (a batch is one job; the cluster is up already, as on a real one);
  (b) online: lmaas's OpenAI app (`build_openai_app` under uvicorn, as tests/integration/test_openai_http.py starts it;
      not behind Ray Serve, whose proxy is the slowest part on 2 cores, NOTES.md) in its own process, started and warmed
      before the clock, 16 client threads here posting `/v1/completions` (whole answers, as batch lines get);
  (c) engine: `python -c` of a script that imports lmaas, loads `CausalLMEngine` and answers every line at once through
      `OpenAIServing` (what one batch actor does, without Ray), process start to exit.
Each reports output tokens/s end to end and steady (start-up aside: the batch's blocks after its first, the engine's
answering after its load; the warm server's are both the same). Targets: batch >= 1.2x online and >= 0.8x the engine
alone. Then --embedding-lines embedding lines (MiniLM) through `lmaas batch` vs sentence-transformers' `encode` with its
own batching in one fresh process, texts/s (target >= 0.8x). Writes bench/results/batch.json and batch.png.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from serve_common import free_port, wait_http
from serve_helpers import make_causal_lm, stdlib_lines

if TYPE_CHECKING:
    from lmaas.registry import ModelRegistry

RESULTS = ROOT / "bench" / "results"
STREAMS = 16


def requests(n: int, new_tokens: int) -> list[dict]:
    """Batch lines: completions of distinct stdlib lines, greedy, exactly `new_tokens` tokens each."""
    source = [line.strip()[:56] for line in stdlib_lines(limit=100_000)]
    prompts = [source[i % len(source)] + (f" #{i // len(source)}" if i >= len(source) else "") for i in range(n)]  # n distinct prompts
    body = {"model": "tiny", "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    return [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": {**body, "prompt": p or "x"}} for i, p in enumerate(prompts)]


def start_ray(cpus: int) -> None:
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="error")


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def placement(actors: int | None, cpus: int) -> dict:
    """`--actors` actors sharing the CPUs, or lmaas batch's default placement."""
    return {"concurrency": actors, "num_cpus": cpus / actors} if actors else {}


def timed_batch(config, registry: ModelRegistry, measure) -> tuple:  # noqa: ANN001 - a BatchConfig; BatchProgress -> int
    """`run_batch` timed from the call to the published output: (result, seconds, [(seconds, measure(progress))] per block)."""
    from lmaas.batch import run_batch

    marks: list[tuple[float, int]] = []
    start = time.perf_counter()
    result = run_batch(config, registry=registry, progress=lambda p: marks.append((time.perf_counter() - start, measure(p)))
                       if p.stage == "running" else None)
    return result, time.perf_counter() - start, marks


def run_batch_job(root: Path, registry: ModelRegistry, lines: list[dict], actors: int | None, cpus: int) -> dict:
    """`run_batch` on the running cluster, timed from the call to the published output; its steady rate is the output
    tokens of every block but the first over the time from the first block written to the last."""
    from lmaas.batch import BatchConfig

    config = BatchConfig(input=str(write_jsonl(root / f"requests-{len(lines)}.jsonl", lines)), model="tiny",
                         output=str(root / f"answers-{len(lines)}.jsonl"), overwrite=True, lines_per_block=64,
                         engine={"engine": "lmaas", "max_batch_size": 64}, **placement(actors, cpus))
    result, seconds, marks = timed_batch(config, registry, lambda p: p.output_tokens)
    assert result.completed == len(lines), result
    (first_s, first_tokens), (last_s, last_tokens) = marks[0], marks[-1]
    steady = (last_tokens - first_tokens) / (last_s - first_s)
    return {"seconds": seconds, "output_tokens": result.output_tokens, "tokens_per_s": result.output_tokens / seconds,
            "steady_tokens_per_s": steady, "first_block_s": first_s, "blocks": len(marks), "actors": result.actors}


ENGINE_ALONE = """
import asyncio, json, sys, time
from lmaas.batch.lines import RequestLimiter, answer_line
from lmaas.serve.engine import CausalLMEngine
from lmaas.serve.openai_api import OpenAIServing
engine = CausalLMEngine(sys.argv[1], model_id="tiny", num_threads=int(sys.argv[3]), max_batch_size=64)
serving = OpenAIServing({"tiny": engine})
lines = open(sys.argv[2]).read().splitlines()
loaded = time.perf_counter()
async def run():
    limiter = RequestLimiter(512)
    return await asyncio.gather(*(answer_line(text, i + 1, serving, ("tiny",), limiter) for i, text in enumerate(lines)))
answers = asyncio.run(run())
assert all(a.ok for a in answers)
print(json.dumps({"output_tokens": sum(a.completion_tokens for a in answers), "answering_s": time.perf_counter() - loaded}))
"""


def run_engine_alone(root: Path, model_dir: Path, lines: list[dict], threads: int) -> dict:
    """A fresh process: import, load the engine, answer every line at once (`answer_line`, as a batch actor does)."""
    source = write_jsonl(root / f"engine-{len(lines)}.jsonl", lines)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ENGINE_ALONE, str(model_dir), str(source), str(threads)], env=env, capture_output=True,
                          text=True, check=True)
    seconds = time.perf_counter() - start
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "output_tokens": out["output_tokens"], "tokens_per_s": out["output_tokens"] / seconds,
            "steady_tokens_per_s": out["output_tokens"] / out["answering_s"], "fixed_s": seconds - out["answering_s"]}


SERVER = """
import sys, uvicorn
from lmaas.serve.engine import CausalLMEngine
from lmaas.serve.openai_app import build_openai_app
engine = CausalLMEngine(sys.argv[1], model_id="tiny", num_threads=int(sys.argv[3]), max_batch_size=64)
uvicorn.run(build_openai_app({"tiny": engine}), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


class OnlineServer:
    """lmaas's OpenAI app over one engine, in its own process (started once, warm for every run)."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(model_dir), self.url.rsplit(":", 1)[1], str(threads)], env=env)
        wait_http(self.url, 120)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)

    def run(self, lines: list[dict]) -> dict:
        """Every line's body posted to /v1/completions by `STREAMS` client threads."""
        todo: queue.Queue = queue.Queue()
        for line in lines:
            todo.put(line["body"])
        tokens: list[int] = []

        def client() -> None:
            while True:
                try:
                    body = todo.get_nowait()
                except queue.Empty:
                    return
                request = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=300) as response:
                    tokens.append(json.loads(response.read())["usage"]["completion_tokens"])

        start = time.perf_counter()
        clients = [threading.Thread(target=client) for _ in range(STREAMS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        seconds = time.perf_counter() - start
        assert len(tokens) == len(lines)
        return {"seconds": seconds, "output_tokens": sum(tokens), "tokens_per_s": sum(tokens) / seconds, "steady_tokens_per_s": sum(tokens) / seconds}


def embedding_lines(n: int) -> list[dict]:
    """Embedding lines: one stdlib source line (distinct, up to ~60 characters) each."""
    source = [line.strip()[:60] for line in stdlib_lines(limit=100_000)]
    texts = [source[i % len(source)] + (f" #{i // len(source)}" if i >= len(source) else "") for i in range(n)]
    return [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "minilm", "input": t}}
            for i, t in enumerate(texts)]


def run_embedding_batch(root: Path, registry: ModelRegistry, lines: list[dict], actors: int | None, cpus: int) -> dict:
    """`run_batch` of embedding lines with the embedding engine, timed from the call to the published output."""
    from lmaas.batch import BatchConfig

    config = BatchConfig(input=str(write_jsonl(root / f"embed-{len(lines)}.jsonl", lines)), model="minilm",
                         output=str(root / f"vectors-{len(lines)}.jsonl"), overwrite=True, lines_per_block=128, **placement(actors, cpus))
    result, seconds, marks = timed_batch(config, registry, lambda p: p.done)
    assert result.completed == len(lines), result
    (first_s, first_done), (last_s, last_done) = marks[0], marks[-1]
    return {"seconds": seconds, "texts": len(lines), "texts_per_s": len(lines) / seconds,
            "steady_texts_per_s": (last_done - first_done) / (last_s - first_s), "first_block_s": first_s, "actors": result.actors}


ST_ALONE = """
import json, sys, time
from sentence_transformers import SentenceTransformer
import torch
torch.set_num_threads(int(sys.argv[3]))
model = SentenceTransformer(sys.argv[1], device="cpu")
texts = [json.loads(line)["body"]["input"] for line in open(sys.argv[2])]
loaded = time.perf_counter()
vectors = model.encode(texts, batch_size=32, normalize_embeddings=True)
assert len(vectors) == len(texts)
print(json.dumps({"encode_s": time.perf_counter() - loaded}))
"""


def run_sentence_transformers(root: Path, lines: list[dict], threads: int) -> dict:
    """A fresh process: import sentence-transformers, load MiniLM, `encode` every text with its own batching (32)."""
    from serve_helpers import EMBEDDING_DIR

    source = write_jsonl(root / f"st-{len(lines)}.jsonl", lines)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ST_ALONE, str(EMBEDDING_DIR), str(source), str(threads)], capture_output=True, text=True,
                          check=True)
    seconds = time.perf_counter() - start
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "texts": len(lines), "texts_per_s": len(lines) / seconds, "steady_texts_per_s": len(lines) / out["encode_s"],
            "fixed_s": seconds - out["encode_s"]}


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["lmaas batch", f"online API ({STREAMS} streams)", "engine alone"]
    keys = ["batch", "online", "engine"]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(keys))
    ax.bar([i - 0.2 for i in x], [result[k]["tokens_per_s"] for k in keys], width=0.4, label=f"end to end, {result['lines']} lines")
    ax.bar([i + 0.2 for i in x], [result[k]["steady_tokens_per_s"] for k in keys], width=0.4, label="steady (start-up aside)")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"completions x {result['new_tokens']} tokens, {result['size']} model, {result['cpus']} CPUs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "batch.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--actors", type=int, default=None, help="default: lmaas batch's own (one 1-CPU actor per CPU)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--embedding-lines", type=int, default=4000, help="embedding lines vs sentence-transformers (0: none)")
    parser.add_argument("--size", default="small", help="model size (lmaas.models SIZES): tiny (~0.2M params) or small (~5M)")
    args = parser.parse_args()
    from lmaas import db
    from lmaas.registry import ModelRegistry
    from lmaas.storage import Storage

    root = Path(tempfile.mkdtemp(prefix="lmaas-bench-batch-"))
    model_dir = make_causal_lm(root / "lm", size=args.size, max_seq_len=256)
    registry = ModelRegistry(Storage(f"file://{root / 'store'}"), db.connect(f"sqlite:///{root / 'lmaas.db'}"))
    registry.register_version("tiny", model_dir, task="causal-lm")
    lines = requests(args.lines, args.new_tokens)
    result = {"lines": args.lines, "new_tokens": args.new_tokens, "cpus": args.cpus, "size": args.size}
    result["engine"] = run_engine_alone(root, model_dir, lines, args.cpus)
    server = OnlineServer(model_dir, args.cpus)
    try:
        server.run(requests(16, 4))  # warm-up
        result["online"] = server.run(lines)
    finally:
        server.close()
    start_ray(args.cpus)
    result["batch"] = run_batch_job(root, registry, lines, args.actors, args.cpus)
    e, o, b = result["engine"], result["online"], result["batch"]
    print(f"engine alone (fresh process)  : {e['tokens_per_s']:6.0f} output tok/s end to end ({e['seconds']:.1f} s), "
          f"{e['steady_tokens_per_s']:6.0f} once loaded ({e['fixed_s']:.1f} s to import and load)")
    print(f"online API, {STREAMS} streams (warm) : {o['tokens_per_s']:6.0f} output tok/s ({o['seconds']:.1f} s)")
    print(f"lmaas batch, {b['actors']} actor(s)         : {b['tokens_per_s']:6.0f} output tok/s end to end ({b['seconds']:.1f} s), "
          f"{b['steady_tokens_per_s']:6.0f} steady over {b['blocks']} blocks (first block out at {b['first_block_s']:.1f} s)")
    result["ratios"] = {"batch_vs_online": b["tokens_per_s"] / o["tokens_per_s"], "batch_vs_engine": b["tokens_per_s"] / e["tokens_per_s"],
                        "steady_batch_vs_online": b["steady_tokens_per_s"] / o["steady_tokens_per_s"],
                        "steady_batch_vs_engine": b["steady_tokens_per_s"] / e["steady_tokens_per_s"]}
    r = result["ratios"]
    print(f"batch / online: {r['batch_vs_online']:.2f}x end to end, {r['steady_batch_vs_online']:.2f}x steady (target >= 1.2); "
          f"batch / engine: {r['batch_vs_engine']:.2f}x end to end, {r['steady_batch_vs_engine']:.2f}x steady (target >= 0.8)")
    if args.embedding_lines:
        import shutil

        from serve_helpers import EMBEDDING_DIR

        emb = root / "minilm"
        shutil.copytree(EMBEDDING_DIR, emb, ignore=shutil.ignore_patterns("*.md"))
        registry.register_version("minilm", emb, task="embedding")
        texts = embedding_lines(args.embedding_lines)
        st = run_sentence_transformers(root, texts, args.cpus)
        eb = run_embedding_batch(root, registry, texts, args.actors, args.cpus)
        result["embeddings"] = {"lines": len(texts), "sentence_transformers": st, "batch": eb,
                                "ratios": {"batch_vs_st": eb["texts_per_s"] / st["texts_per_s"],
                                           "steady_batch_vs_st": eb["steady_texts_per_s"] / st["steady_texts_per_s"]}}
        er = result["embeddings"]["ratios"]
        print(f"sentence-transformers encode : {st['texts_per_s']:6.0f} texts/s end to end ({st['seconds']:.1f} s), "
              f"{st['steady_texts_per_s']:6.0f} once loaded ({st['fixed_s']:.1f} s to import and load)")
        print(f"lmaas batch of embeddings    : {eb['texts_per_s']:6.0f} texts/s end to end ({eb['seconds']:.1f} s), "
              f"{eb['steady_texts_per_s']:6.0f} steady (first block out at {eb['first_block_s']:.1f} s)")
        print(f"embeddings batch / sentence-transformers: {er['batch_vs_st']:.2f}x end to end, {er['steady_batch_vs_st']:.2f}x steady "
              "(target >= 0.8)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch.json").write_text(json.dumps(result, indent=1))
    plot(result)


if __name__ == "__main__":
    main()
