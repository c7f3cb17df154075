"""Ingest throughput: the Ray Data tokenize + pack pipeline against a single-process loop.

    python bench/data_ingest.py [--files 400 --vocab-size 4096 --block-size 256 --cpus 2 --cpus-per-task 1 --batch-size 50 --repeat 3]

Same input (the built-in stdlib corpus, already in memory), same trained tokenizer, same packing
code. Baseline: one process, `encode_batch` over batches of documents with tokenizers' own
thread pool off (TOKENIZERS_PARALLELISM=false), `split_streams` + `Packer.extend` per batch.
lmaas: `ingest.tokenize_documents` (the `map_batches` tasks `ingest()` runs; each returns one
compact int32 stream per split) on a local Ray cluster (each task single-threaded too,
parallelism comes from Ray), the driver packing the streams in order and writing the Parquet shards
exactly as `ingest()` does, under `ingest.pipeline_context()`. Each side runs --repeat times (Ray
after one untimed warm-up pass); the medians give tokens/s for both and the ratio (target on 2
cores: >= 1.6x), written to bench/results/data_ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=256)
    # 8 tasks of 50 documents (4 per core) even out the stdlib files' uneven sizes; 4 tasks of 100 leave a straggler
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=0, help="input blocks (0: files / batch-size)")
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each side; the median counts")
    args = parser.parse_args()

    import ray

    from lmaas.data import corpus, tokenizer
    from lmaas.data.config import IngestConfig
    from lmaas.data.ingest import _pack_and_write, pipeline_context, tokenize_documents

    texts = [p.read_text() for p in corpus.stdlib_files(args.files)]
    spec = tokenizer.train_bpe(texts[:500], args.vocab_size)
    config = IngestConfig(
        vocab_size=args.vocab_size, block_size=args.block_size, batch_size=args.batch_size, cpus_per_task=args.cpus_per_task
    )

    # baseline: one process, one thread (median of --repeat runs, like the Ray side)
    base_times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        tokens, rows = _baseline(texts, spec, config)
        base_times.append(time.perf_counter() - start)
    base_s = statistics.median(base_times)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
    # many blocks, as read_binary_files gives (one per file group): tasks can run side by side
    blocks = args.blocks or max(1, len(texts) // args.batch_size)
    ray_times = []
    # the Ray Data settings ingest() runs under; a Dataset keeps the settings current when it was
    # created, so the input is made inside too (as ingest() reads its sources inside)
    with pipeline_context():
        docs = ray.data.from_items([{"text": t} for t in texts], override_num_blocks=blocks).materialize()
        # the first pass warms the worker processes (imports, tokenizer compile) and is not timed
        for i in range(args.repeat + 1):
            start = time.perf_counter()
            stats = _ray_pipeline(docs, spec, config, tokenize_documents, _pack_and_write)
            if i:
                ray_times.append(time.perf_counter() - start)
    ray_s = statistics.median(ray_times)
    ray.shutdown()
    assert stats["tokens_seen"] == tokens and stats["train_rows"] + stats["validation_rows"] == rows

    result = {
        "documents": len(texts),
        "tokens": tokens,
        "cpus": args.cpus,
        "baseline_tokens_per_s": tokens / base_s,
        "ray_tokens_per_s": tokens / ray_s,
        "ratio": base_s / ray_s,
        "baseline_s": base_times,
        "ray_s": ray_times,
    }
    print(f"{len(texts)} documents, {tokens:,} tokens, {args.cpus} CPUs")
    print(f"  single-process loop   {tokens / base_s:12,.0f} tokens/s  ({base_s:.2f} s)")
    print(f"  Ray Data pipeline     {tokens / ray_s:12,.0f} tokens/s  ({ray_s:.2f} s)")
    print(f"  ratio (Ray / loop)    {base_s / ray_s:12.2f}x   (target >= 1.6x on 2 cores)")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "data_ingest.json").write_text(json.dumps(result, indent=1))


def _baseline(texts, spec, config) -> tuple[int, int]:  # noqa: ANN001
    from lmaas.data import tokenizer
    from lmaas.data.packing import Packer, split_streams

    packers = {s: Packer(config.block_size, spec.eos_id) for s in ("train", "validation")}
    tokens = rows = 0
    for i in range(0, len(texts), config.batch_size):
        batch = texts[i : i + config.batch_size]
        streams = split_streams(batch, tokenizer.encode_batch(spec.json, batch), spec.eos_id, config.validation_percent)
        for split, (stream, count) in streams.items():
            tokens += len(stream) - count
            rows += len(packers[split].extend(stream))
    return tokens, rows


def _ray_pipeline(docs, spec, config, tokenize, pack_and_write) -> dict:  # noqa: ANN001
    tokenized = tokenize(docs, spec, config)
    with tempfile.TemporaryDirectory() as out:
        return pack_and_write(tokenized, spec, config, Path(out), None)


if __name__ == "__main__":
    main()
