"""A batch as a queued job (`ops.queue` kind `batch`): what the OpenAI Batch API (`/v1/batches`) creates.

    BatchJobConfig (a BatchConfig and what the Batch API records)  ->  queue  ->  run_batch_job in the job's driver

The driver runs `run_batch` as the job's tenant, writes its progress (completed / failed / total lines) into the
job's report (`ops.queue.JobReport`) about once a second, and at the end files the outputs as files of purpose
`batch_output` (`registry.files.FileStore.adopt`: the Batch API's `output_file_id` and `error_file_id`) and adds the
lines' tokens to the tenant's usage as batch tokens (`auth.quotas.Quotas.record_batch`, at the configured discount).
A stop (SIGTERM: the queue's cancel, through Ray's Jobs API) cancels the batch: the lines answered by then are
published and filed, each whole and once, and so is their usage.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from lmaas.batch.config import BatchConfig
from lmaas.batch.lines import decode_line, is_blank, split_lines
from lmaas.batch.run import BatchProgress, run_batch
from lmaas.errors import InvalidInputError
from lmaas.registry.files import BATCH_URLS, FileStore, file_path, is_file_id

if TYPE_CHECKING:
    from lmaas.registry import ModelRegistry

OUTPUT_NAME = "output.jsonl"
ERROR_NAME = "errors.jsonl"
OUTPUT_PURPOSE = "batch_output"
PROGRESS_EVERY_S = 1.0


class BatchJobConfig(BatchConfig):
    """A queued batch: the `BatchConfig` it runs, and what the Batch API shows of it."""

    endpoint: Literal["/v1/completions", "/v1/chat/completions", "/v1/embeddings"] | None = None
    """The Batch API's `endpoint` (shown on the batch object; each line is answered by its own `url`)."""
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] = Field(default_factory=dict)
    key_id: str | None = None
    """The API key whose usage the lines count as (None: none is recorded, an operator's job)."""
    output_file_id: str | None = None
    """File ids the outputs are filed under once the batch ends (`output` / `error_output` are where `file_path`
    puts their bytes); None: the outputs stay where `output` and `error_output` say, filed as nothing."""
    error_file_id: str | None = None


def batch_job_config(*, tenant: str, model: str, input_file_id: str, endpoint: str | None, storage_url: Callable[[str], str],
                     **options: Any) -> BatchJobConfig:
    """The job of a Batch API request: its outputs at new file ids in `tenant`'s area (`storage_url` makes a store
    path a URL), `options` any other `BatchJobConfig` fields (`metadata`, `key_id`, `concurrency`, ...)."""
    from lmaas.registry.files import new_file_id

    output_id, error_id = new_file_id(), new_file_id()
    return BatchJobConfig(input=input_file_id, model=model, endpoint=endpoint, output_file_id=output_id, error_file_id=error_id,
                          output=storage_url(file_path(tenant, output_id, OUTPUT_NAME)),
                          error_output=storage_url(file_path(tenant, error_id, ERROR_NAME)), **options)


@dataclass
class FileSurvey:
    """What a batch file asks for, read line by line before a batch of it is queued."""

    lines: int = 0
    models: dict[str, int] = field(default_factory=dict)
    """`body.model` values and the first line that gives each."""
    urls: dict[str, int] = field(default_factory=dict)
    """`url` values and the first line that gives each."""


def survey(chunks: Iterable[bytes]) -> FileSurvey:
    """The models and urls of a batch file's lines, streamed (memory bounded by one line). Lines that are no
    request are skipped here: the batch answers them with error lines."""
    found = FileSurvey()
    number = 0
    for raw, _ in split_lines(chunks):
        number += 1
        if is_blank(raw):
            continue
        found.lines += 1
        text, problem = decode_line(raw, number)
        if problem is not None:
            continue
        try:
            obj = json.loads(text or "")
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if isinstance(obj.get("url"), str):
            found.urls.setdefault(obj["url"], number)
        body = obj.get("body")
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            found.models.setdefault(body["model"], number)
    return found


def pick_model(found: FileSurvey, endpoint: str, given: str | None) -> str:
    """The one model a Batch API request runs: `given` (lmaas's option), else the one its lines name.

    Lines may call other inference urls than `endpoint` (lmaas answers each line by its own `url`; OpenAI's batches
    refuse that): a file of completions and chat runs as one batch.

    Raises:
        InvalidInputError: `endpoint` is no batch url (param `endpoint`); lines name several models, or none and
            none is given (param `input_file_id`).
    """
    if endpoint not in BATCH_URLS:
        raise InvalidInputError(f"endpoint must be one of {', '.join(BATCH_URLS)}", param="endpoint")
    if given is not None:
        return given
    if len(found.models) > 1:
        (first, _), (second, line) = sorted(found.models.items(), key=lambda item: item[1])[:2]
        raise InvalidInputError(f"the input file's lines name several models ({first!r}, then {second!r} on line {line}); "
                                "a batch runs one model", param="input_file_id")
    if not found.models:
        raise InvalidInputError("no line of the input file names a model (body.model); name one in each line or in lmaas.model",
                                param="input_file_id")
    return next(iter(found.models))


def base_config(config: BatchJobConfig) -> BatchConfig:
    """The `BatchConfig` part of a job's config (what `run_batch` runs)."""
    return BatchConfig(**{name: getattr(config, name) for name in BatchConfig.model_fields})


def run_batch_job(
    config: BatchJobConfig, *, registry: ModelRegistry, tenant: str, report: Any, endpoint_url: str | None = None,
    batch_discount: float = 0.5, stop_on: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
) -> dict[str, Any]:
    """Run one queued batch in this process (the job's driver) and return its result for the job's report.

    Args:
        registry: acting for `tenant`.
        report: the job's `ops.queue.JobReport` (progress goes there).
        batch_discount: how much of the lines' tokens counts against the tenant's per-day token quota.
        stop_on: signals that cancel the batch (installed only when this runs in the main thread).
    """
    from lmaas.auth.quotas import Quotas

    cancel = threading.Event()
    restore = on_signals(stop_on, cancel.set)
    last = [0.0]

    def progress(p: BatchProgress) -> None:
        now = time.monotonic()
        if p.stage == "running" and now - last[0] < PROGRESS_EVERY_S and p.done != p.total:
            return
        last[0] = now
        report.progress({"stage": p.stage, "total": p.total, "completed": p.completed, "failed": p.failed,
                         "output_tokens": p.output_tokens, "seconds": round(p.seconds, 3), "updated_at": time.time()})
        if p.stage != "reading":
            print(f"batch {p.stage}: {p.done:,}/{p.total if p.total is not None else '?'} lines "
                  f"({p.failed:,} failed), {p.output_tokens_per_s:,.0f} output tokens/s", flush=True)

    try:
        result = run_batch(base_config(config), registry=registry, tenant=tenant, endpoint_url=endpoint_url, progress=progress,
                           cancel=cancel)
    finally:
        restore()
    out = result.to_dict()
    out["output_file_id"] = out["error_file_id"] = None
    if config.output_file_id is not None and config.error_file_id is not None:
        store = FileStore(registry.storage, registry.engine, actor=registry.actor)
        for key, file_id, name, count in (("output_file_id", config.output_file_id, OUTPUT_NAME, result.completed),
                                          ("error_file_id", config.error_file_id, ERROR_NAME, result.failed)):
            if count:
                out[key] = store.adopt(file_id, filename=name, purpose=OUTPUT_PURPOSE, tenant=tenant).id
            else:  # OpenAI's batches give no file for no lines
                registry.storage.delete(file_path(tenant, file_id, name).rsplit("/", 1)[0])
    if config.key_id is not None and result.done:
        Quotas(registry.engine).record_batch(tenant=tenant, key_id=config.key_id, model=config.model, requests=result.done,
                                             prompt_tokens=result.prompt_tokens, completion_tokens=result.output_tokens,
                                             discount=batch_discount)
    return out


def on_signals(signals: Iterable[int], handler: Callable[[], None]) -> Callable[[], None]:
    """Call `handler` on each of `signals` instead of their default (main thread only; elsewhere nothing is installed);
    returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    saved = {sig: signal.signal(sig, lambda _sig, _frame: handler()) for sig in signals}
    return lambda: [signal.signal(sig, old) for sig, old in saved.items()]


def check_input_file(input_id: str) -> None:
    if not is_file_id(input_id):
        raise InvalidInputError(f"input_file_id must be the id of a file uploaded with purpose batch (file-...), not {input_id!r}",
                                param="input_file_id")
