"""Merge quality: two fine-tunes of one base, merged, measured on each task against each parent.

    PYTHONPATH=platform python bench/merge.py [--size tiny] [--base-steps 400] [--steps 80] [--threads 1]
    PYTHONPATH=platform python bench/merge.py --task-a email --task-b json     # other stdlib packages as the two tasks

Everything runs in this process with plain PyTorch (no Ray). A tokenizer is trained on the three
corpora with lmaas's own `train_bpe`; a base model is trained on a general mix of standard-library
modules, then fine-tuned twice from the same weights, once on the sources of each task's stdlib package
(`email/` and `asyncio/` by default). Each corpus is a dataset version (train / validation rows)
in a temporary registry, and every model is registered with its dataset, so `lmaas.compress.merge.merge`
measures each merge and every parent on every task's held-out rows in its own report: what this
benchmark prints is that report. The baseline beside the merges is one multi-task fine-tune of the
same base on both tasks together, for as many steps as the two fine-tunes took between them.

Printed and written to bench/results/merge/merge.json (and merge.png): held-out loss per task of the
base, each fine-tune, the multi-task model and every merge (linear, TIES, task arithmetic, DARE-TIES,
SLERP), and for each merge the share of each fine-tune's improvement over the base it keeps
(`kept` = (base - merge) / (base - specialist), on that specialist's task; 1.0 keeps all of it).
"""

from __future__ import annotations

import argparse
import importlib
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
from lmaas.compress.merge import MergeConfig, merge
from lmaas.data.tokenizer import train_bpe
from lmaas.data.versions import publish_version
from lmaas.models import build_model, load_model, model_config, parameter_count, save_model
from lmaas.registry import ModelRegistry
from lmaas.storage import Storage

RESULTS = Path(__file__).resolve().parent / "results" / "merge"
GENERAL = ("textwrap", "string", "argparse", "inspect", "pathlib", "typing", "dataclasses", "tempfile", "shutil", "difflib",
           "pprint", "calendar", "configparser", "csv", "gettext", "heapq", "collections", "functools", "ast", "tokenize")
"""The base model's pretraining corpus: single stdlib modules, none of them in either task's package."""
MERGES = [
    ("linear", {"weights": [0.5, 0.5]}),
    ("ties", {"density": 0.5}),
    ("task_arithmetic", {"weights": [1.0, 1.0]}),
    ("dare_ties", {"density": 0.5}),
    ("slerp", {"t": 0.5}),
]


def package_source(package: str) -> str:
    """Every `.py` file of a standard-library package (tests left out), in path order."""
    root = Path(importlib.import_module(package).__file__).parent
    return "\n".join(p.read_text() for p in sorted(root.rglob("*.py")) if "test" not in p.relative_to(root).as_posix())


def general_source() -> str:
    return "\n".join(inspect.getsource(importlib.import_module(m)) for m in GENERAL)


def split_rows(ids: list[int], seq: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """`seq`-token rows, shuffled, 95% train / 5% validation."""
    rows = [ids[i : i + seq] for i in range(0, len(ids) - seq, seq)]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(len(rows) * 0.95)
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def publish(registry: ModelRegistry, root: Path, name: str, source: str, train_rows, val_rows, tok_dir: Path, vocab: int) -> str:
    """A dataset version `name:1` of the rows (what `lmaas data ingest` would have written)."""
    for split, rows in (("train", train_rows), ("validation", val_rows)):
        (root / split).mkdir(parents=True)
        pq.write_table(pa.table({"input_ids": rows}), root / split / "shard-00000.parquet")
    shutil.copytree(tok_dir, root / "tokenizer")
    record = {"name": name, "sources": [source], "content_hash": "0" * 64, "tokenizer_hash": "0" * 64,
              "block_size": len(train_rows[0]), "vocab_size": vocab, "documents": 1, "train_rows": len(train_rows),
              "validation_rows": len(val_rows), "tokens": (len(train_rows) + len(val_rows)) * len(train_rows[0])}
    return publish_version(registry.storage, registry.engine, root, record).ref


def train(model, rows: list[list[int]], *, steps: int, lr: float, batch: int, seed: int, label: str):
    """AdamW on random batches of `rows`: 10-step warmup, cosine to 10% of `lr`. Returns the model (eval mode)."""
    model.train()
    data = torch.tensor(rows)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    started = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        ids = data[torch.randint(len(data), (batch,), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % max(1, steps // 4) == 0:
            print(f"  {label}: step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--base-steps", type=int, default=400, help="pretraining steps of the base on the general corpus")
    parser.add_argument("--base-lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=80, help="fine-tuning steps of each task model (the multi-task one gets twice)")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--task-a", default="email", help="stdlib package whose sources are task A")
    parser.add_argument("--task-b", default="asyncio", help="stdlib package whose sources are task B")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="lmaas-bench-merge-"))
    try:
        result = run(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["wall_s"] = round(time.time() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS / 'merge.json'}")
    plot(result, RESULTS / "merge.png")


def run(root: Path, args: argparse.Namespace) -> dict:
    tasks = {"general": general_source(), args.task_a: package_source(args.task_a), args.task_b: package_source(args.task_b)}
    spec = train_bpe([line for text in tasks.values() for line in text.splitlines()], args.vocab)
    tok_dir = spec.save(root / "tokenizer")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    registry = ModelRegistry(Storage(f"file://{root / 'store'}"), db.connect(f"sqlite:///{root / 'lmaas.db'}"))
    rows, datasets = {}, {}
    for i, (task, text) in enumerate(tasks.items()):
        rows[task] = split_rows(tokenizer.encode(text).ids, args.seq, seed=i)
        datasets[task] = publish(registry, root / f"data-{task}", f"bench-{task}", task, *rows[task], tok_dir, spec.vocab_size)
        print(f"{task}: {len(rows[task][0])} train / {len(rows[task][1])} validation rows of {args.seq} tokens", flush=True)

    config = model_config(args.size, vocab_size=spec.vocab_size, max_seq_len=args.seq, eos_id=spec.eos_id)
    base = build_model(config, seed=0)
    print(f"base: {args.size}, {parameter_count(base) / 1e6:.2f}M parameters, pretrained on the general corpus", flush=True)
    base = train(base, rows["general"][0], steps=args.base_steps, lr=args.base_lr, batch=args.batch, seed=0, label="base")
    base_dir = save_model(base, root / "base", tokenizer_dir=tok_dir)
    names = {"general": "bench-base", args.task_a: f"bench-{args.task_a}", args.task_b: f"bench-{args.task_b}"}
    registry.register_version(names["general"], base_dir, task="causal-lm", dataset=datasets["general"])
    fine_tunes = {}
    for seed, task in enumerate((args.task_a, args.task_b), start=1):
        tuned = train(load_model(base_dir), rows[task][0], steps=args.steps, lr=args.lr, batch=args.batch, seed=seed, label=f"fine-tune on {task}")
        save_model(tuned, root / task, tokenizer_dir=tok_dir)
        fine_tunes[task] = registry.register_version(names[task], root / task, task="causal-lm", parent="bench-base:1",
                                                     dataset=datasets[task]).ref
    both = [r for task in (args.task_a, args.task_b) for r in rows[task][0]]
    multitask = train(load_model(base_dir), both, steps=2 * args.steps, lr=args.lr, batch=args.batch, seed=9, label="multi-task fine-tune")

    eval_tokens = max(len(rows[t][1]) for t in tasks) * args.seq
    refs = [fine_tunes[args.task_a], fine_tunes[args.task_b]]
    measure = {task: names[task] for task in tasks}  # each task's rows: those of the version trained on it
    loss = {"base": held_out_losses(base, registry, measure, base_dir, eval_tokens, args.seq)}
    for task in (args.task_a, args.task_b):
        loss[f"ft-{task}"] = held_out_losses(load_model(root / task), registry, measure, base_dir, eval_tokens, args.seq)
    loss["multitask"] = held_out_losses(multitask, registry, measure, base_dir, eval_tokens, args.seq)
    reports, report_gap = {}, 0.0
    for method, params in MERGES:
        base_ref = {"base": "bench-base:1"} if method in ("ties", "task_arithmetic", "dare_ties") else {}
        cfg = MergeConfig(method=method, models=refs, output_model=f"bench-{method.replace('_', '-')}", eval_tokens=eval_tokens,
                          eval_seq_len=args.seq, threads=args.threads, **base_ref, **params)
        began = time.time()
        result = merge(cfg, registry)
        reports[method] = result.report
        print(f"  {method} {json.dumps(cfg.parameters())}: merged and measured in {time.time() - began:.1f} s", flush=True)
        registry.download(result.version.ref, root / method)
        loss[method] = held_out_losses(load_model(root / method), registry, measure, base_dir, eval_tokens, args.seq)
        # the merge's own report measured the same rows: its numbers must be these
        for row in result.report["eval"]:
            task = next(t for t in tasks if datasets[t] == row["data"])
            report_gap = max(report_gap, abs(row["merged"]["loss"] - loss[method][task]))
    return summarize(loss, reports, report_gap, args)


def held_out_losses(model, registry: ModelRegistry, versions: dict[str, str], tokenizer_dir: Path, tokens: int, seq: int) -> dict[str, float]:
    """The loss of `model` on each task's held-out rows: the rows a merge report measures (`evaluate.held_out_data` of the
    version trained on that task's dataset)."""
    from lmaas.compress import evaluate as ev

    losses = {}
    for task, ref in versions.items():
        data = ev.held_out_data(registry.resolve(ref), registry, tokenizer_dir, tokens=tokens, seq_len=seq, batch_size=1, max_seq_len=seq)
        losses[task] = math.log(ev.perplexity(ev.logits_of(model, data.ids), data.ids))
    return losses


def summarize(loss: dict[str, dict[str, float]], reports: dict, report_gap: float, args: argparse.Namespace) -> dict:
    """The loss table (model x task), the `kept` ratios, and the printout."""
    task_a, task_b = args.task_a, args.task_b
    base = loss["base"]
    kept = {name: {task: (base[task] - row[task]) / (base[task] - loss[f"ft-{task}"][task]) for task in (task_a, task_b)}
            for name, row in loss.items() if name != "base" and not name.startswith("ft-")}
    tasks = [task_a, task_b, "general"]
    print(f"\nheld-out loss ({args.size}; fine-tunes of {args.steps} steps from a {args.base_steps}-step base; "
          f"kept = share of the specialist's gain over the base on its task)")
    print(f"{'model':<18}" + "".join(f"{t:>10}" for t in tasks) + f"{'mean A,B':>10}" + f"{'kept ' + task_a:>14}{'kept ' + task_b:>14}")
    for name, row in loss.items():
        ratios = "".join(f"{kept[name][t]:>14.2f}" for t in (task_a, task_b)) if name in kept else ""
        print(f"{name:<18}" + "".join(f"{row[t]:>10.4f}" for t in tasks) + f"{(row[task_a] + row[task_b]) / 2:>10.4f}" + ratios)
    print(f"largest gap between a merge report's loss and this measurement: {report_gap:.1e}")
    return {
        "machine": f"{platform.machine()}, {platform.python_version()}, torch {torch.__version__}, threads {args.threads}",
        "args": vars(args),
        "tasks": {"a": task_a, "b": task_b, "general": list(GENERAL)},
        "loss": loss,
        "kept": kept,
        "report_gap": report_gap,
        "merge_parameters": {method: reports[method]["parameters"] for method, _ in MERGES},
        "merge_seconds": {method: reports[method]["seconds"] for method, _ in MERGES},
    }


def plot(result: dict, path: Path) -> None:
    """Grouped bars: held-out loss of each model on each task."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [result["tasks"]["a"], result["tasks"]["b"], "general"]
    names = list(result["loss"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([t + i * width for t in range(len(tasks))], [result["loss"][name][task] for task in tasks], width, label=name)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    low = min(v for row in result["loss"].values() for v in row.values())
    ax.set_ylim(low * 0.9, None)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("merges of two fine-tunes vs their parents, per task")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
