"""`lmaas train`: run a training job with live progress; `lmaas runs`: list and show runs."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lmaas import cluster, db
from lmaas.config import load_config, load_settings
from lmaas.storage import Storage


def train(
    config: str = typer.Argument(None, help="TrainConfig YAML (jobs/configs/train_*.yaml); defaults otherwise."),
    overrides: list[str] = typer.Option([], "--set", help="key=value override of any TrainConfig field."),
    resume: str = typer.Option(None, "--resume", help="Continue run RUN_ID from its latest checkpoint."),
    sweep: str = typer.Option(None, "--sweep", help="SweepConfig YAML: search with Ray Tune, register the best trial."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a model on the Ray cluster (RAY_ADDRESS, or a local one) and register it."""
    from lmaas.data.ingest import quiet_ray_data_logs
    from lmaas.train.config import TrainConfig
    from lmaas.train.run import read_run
    from lmaas.train.run import train as run_train

    settings = load_settings()
    storage = Storage.from_settings(settings)
    if resume and config is None:
        base = read_run(storage, resume)["config"]  # the run's own settings, then the overrides
        cfg = load_config(TrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in base.items()] + list(overrides))
    else:
        cfg = load_config(TrainConfig, config, overrides)
    engine = db.connect(settings.database_url)
    if sweep:
        _sweep(cfg, sweep, settings)
        return
    console = Console(stderr=True, highlight=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[stats]}"), console=console, transient=True) as bar:
        task = bar.add_task("starting Ray", total=cfg.max_steps, stats="")
        cluster.connect(settings)
        quiet_ray_data_logs()
        bar.update(task, description=f"training {cfg.model} ({cfg.strategy} x{cfg.num_workers})")

        def progress(m: dict) -> None:
            val = f"  val {m['val_loss']:.3f}" if "val_loss" in m else ""
            bar.update(task, completed=m["step"], stats=f"loss {m['loss']:.3f}{val}  {m['tokens_per_s']:,.0f} tok/s")
            console.print(f"step {m['step']:>6}  loss {m['loss']:.4f}{val}  lr {m['lr']:.2e}  {m['tokens_per_s']:,.0f} tokens/s")

        result = run_train(cfg, storage=storage, engine=engine, resume=resume, progress=progress)
    mv = result.model_version
    model = f"{mv.name}:{mv.version}" if mv else None
    if as_json:
        print(json.dumps({"run_id": result.run_id, "run": result.run_uri, "checkpoint": result.checkpoint_uri,
                          "model": model, "metrics": result.metrics, "seconds": result.seconds}, indent=1))
        return
    m = result.metrics
    val = f", validation loss {m['val_loss']:.3f} (perplexity {m['val_ppl']:.1f})" if "val_loss" in m else ""
    print(f"run {result.run_id}: {m.get('step', 0)} steps, loss {m.get('loss', float('nan')):.3f}{val}, "
          f"{result.parameters:,} parameters, {result.seconds:.0f} s")
    print(f"  checkpoint {result.checkpoint_uri}")
    print(f"  loss curve {result.run_uri}/loss.png")
    if model:
        print(f"  registered {model}" + (f" (alias {cfg.alias})" if cfg.alias else ""))


def runs(
    run_id: str = typer.Argument(None, help="Show this run's record."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List training runs, or show one."""
    from lmaas.train.run import list_runs, read_run

    storage = Storage.from_settings(load_settings())
    if run_id:
        print(json.dumps(read_run(storage, run_id), indent=1))
        return
    records = list_runs(storage)
    if as_json:
        print(json.dumps(records, indent=1))
        return
    table = Table(title_justify="left")
    for column in ("run", "status", "dataset", "model", "steps", "loss", "val loss"):
        table.add_column(column)
    for r in records:
        m = r.get("metrics") or {}
        table.add_row(r["run_id"], r["status"], r["dataset"], r.get("model") or "-", str(m.get("step", "-")),
                      f"{m['loss']:.3f}" if "loss" in m else "-", f"{m['val_loss']:.3f}" if "val_loss" in m else "-")
    Console(highlight=False).print(table if records else "no training runs yet; run `lmaas train`")


def _sweep(cfg, path: str, settings) -> None:  # noqa: ANN001 - TrainConfig, Settings
    from lmaas.data.ingest import quiet_ray_data_logs
    from lmaas.train.sweep import SweepConfig
    from lmaas.train.sweep import sweep as run_sweep

    search = load_config(SweepConfig, path)
    console = Console(stderr=True, highlight=False)
    with console.status(f"sweep over {', '.join(search.parameters)} ({search.method}, metric {search.metric})"):
        cluster.connect(settings)
        quiet_ray_data_logs()
        result = run_sweep(cfg, search, storage_uri=settings.storage, endpoint_url=settings.s3_endpoint_url,
                           database_url=settings.database_url)
    table = Table(title_justify="left")
    for column in ("run", *search.parameters, search.metric):
        table.add_column(column)
    for t in result.trials:
        table.add_row(t["run_id"], *(str(t["config"].get(k)) for k in search.parameters), f"{t.get(search.metric, float('nan')):.4f}")
    Console(highlight=False).print(table)
    mv = result.model_version
    print(f"best run {result.best['run_id']}: {search.metric} {result.best[search.metric]:.4f}"
          + (f", registered {mv.name}:{mv.version}" + (f" (alias {cfg.alias})" if cfg.alias else "") if mv else "")
          + f" ({result.seconds:.0f} s)")
