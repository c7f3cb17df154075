"""LoRA vs full fine-tuning: the same base, chat data, workers and steps through `lmaas.train.run.train`.

    python bench/lora.py [--model small --steps 40 --rank 8 --cpus 2]

A base of size `--model` is trained briefly on the built-in corpus (it only has to be a real
starting point), then fine-tuned twice on the same chat examples (OpenAI chat JSONL made from the
standard library's docstrings: "what does json.dumps do?" -> its first docstring line), tokenized
with the base's tokenizer, with 2 DDP workers:
  full   `method: full`, every weight trained (lr 1e-3)
  lora   `method: lora`, rank `--rank` on the query and value projections (lr 3e-2)
Reported per side: trainable parameters, steady-state tokens/s (the mean of the metric reports
after the first), peak memory per worker (process peak RSS on CPU, allocated GPU memory on GPU),
the held-out answer loss before and after, and the size of what gets registered (the whole model vs
the adapter). Targets: LoRA tokens/s >= 1.3x full's, adapter <= 5% of the base's bytes at rank 8.
Writes bench/results/lora.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

RESULTS = Path(__file__).parent / "results" / "lora.json"


def chat_lines() -> list[dict]:
    """One chat example per documented public function of a few standard-library modules."""
    import email.utils
    import json as json_module
    import os.path
    import shutil
    import textwrap

    lines = []
    for module in (json_module, os.path, shutil, textwrap, email.utils):
        for name, fn in sorted(vars(module).items()):
            doc = inspect.getdoc(fn) if inspect.isfunction(fn) and not name.startswith("_") else None
            if doc:
                lines.append({"messages": [{"role": "user", "content": f"What does {module.__name__}.{name} do?"},
                                           {"role": "assistant", "content": doc.splitlines()[0]}]})
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--base-steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    import ray

    from lmaas import db
    from lmaas.config import Settings
    from lmaas.data.config import IngestConfig
    from lmaas.data.ingest import ingest, quiet_ray_data_logs
    from lmaas.registry import ModelRegistry
    from lmaas.storage import Storage
    from lmaas.train.config import TrainConfig
    from lmaas.train.run import train

    home = Path(tempfile.mkdtemp(prefix="lmaas-bench-lora-"))
    settings = Settings(home=str(home))
    storage, engine = Storage.from_settings(settings), db.connect(settings.database_url)
    registry = ModelRegistry(storage, engine)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
    quiet_ray_data_logs()
    workers = {"num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1, "batch_size": 8, "shuffle_buffer": 0}

    started = time.perf_counter()
    corpus = ingest(IngestConfig(name="corpus", sources=["stdlib:120"], vocab_size=2048, block_size=args.block_size),
                    storage=storage, engine=engine).version
    train(TrainConfig(dataset=corpus.ref, model=args.model, output_model="base", max_steps=args.base_steps, warmup_steps=5,
                      log_interval=10, eval_interval=10_000, checkpoint_interval=10_000, lr=3e-3, **workers),
          storage=storage, engine=engine)
    base_dir = home / "base"
    base = registry.download("base:1", base_dir)
    path = home / "chat.jsonl"
    lines = chat_lines()
    path.write_text("\n".join(json.dumps(line) for line in lines))
    chat = ingest(IngestConfig(name="chat", sources=[str(path)], format="chat", tokenizer=str(base_dir), block_size=args.block_size,
                               validation_percent=15), storage=storage, engine=engine).version
    print(f"base {base.ref}: {base.metrics['parameters']:,.0f} parameters ({args.model}); chat: {chat.train_rows} train / "
          f"{chat.validation_rows} validation examples ({time.perf_counter() - started:.0f} s to set up)")

    sides = {
        "full": {"method": "full", "lr": 1e-3},
        "lora": {"method": "lora", "lr": 3e-2, "lora": {"rank": args.rank, "alpha": 2 * args.rank}},
    }
    results: dict[str, dict] = {}
    for side, settings_ in sides.items():
        reports: list[dict] = []
        result = train(TrainConfig(dataset=chat.ref, init_from="base:1", output_model=f"ft-{side}", max_steps=args.steps, warmup_steps=5,
                                   log_interval=5, eval_interval=args.steps, checkpoint_interval=args.steps, **workers, **settings_),
                       storage=storage, engine=engine, progress=reports.append)
        version = result.model_version
        weights = "adapter_model.safetensors" if side == "lora" else "model.safetensors"
        steady = [r["tokens_per_s"] for r in reports[1:]] or [reports[-1]["tokens_per_s"]]
        results[side] = {
            "trainable_parameters": int(version.metrics["trainable_parameters"]),
            "tokens_per_s": statistics.mean(steady),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in reports),
            "val_loss": result.metrics.get("val_loss"),
            "registered_bytes": next(f.size for f in version.files if f.path == weights),
            "seconds": result.seconds,
        }
        print(f"{side:>5}: {results[side]['trainable_parameters']:>10,} trainable  {results[side]['tokens_per_s']:>8,.0f} tok/s  "
              f"peak {results[side]['peak_memory_mb']:,.0f} MB/worker  val loss {results[side]['val_loss']:.3f}  "
              f"registered {results[side]['registered_bytes'] / 1e6:.2f} MB  ({result.seconds:.0f} s)")
    ray.shutdown()

    full, lora = results["full"], results["lora"]
    ratios = {
        "tokens_per_s": lora["tokens_per_s"] / full["tokens_per_s"],
        "trainable_parameters": lora["trainable_parameters"] / full["trainable_parameters"],
        "peak_memory": lora["peak_memory_mb"] / full["peak_memory_mb"],
        "adapter_vs_base_bytes": lora["registered_bytes"] / full["registered_bytes"],
    }
    print(f"lora / full: tokens/s {ratios['tokens_per_s']:.2f}x (target >= 1.3), trainable {ratios['trainable_parameters']:.4f}, "
          f"peak memory {ratios['peak_memory']:.2f}x, adapter {ratios['adapter_vs_base_bytes']:.2%} of the base (target <= 5%)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "base_parameters": base.metrics["parameters"], "chat_examples": len(lines),
                                   "results": results, "ratios": ratios}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
