"""`lmaas finetune`: fine-tune a registered model on a chat JSONL file (LoRA or full), with live progress."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lmaas import cluster, db
from lmaas.config import load_config, load_settings
from lmaas.storage import Storage


def finetune(
    config: str = typer.Argument(None, help="FineTuneConfig YAML (jobs/configs/finetune_*.yaml); the options below override it."),
    model: str = typer.Option(None, "--model", help="The base: a registered causal LM (name, name:N, name@alias)."),
    training_file: str = typer.Option(None, "--file", help="Chat JSONL to train on: a path, URI or uploaded file's id (file-...)."),
    validation_file: str = typer.Option(None, "--validation-file", help="Chat JSONL held out: the base's and the result's loss on it."),
    suffix: str = typer.Option(None, "--suffix", help="The result is named <base name>-<suffix>."),
    overrides: list[str] = typer.Option([], "--set", help="key=value override of any FineTuneConfig field (train.num_workers=1, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Fine-tune MODEL on a chat JSONL file (the loss on the assistant turns) and register the result (an adapter by default)."""
    from lmaas.data.ingest import quiet_ray_data_logs
    from lmaas.train.finetune import FineTuneConfig, check_fine_tune, fine_tune

    shortcuts = {"model": model, "training_file": training_file, "validation_file": validation_file, "suffix": suffix}
    items = [*(f"{k}={json.dumps(v)}" for k, v in shortcuts.items() if v is not None), *overrides]
    cfg = load_config(FineTuneConfig, config, items)
    settings = load_settings()
    storage = Storage.from_settings(settings)
    engine = db.connect(settings.database_url)
    base = check_fine_tune(cfg, storage=storage, engine=engine)  # a wrong name or file fails here, before Ray starts
    console = Console(stderr=True, highlight=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[stats]}"), console=console, transient=True) as bar:
        task = bar.add_task("starting Ray", total=None, stats="")
        cluster.connect(settings)
        quiet_ray_data_logs()
        bar.update(task, description=f"ingesting {cfg.training_file} with {base.ref}'s tokenizer")

        def progress(event: dict) -> None:
            data = event["data"]
            if event["type"] == "metrics":
                bar.update(task, completed=data["step"], stats=f"loss {data['train_loss']:.3f}  {data['tokens_per_s']:,.0f} tok/s")
            elif "total_steps" in data:
                bar.update(task, total=data["total_steps"], description=f"fine-tuning {base.ref} ({cfg.method})")
            console.print(event["message"])

        result = fine_tune(cfg, storage=storage, engine=engine, progress=progress, endpoint_url=settings.s3_endpoint_url)
    if as_json:
        print(json.dumps(result.to_dict(), indent=1))
        return
    mv, m = result.model_version, result.metrics
    first = result.history[0]["loss"] if result.history else float("nan")
    valid = (f", validation loss {m['base_valid_loss']:.3f} -> {m['full_valid_loss']:.3f} (base -> fine-tuned)"
             if "full_valid_loss" in m else "")
    kind = f"LoRA adapter of {result.base}" if mv.task == "adapter" else f"fine-tune of {result.base}"
    print(f"registered {mv.ref} ({kind}): {m.get('step', 0)} steps, training loss {first:.3f} -> {m.get('loss', float('nan')):.3f}"
          f"{valid}, {result.seconds:.0f} s")
    print(f"  run {result.run_id}, dataset {result.dataset}")
