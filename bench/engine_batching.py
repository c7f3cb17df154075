"""Engine-level decode throughput: lmaas continuous batching vs one-at-a-time `generate` vs transformers' CB.

    PYTHONPATH=platform python bench/engine_batching.py [--threads 2] [--new-tokens 64]

No HTTP, no Ray: N requests submitted together, output tokens/s over the wall time they take.
Writes bench/results/engine_batching.json (one entry per concurrency) for `bench/report.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_helpers import stdlib_lines  # noqa: E402

from lmaas.data.tokenizer import train_bpe  # noqa: E402
from lmaas.models import build_model, model_config, parameter_count, save_model  # noqa: E402
from lmaas.serve.engine import CausalLMEngine, GenerationRequest, SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--hf-cb", action="store_true", help="also time transformers generate_batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp())
    spec = train_bpe(stdlib_lines(), 2048)
    config = model_config("small", vocab_size=8192, max_seq_len=512, eos_id=spec.eos_id, hidden_size=384, intermediate_size=1024,
                          num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=3)
    model = build_model(config)
    model_dir = save_model(model, root / "model", tokenizer_dir=spec.save(root / "tok"))
    print(f"model: {parameter_count(model) / 1e6:.1f}M params, threads {args.threads}, {args.new_tokens} new tokens per request")
    engine = CausalLMEngine(model_dir, max_batch_size=32, num_threads=args.threads)
    prompts = [engine.tokenizer.encode(line, add_special_tokens=False)[:24] or [1] for line in stdlib_lines()[:64]]
    n_new = args.new_tokens

    def sequential(n: int) -> float:
        start = time.perf_counter()
        for ids in prompts[:n]:
            with torch.inference_mode():
                engine.model.generate(
                    torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new
                )
        return n * n_new / (time.perf_counter() - start)

    def batched(n: int) -> float:
        async def one(i: int) -> int:
            request = GenerationRequest(f"b{n}-{i}", prompts[i], SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True))
            return len([e async for e in engine.generate(request)])

        async def run() -> int:
            return sum(await asyncio.gather(*(one(i) for i in range(n))))

        start = time.perf_counter()
        tokens = asyncio.run(run())
        return tokens / (time.perf_counter() - start)

    def hf_continuous(n: int) -> float:
        from transformers import GenerationConfig

        gen = GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=-1, pad_token_id=0)
        start = time.perf_counter()
        engine.model.generate_batch(inputs=prompts[:n], generation_config=gen, progress_bar=False)
        return n * n_new / (time.perf_counter() - start)

    sequential(1)
    batched(1)
    levels = []
    for n in (int(c) for c in args.concurrency.split(",")):
        base, mine = sequential(n), batched(n)
        levels.append({"concurrency": n, "generate_tokens_per_s": base, "lmaas_tokens_per_s": mine, "ratio": mine / base})
        line = f"concurrency {n:>2}: generate one-at-a-time {base:7.1f} tok/s | lmaas engine {mine:7.1f} tok/s ({mine / base:4.1f}x)"
        if args.hf_cb:
            try:
                line += f" | transformers generate_batch {hf_continuous(n):7.1f} tok/s"
            except Exception as exc:  # noqa: BLE001
                line += f" | transformers generate_batch failed: {type(exc).__name__}: {str(exc)[:80]}"
        print(line, flush=True)
    asyncio.run(engine.close())
    out = Path(__file__).resolve().parent / "results" / "engine_batching.json"
    out.write_text(json.dumps({"parameters": parameter_count(model), "threads": args.threads, "new_tokens": n_new,
                               "levels": levels}, indent=1))


if __name__ == "__main__":
    main()
