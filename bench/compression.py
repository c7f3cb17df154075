"""Compression variants vs their fp32 parent: size ratio, perplexity change, CPU decode speed ratio.

    PYTHONPATH=platform python bench/compression.py [--size small] [--steps 200] [--threads 1]

Trains a parent here (plain torch loop on stdlib source, the `small` size by default), registers
it with a dataset version in a temporary registry, then runs every method through
`lmaas.compress.compress`, which measures each variant against the parent on the same held-out
validation rows and prompts (decode timings interleaved parent/variant). Prints one table and
writes bench/results/compression.json. Targets (issue 7): int8-dynamic <= 0.30x size, perplexity
within +2%, decode >= 1.3x faster; 50% pruning + recovery within +5% perplexity.

Read the recovery rows with care: the parent is trained only briefly here, so the recovery
fine-tune is also extra training, and a pruned + recovered variant can beat its parent.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmaas import db
from lmaas.compress import CompressConfig, compress
from lmaas.data.tokenizer import train_bpe
from lmaas.data.versions import publish_version
from lmaas.models import build_model, model_config, parameter_count, save_model
from lmaas.registry import ModelRegistry
from lmaas.storage import Storage

RESULTS = Path(__file__).resolve().parent / "results" / "compression.json"
MODULES = ("textwrap", "json.encoder", "string", "argparse", "logging", "inspect", "pathlib", "typing", "dataclasses",
           "tempfile", "shutil", "difflib", "pprint", "calendar", "configparser", "csv", "gettext", "heapq")
VARIANTS = [
    ("int8-dynamic", {}),
    ("int8-weight", {}),
    ("int4-weight", {"group_size": 32}),
    ("prune", {"sparsity": 0.5, "recovery_steps": 0}),  # the damage before recovery
    ("prune", {"sparsity": 0.5, "recovery_steps": None}),
    ("prune", {"pattern": "2:4", "recovery_steps": None}),
]


def corpus() -> str:
    import importlib

    return "\n".join(inspect.getsource(importlib.import_module(m)) for m in MODULES)


def train_parent(root: Path, args: argparse.Namespace) -> tuple[Path, list[list[int]], list[list[int]]]:
    text = corpus()
    spec = train_bpe(text.splitlines(), args.vocab)
    tok_dir = spec.save(root / "tokenizer")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).encode(text).ids
    rows = [ids[i : i + args.seq] for i in range(0, len(ids) - args.seq, args.seq)]
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(rows), generator=gen).tolist()
    cut = int(len(rows) * 0.95)
    train_rows, val_rows = [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
    config = model_config(args.size, vocab_size=spec.vocab_size, max_seq_len=args.seq, eos_id=spec.eos_id)
    model = build_model(config).train()
    print(f"parent: {args.size}, {parameter_count(model) / 1e6:.2f}M parameters, {len(ids):,} tokens "
          f"({len(train_rows)} train / {len(val_rows)} validation rows of {args.seq})", flush=True)
    data = torch.tensor(train_rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    start = time.time()
    for step in range(args.steps):
        lr = args.lr * (min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data[torch.randint(len(data), (args.batch,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    return save_model(model.eval(), root / "parent", tokenizer_dir=tok_dir), train_rows, val_rows


def publish(registry: ModelRegistry, root: Path, train_rows, val_rows, tok_dir: Path, args) -> str:
    for split, rows in (("train", train_rows), ("validation", val_rows)):
        (root / split).mkdir(parents=True)
        pq.write_table(pa.table({"input_ids": rows}), root / split / "shard-00000.parquet")
    shutil.copytree(tok_dir, root / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors", "*config.json"))
    record = {"name": "bench-stdlib", "sources": list(MODULES), "content_hash": "0" * 64, "tokenizer_hash": "0" * 64,
              "block_size": args.seq, "vocab_size": args.vocab, "documents": len(MODULES), "train_rows": len(train_rows),
              "validation_rows": len(val_rows), "tokens": (len(train_rows) + len(val_rows)) * args.seq}
    return publish_version(registry.storage, registry.engine, root, record).ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--recovery-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared 2-core machine)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="lmaas-bench-compress-"))
    try:
        parent_dir, train_rows, val_rows = train_parent(root, args)
        registry = ModelRegistry(Storage(f"file://{root / 'store'}"), db.connect(f"sqlite:///{root / 'lmaas.db'}"))
        dataset = publish(registry, root / "dataset", train_rows, val_rows, root / "tokenizer", args)
        parent = registry.register_version("bench-lm", parent_dir, task="causal-lm", dataset=dataset)
        rows = []
        for method, params in VARIANTS:
            params = {k: (args.recovery_steps if v is None else v) for k, v in params.items()}
            config = CompressConfig(ref=parent.ref, method=method, threads=args.threads, timing_repeats=args.repeats,
                                    eval_tokens=len(val_rows) * args.seq, decode_tokens=32, batch_size=8,
                                    output_name=f"bench-{method}-{len(rows)}", **params)
            started = time.time()
            result = compress(config, registry, progress=lambda line: print(f"  {line}", flush=True))
            r, v = result.report["ratios"], result.report["variant"]
            label = method + "".join(f" {k}={val}" for k, val in params.items())
            rows.append({"variant": label, "size_ratio": r["size_ratio"], "perplexity_increase": r["perplexity_increase"],
                         "decode_speedup": r["decode_speedup"], "throughput_ratio": r["throughput_ratio"],
                         "agreement": v["agreement"], "perplexity": v["perplexity"], "parent_perplexity": result.report["parent"]["perplexity"],
                         "parent_latency_ms_per_token": result.report["parent"]["latency_ms_per_token"],
                         "latency_ms_per_token": v["latency_ms_per_token"], "seconds": round(time.time() - started, 1)})
            print(f"{label}: {json.dumps({k: round(x, 4) if isinstance(x, float) else x for k, x in rows[-1].items()})}", flush=True)
        print(f"\n{'variant':<44}{'size':>8}{'ppl change':>12}{'decode speed':>14}{'batch tput':>12}{'agreement':>11}")
        for row in rows:
            print(f"{row['variant']:<44}{row['size_ratio']:>7.3f}x{row['perplexity_increase']:>+11.2%}"
                  f"{row['decode_speedup']:>13.2f}x{row['throughput_ratio']:>11.2f}x{row['agreement']:>10.1%}")
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps({"machine": f"{platform.machine()}, torch threads {args.threads}",
                                       "torch": torch.__version__, "args": vars(args), "parent_parameters": parameter_count(
                                           __import__("lmaas.models", fromlist=["load_model"]).load_model(parent_dir)),
                                       "variants": rows}, indent=1))
        print(f"wrote {RESULTS}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
