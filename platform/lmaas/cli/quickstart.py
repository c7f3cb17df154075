"""`lmaas quickstart`: the main job, what `make demo` runs.

It grows with the platform. Today it brings up the embedded defaults (local Ray cluster,
artifact store, database), proves that Ray workers reach both, ingests the built-in corpus into
a versioned dataset (reported unchanged on a second run), trains a tiny model on it with two Ray
Train workers and registers it as `tiny-lm@production` (reused on a second run), and prints
what it did.
"""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table

import lmaas
from lmaas import cluster, db
from lmaas.config import load_settings, redact_url
from lmaas.errors import UnreachableError
from lmaas.ops import health


def quickstart(
    tasks: int = typer.Option(4, min=1, max=64, help="Ray tasks in the end-to-end self-check."),
    corpus_files: int = typer.Option(60, min=1, help="Standard-library files in the demo dataset."),
    train_steps: int = typer.Option(60, min=1, help="Optimizer steps of the demo model's training run."),
    keep_running: bool = typer.Option(False, "--keep-running", help="Leave the local Ray cluster up until Ctrl-C."),
) -> None:
    """Bring up lmaas on this machine and show every part working."""
    console = Console(highlight=False)
    settings = load_settings()
    started = time.perf_counter()
    console.print(f"[bold]lmaas {lmaas.__version__} quickstart[/]  home {settings.home}")

    with console.status("checking the artifact store and the database"):
        for check in (health.check_storage(settings), health.check_database(settings)):
            if not check.ok:
                raise UnreachableError(check.detail)
            console.print(f"  [green]ok[/] {check.name:<9} {check.target}  ({check.detail})")

    with console.status("starting Ray" if not settings.ray_address else f"joining Ray at {settings.ray_address}"):
        info = cluster.connect(settings, dashboard=True)
    what = "started a local cluster" if info.started_here else "joined"
    console.print(
        f"  [green]ok[/] ray       {what} at {info.address}: {info.nodes} node(s), {info.cpus:g} CPU, {info.gpus:g} GPU"
    )

    try:
        with console.status(f"self-check: {tasks} Ray tasks write to the store and the database"):
            report = health.self_check(settings, tasks=tasks)
        console.print(
            f"  [green]ok[/] workers   {len(report.workers)} tasks on {len(report.hosts)} host(s) wrote, "
            f"read back and verified {len(report.workers)} objects and {report.events_recorded} events"
        )

        with console.status(f"ingesting the built-in corpus ({corpus_files} stdlib files) with Ray Data"):
            dataset = _ingest_demo_corpus(settings, corpus_files)
        v = dataset.version
        state = "unchanged (same content)" if dataset.unchanged else "created"
        console.print(
            f"  [green]ok[/] data      {v.ref} {state}: {v.documents:,} documents, {v.tokens:,} tokens, "
            f"{v.train_rows:,} train + {v.validation_rows:,} validation rows of {v.block_size}"
        )

        model, reused = _train_demo_model(settings, v, train_steps, console)
        m = model.metrics
        trained = "reused (already trained on this dataset)" if reused else "trained and registered"
        console.print(
            f"  [green]ok[/] train     {model.name}:{model.version} (alias production) {trained}: "
            f"{int(m.get('parameters', 0)):,} parameters, {int(m.get('step', 0))} steps, "
            f"validation loss {m.get('val_loss', float('nan')):.3f}, {m.get('tokens_per_s', 0):,.0f} tokens/s"
        )

        table = Table(title="What quickstart did", title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        table.add_row("Ray cluster", f"{info.address} ({what})")
        table.add_row("Ray dashboard", info.dashboard_url or "not running")
        table.add_row("artifact store", settings.storage)
        table.add_row("published", f"{settings.storage}/{report.prefix} (sha256 {report.manifest_sha256[:16]}...)")
        table.add_row("worker objects", ", ".join(w.object_path.rsplit("/", 1)[-1] for w in report.workers))
        table.add_row("dataset", f"{v.ref} ({state}, content {v.content_hash[:16]}...) at {v.uri}")
        table.add_row("model", f"{model.name}:{model.version} @production, run {model.run}, from {model.dataset}")
        table.add_row("database", f"{redact_url(settings.database_url)} (self-check events, datasets, model versions)")
        table.add_row("took", f"{time.perf_counter() - started:.1f} s")
        console.print(table)
        console.print(
            f"Next: [bold]lmaas models show {model.name}@production[/], [bold]lmaas runs {model.run}[/], "
            f"[bold]lmaas status[/]; README.md has the tour."
        )
        if keep_running:
            console.print(f"Ray stays up (dashboard {info.dashboard_url}); press Ctrl-C to stop.")
            while True:
                time.sleep(3600)
    finally:
        cluster.disconnect()


def _ingest_demo_corpus(settings, files: int):  # noqa: ANN001, ANN202 - Settings -> IngestResult
    from lmaas.data.config import IngestConfig
    from lmaas.data.ingest import ingest, quiet_ray_data_logs
    from lmaas.storage import Storage

    quiet_ray_data_logs()
    config = IngestConfig(name="stdlib-demo", sources=[f"stdlib:{files}"], vocab_size=1024, block_size=128)
    return ingest(
        config,
        storage=Storage.from_settings(settings),
        engine=db.connect(settings.database_url),
        endpoint_url=settings.s3_endpoint_url,
    )


def _train_demo_model(settings, dataset, steps: int, console):  # noqa: ANN001, ANN202 - -> (ModelVersion, reused)
    """Train `tiny-lm` on the demo dataset, or reuse the production version already trained on it."""
    from lmaas.errors import NotFoundError
    from lmaas.registry import ModelRegistry
    from lmaas.storage import Storage
    from lmaas.train.config import TrainConfig
    from lmaas.train.run import train

    storage, engine = Storage.from_settings(settings), db.connect(settings.database_url)
    registry = ModelRegistry(storage, engine)
    try:
        current = registry.resolve("tiny-lm@production")
        if current.dataset == dataset.ref:
            return current, True
    except NotFoundError:
        pass
    config = TrainConfig(dataset=dataset.ref, model="tiny", output_model="tiny-lm", alias="production",
                         num_workers=2, cpus_per_worker=0.5, max_steps=steps, warmup_steps=min(10, steps // 4),
                         log_interval=max(1, min(10, steps // 2)), eval_interval=max(1, steps // 3),
                         checkpoint_interval=max(1, steps // 2))
    with console.status(f"training a tiny model: 2 Ray Train workers (DDP), {steps} steps") as status:

        def progress(m: dict) -> None:
            status.update(f"training a tiny model: step {m['step']}/{steps}, loss {m['loss']:.3f}, "
                          f"{m['tokens_per_s']:,.0f} tokens/s")

        result = train(config, storage=storage, engine=engine, progress=progress)
    return result.model_version, False
