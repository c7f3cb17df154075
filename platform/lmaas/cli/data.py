"""`lmaas data`: ingest a corpus into a dataset version, list versions, show one."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from lmaas import cluster, db
from lmaas.config import load_config, load_settings
from lmaas.storage import Storage

app = typer.Typer(help="Ingest corpora into versioned, tokenized datasets.", no_args_is_help=True)


@app.command()
def ingest(
    sources: list[str] = typer.Argument(..., help="Paths, globs, file:// or s3:// URIs, uploaded files' ids (file-...); `stdlib[:N]` is the built-in corpus."),
    name: str = typer.Option(..., "--name", help="Dataset name."),
    fmt: str = typer.Option("auto", "--format", help="auto, text, lines, jsonl, parquet, csv, or chat (fine-tuning examples; needs --tokenizer)."),
    block_size: int = typer.Option(None, "--block-size", help="Tokens per packed sequence (>= 8)."),
    vocab_size: int = typer.Option(None, "--vocab-size", help="Vocabulary of a newly trained tokenizer."),
    text_field: str = typer.Option(None, "--text-field", help="Field holding the text (JSONL, Parquet, CSV)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Reuse this HF tokenizer directory instead of training one."),
    config: str = typer.Option(None, "--config", help="IngestConfig YAML; the options above override it."),
    overrides: list[str] = typer.Option([], "--set", help="key=value override of any IngestConfig field."),
    as_json: bool = typer.Option(False, "--json", help="Print the version as JSON."),
) -> None:
    """Read, tokenize and pack SOURCES into a new version of dataset NAME (or report it unchanged)."""
    from lmaas.data.config import IngestConfig
    from lmaas.data.ingest import ingest as run_ingest
    from lmaas.data.ingest import quiet_ray_data_logs

    items = [f"name={name}", f"format={fmt}", f"sources={json.dumps(list(sources))}", *overrides]
    for key, value in (("block_size", block_size), ("vocab_size", vocab_size), ("text_field", text_field),
                       ("tokenizer", tokenizer)):
        if value is not None:
            items.append(f"{key}={value}")
    cfg = load_config(IngestConfig, config, items)
    settings = load_settings()
    storage = Storage.from_settings(settings)
    engine = db.connect(settings.database_url)
    from lmaas.registry.files import FileStore, resolve_sources

    cfg = cfg.model_copy(update={"sources": resolve_sources(cfg.sources, FileStore(storage, engine), tenant=None)})  # `file-...` ids
    quiet_ray_data_logs()  # failures are reported once, as one line
    console = Console(stderr=True, highlight=False)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("starting Ray", total=None)
        cluster.connect(settings, num_cpus=None)
        bar.update(task, description="reading, training the tokenizer")

        def progress(stage: str, count: int) -> None:
            text = f"tokenized {count:,} documents" if stage == "documents" else "publishing the shards"
            bar.update(task, description=text)

        result = run_ingest(cfg, storage=storage, engine=engine, endpoint_url=settings.s3_endpoint_url, progress=progress)
    v = result.version
    if as_json:
        print(json.dumps({**v.to_dict(), "unchanged": result.unchanged}, indent=1))
        return
    state = "unchanged, same content as" if result.unchanged else "created"
    print(f"{state} {v.ref}: {v.documents:,} documents, {v.train_rows:,} train + {v.validation_rows:,} validation rows "
          f"of {v.block_size} tokens, content {v.content_hash[:12]} ({result.seconds:.1f} s)")
    print(f"  {v.uri}")


@app.command(name="list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List every dataset version."""
    from lmaas.data.versions import list_versions

    versions = list_versions(db.connect(load_settings().database_url))
    if as_json:
        print(json.dumps([v.to_dict() for v in versions], indent=1))
        return
    table = Table(title_justify="left")
    for column in ("dataset", "documents", "train rows", "val rows", "tokens", "block", "vocab", "content"):
        table.add_column(column)
    for v in versions:
        table.add_row(v.ref, f"{v.documents:,}", f"{v.train_rows:,}", f"{v.validation_rows:,}", f"{v.tokens:,}",
                      str(v.block_size), str(v.vocab_size), v.content_hash[:12])
    Console(highlight=False).print(table if versions else "no datasets yet; run `lmaas data ingest`")


@app.command()
def show(ref: str = typer.Argument(..., help="NAME (newest version) or NAME:VERSION.")) -> None:
    """Show one dataset version as JSON."""
    from lmaas.data.versions import get_version

    print(json.dumps(get_version(db.connect(load_settings().database_url), ref).to_dict(), indent=1))


@app.command()
def gc(
    older_than: float = typer.Option(3600, "--older-than", help="Grace period in seconds for ingests in progress."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be deleted."),
) -> None:
    """Delete dataset files no version references (ingests that failed or died while publishing)."""
    from lmaas.data import versions

    settings = load_settings()
    removed = versions.gc(Storage.from_settings(settings), db.connect(settings.database_url), grace_seconds=older_than,
                          dry_run=dry_run)
    for path in removed:
        print(("would delete " if dry_run else "deleted ") + path)
    print(f"{len(removed)} leftover(s) {'found' if dry_run else 'removed'}")
