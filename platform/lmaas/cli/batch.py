"""`lmaas batch`: answer a JSONL of OpenAI batch requests offline, on Ray Data, into a JSONL of results.

    lmaas batch requests.jsonl --model tiny-lm --output answers.jsonl
    lmaas batch s3://bucket/requests.jsonl --model tiny-lm@production --output s3://bucket/answers.jsonl --concurrency 8
    lmaas batch file-0123456789abcdef01234567 --model minilm --output vectors.jsonl --set engine.max_batch_size=64
"""

from __future__ import annotations

import json
import signal
import threading

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from lmaas import cluster
from lmaas.config import load_config, load_settings


def batch(
    input_: str = typer.Argument(..., metavar="INPUT", help="JSONL of batch lines (custom_id, method, url, body): a path, glob, "
                                 "file:// or s3:// URI, or an uploaded file's id (file-...)."),
    model: str = typer.Option(..., "--model", help="The model every line runs on: name, name:VERSION or name@ALIAS."),
    output: str = typer.Option(..., "--output", help="Where the results go: a path or s3:// URI (one JSON line per input line)."),
    concurrency: int = typer.Option(None, "--concurrency", help="Model actors (default: as many as the cluster's CPUs, or GPUs, hold)."),
    num_cpus: float = typer.Option(None, "--num-cpus", help="CPUs per actor (its engine's threads)."),
    num_gpus: float = typer.Option(None, "--num-gpus", help="GPUs per actor."),
    engine: str = typer.Option(None, "--engine", help="auto, vllm or lmaas."),
    tenant: str = typer.Option(None, "--tenant", help="Run as this tenant: its models, its files, its area of the store."),
    error_output: str = typer.Option(None, "--error-output", help="Where the lines answered with an error go (default: to OUTPUT)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    config: str = typer.Option(None, "--config", help="BatchConfig YAML; the options above override it."),
    overrides: list[str] = typer.Option([], "--set", help="key=value override of any BatchConfig field (engine.max_batch_size=64)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Answer every request line of INPUT with MODEL; write one result line per input line to OUTPUT.

    A line the API would refuse, or that is no request, gets an error line and the others go on. Ctrl-C stops
    the batch and keeps the lines answered so far (each whole, once) in the output.
    """
    from transformers.utils import logging as hf_logging

    from lmaas.batch import BatchConfig, BatchProgress, check_batch, run_batch
    from lmaas.batch.job import on_signals
    from lmaas.data.ingest import quiet_ray_data_logs
    from lmaas.registry import ModelRegistry

    hf_logging.disable_progress_bar()
    items = [f"input={json.dumps(input_)}", f"model={json.dumps(model)}", f"output={json.dumps(output)}", *overrides]
    if error_output is not None:
        items.append(f"error_output={json.dumps(error_output)}")
    for key, value in (("concurrency", concurrency), ("num_cpus", num_cpus), ("num_gpus", num_gpus), ("engine.engine", engine)):
        if value is not None:
            items.append(f"{key}={value}")
    if overwrite:
        items.append("overwrite=true")
    cfg = load_config(BatchConfig, config, items)
    settings = load_settings()
    registry = ModelRegistry.from_settings(settings)
    check_batch(cfg, registry=registry, tenant=tenant, endpoint_url=settings.s3_endpoint_url)  # a bad model or path fails before Ray starts
    console = Console(stderr=True, highlight=False)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("starting Ray", total=None, counts="")
        cluster.connect(settings)
        quiet_ray_data_logs()

        def progress(p: BatchProgress) -> None:
            if p.stage == "reading":
                bar.update(task, description="reading the input", counts=f"{p.bytes_read / 1e6:,.0f} MB")
            elif p.stage == "starting":
                bar.update(task, description="loading the model", total=p.total, completed=0, counts=f"0/{p.total:,} lines")
            else:
                bar.update(task, description="answering", total=p.total, completed=p.done,
                           counts=f"{p.completed:,} completed, {p.failed:,} failed / {p.total:,} lines, {p.lines_per_s:,.1f} lines/s, "
                                  f"{p.output_tokens_per_s:,.0f} tokens/s")

        cancel = threading.Event()
        restore = on_signals((signal.SIGINT, signal.SIGTERM), cancel.set)
        try:
            result = run_batch(cfg, registry=registry, tenant=tenant, endpoint_url=settings.s3_endpoint_url, progress=progress,
                               cancel=cancel)
        finally:
            restore()
    if as_json:
        print(json.dumps(result.to_dict(), indent=1))
        return
    if result.cancelled:
        print(f"stopped: kept {result.done:,} of {result.total:,} lines in {result.output} ({result.completed:,} completed, "
              f"{result.failed:,} failed); the others were not answered")
        raise typer.Exit(130)
    where = f"{result.output} (errors in {result.error_output})" if result.error_output else result.output
    print(f"wrote {result.total:,} lines to {where}: {result.completed:,} completed, {result.failed:,} failed, by {result.model} "
          f"on {result.actors} actor(s) in {result.seconds:.1f} s ({result.lines_per_s:,.1f} lines/s, "
          f"{result.output_tokens_per_s:,.0f} output tokens/s)")
