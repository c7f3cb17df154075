"""Training throughput: the lmaas Ray Train job (1 and 2 workers) against a plain PyTorch loop.

    python bench/train_throughput.py [--model small --steps 40 --batch 16 --cpus 2]

Same model config, same packed data (a dataset version of the built-in corpus), same global
batch per optimizer step, same total cores:
  baseline  one process, `torch.set_num_threads(cpus)`, AdamW + cosine + clipping, rows read from
            the dataset's Parquet shards into memory up front;
  lmaas-1   `lmaas.train.run.train` with 1 worker using all cores' threads;
  lmaas-2   2 DDP workers (gloo), each half the batch and half the threads.
Ray's CPU reservations leave one CPU to the Ray Data tasks that feed the workers; threads are set
explicitly, so the workers still use every core.
Steady-state tokens/s excludes warm-up: for the baseline the first `--warmup` steps; for lmaas the
first metric interval. The fixed start-up cost is fit() wall time minus steps / steady rate.
Prints ratios (target: steady-state lmaas-N / baseline >= 0.9) and writes
bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="global sequences per optimizer step")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import torch

    from lmaas import db
    from lmaas.config import Settings
    from lmaas.data.config import IngestConfig
    from lmaas.data.feed import shard_paths
    from lmaas.data.ingest import ingest, quiet_ray_data_logs
    from lmaas.models import build_model, model_config, parameter_count
    from lmaas.storage import Storage
    from lmaas.train.config import TrainConfig
    from lmaas.train.loop import lr_factor
    from lmaas.train.run import _tokenizer, train

    home = Path(tempfile.mkdtemp(prefix="lmaas-bench-train-"))
    settings = Settings(home=str(home))
    storage, engine = Storage.from_settings(settings), db.connect(settings.database_url)
    import ray

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
    quiet_ray_data_logs()
    version = ingest(
        IngestConfig(name="bench", sources=["stdlib:150"], vocab_size=args.vocab_size, block_size=args.block_size),
        storage=storage, engine=engine,
    ).version
    _, spec = _tokenizer(storage, version)
    config = model_config(args.model, vocab_size=spec.vocab_size, max_seq_len=args.block_size, eos_id=spec.eos_id)
    params = parameter_count(build_model(config))
    tokens_per_step = args.batch * args.block_size
    common = dict(dataset=version.ref, model=args.model, output_model=None, max_steps=args.steps, warmup_steps=5,
                  log_interval=5, eval_interval=10_000, checkpoint_interval=10_000, lr=1e-3, shuffle_buffer=0)

    # baseline: one plain process
    _, root = storage.pyarrow_filesystem()
    rows = pq.read_table(shard_paths(version, storage, "train")).column("input_ids").to_pylist()
    data = torch.tensor(rows, dtype=torch.int64)
    torch.set_num_threads(args.cpus)
    cfg = TrainConfig(**common)
    model = build_model(config, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    step_times = []
    for step in range(args.steps):
        start = time.perf_counter()
        i = (step * args.batch) % (len(data) - args.batch)
        batch = data[i : i + args.batch]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
    base_tps = tokens_per_step * (args.steps - args.warmup) / sum(step_times[args.warmup :])
    del model, optimizer

    runs = {}
    for workers, threads, cpus_per_worker in ((1, args.cpus, (args.cpus - 1) / 1), (2, args.cpus // 2, (args.cpus - 1) / 2)):
        tc = TrainConfig(**common, num_workers=workers, threads_per_worker=threads, cpus_per_worker=cpus_per_worker,
                         batch_size=args.batch // workers)
        reports: list[dict] = []
        start = time.perf_counter()
        train(tc, storage=storage, engine=engine, progress=reports.append)
        wall = time.perf_counter() - start
        steady = statistics.median(r["tokens_per_s"] for r in reports[1:])
        runs[f"lmaas-{workers}"] = {
            "workers": workers,
            "threads_per_worker": threads,
            "steady_tokens_per_s": steady,
            "ratio": steady / base_tps,
            "wall_s": wall,
            "startup_s": wall - args.steps * tokens_per_step / steady,
            "final_loss": reports[-1]["loss"],
        }
    ray.shutdown()

    result = {"model": args.model, "parameters": params, "steps": args.steps, "global_batch": args.batch,
              "block_size": args.block_size, "cpus": args.cpus, "baseline_tokens_per_s": base_tps,
              "baseline_final_loss": loss.item(), **runs}
    print(f"model {args.model} ({params / 1e6:.1f}M params), {args.steps} steps of {args.batch}x{args.block_size} tokens, {args.cpus} CPUs")
    print(f"  plain PyTorch loop   {base_tps:10,.0f} tokens/s")
    for name, r in runs.items():
        print(f"  {name:<20} {r['steady_tokens_per_s']:10,.0f} tokens/s  ratio {r['ratio']:.2f}x  "
              f"(fixed start-up {r['startup_s']:.1f} s of {r['wall_s']:.1f} s)")
    print("  target: steady-state ratio >= 0.9 at equal cores")
    assert all(math.isfinite(r["final_loss"]) for r in runs.values())
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
