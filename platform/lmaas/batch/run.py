"""`run_batch(config, registry=...)`: a JSONL of OpenAI batch requests in, one answer line per request out, on Ray Data.

    line ranges (from_items)  ->  map_batches(BatchWorker: read, answer; actor pool)  ->  driver streams blocks to OUTPUT

The model is resolved once, as the acting tenant, before anything runs (so every line gets the same version, and a
model the tenant cannot see is refused before anything is written). The driver cuts the input into blocks of lines
(`reader`); Ray Data hands them to the actors, which read them and run the model in their own engines (`worker`);
the driver writes each answered block to the output as it arrives, so memory stays bounded by the blocks in flight
whatever the input's size. The output is written through the artifact store's writer (`Storage.writer`): it appears
whole, under its name, when the last line is in. Needs a Ray connection (`lmaas.cluster.connect`).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmaas.batch.config import BatchConfig
from lmaas.batch.reader import InputPlan, plan_input, range_items
from lmaas.batch.worker import FAULT_ENV, BatchWorker, ModelSource
from lmaas.serve.options import ENGINE_TASKS
from lmaas.errors import (
    AlreadyExistsError,
    InvalidInputError,
    LmaasError,
    NotFoundError,
    PermissionDeniedError,
)
from lmaas.registry.files import FileStore, is_file_id
from lmaas.storage import Storage, resolve_files

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

    from lmaas.registry import ModelRegistry, ModelVersion


@dataclass(frozen=True)
class BatchProgress:
    """Where a running batch stands (what `progress` callbacks get)."""

    stage: str
    """"reading" (cutting the input into blocks), "starting" (actors loading the model) or "running"."""
    total: int | None
    """Lines to answer (None while reading)."""
    completed: int = 0
    """Lines answered with status 200."""
    failed: int = 0
    """Lines answered with an error (their output line says which)."""
    output_tokens: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    """("reading") input bytes read so far."""

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def lines_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


Progress = Callable[[BatchProgress], None]


@dataclass(frozen=True)
class BatchResult:
    """What a batch did: every input line has one output line in `output` (`completed` + `failed` == `total`)."""

    total: int
    completed: int
    failed: int
    output: str
    """Where the output is (a path or `s3://` URI)."""
    model: str
    """`name:version` that answered."""
    seconds: float
    """From the first read of the input to the output's publication."""
    prompt_tokens: int
    output_tokens: int
    actors: int

    @property
    def lines_per_s(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "completed": self.completed, "failed": self.failed, "output": self.output, "model": self.model,
                "seconds": round(self.seconds, 3), "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "actors": self.actors, "lines_per_s": round(self.lines_per_s, 2), "output_tokens_per_s": round(self.output_tokens_per_s, 2)}


@dataclass(frozen=True)
class CheckedBatch:
    """What `check_batch` resolved: the version every line runs on, where the input is, where the output goes."""

    version: ModelVersion
    input: str
    """The input's path or URI (an uploaded file's place in the store)."""
    filesystem: pafs.FileSystem
    """Where the input's files (`paths`) are."""
    paths: list[str]
    output_store: Storage
    output_path: str
    tenant: str | None


def check_batch(
    config: BatchConfig, *, registry: ModelRegistry, tenant: str | None = None, endpoint_url: str | None = None,
) -> CheckedBatch:
    """Resolve the model, the input and the output, and refuse what cannot run, before any work (and without Ray).

    Args: as `run_batch`'s.

    Raises:
        NotFoundError: the model or the input does not exist, or is not the tenant's to see.
        InvalidInputError: the model answers no requests (not causal-lm or embedding); an uploaded file not of
            purpose `batch`; an output that is a directory or not a path or `s3://` URI.
        AlreadyExistsError: the output exists and `config.overwrite` is off.
        PermissionDeniedError: a tenant's input or output outside its own area.
    """
    tenant = tenant if tenant is not None else registry.tenant
    try:
        version = registry.resolve(config.model, tenant=tenant)
    except NotFoundError as exc:
        raise NotFoundError(exc.message, param="model") from None
    if version.task not in ENGINE_TASKS:
        raise InvalidInputError(f"{version.ref} is a {version.task} model; a batch runs {', '.join(ENGINE_TASKS)} models", param="model")
    endpoint_url = endpoint_url if endpoint_url is not None else registry.storage.endpoint_url
    source = _input_source(config.input, registry, tenant)
    filesystem, paths = _resolve_input(source, endpoint_url)
    store, key = _output_location(config.output, endpoint_url)
    if tenant is not None:
        _check_own_area(config.output, registry.storage, tenant, "output")
    if not config.overwrite and store.exists(key):
        raise AlreadyExistsError(f"output {config.output} exists; name another, or set overwrite", param="output")
    return CheckedBatch(version, source, filesystem, paths, store, key, tenant)


def run_batch(
    config: BatchConfig, *, registry: ModelRegistry, tenant: str | None = None, endpoint_url: str | None = None,
    progress: Progress | None = None,
) -> BatchResult:
    """Answer every request line of `config.input` with `config.model`; write one output line per line to `config.output`.

    Args:
        config: the batch.
        registry: where the model is (its store also holds uploaded files, `file-...` inputs). A registry acting
            for a tenant (`ModelRegistry.acting_for`) acts for that tenant here too.
        tenant: who runs the batch (None: an admin, or the registry's tenant): the model must be one it may see,
            and the input (an uploaded file of its own, or a path in its area, `uploads/<tenant>/`) and the output
            (in its area) must be its own.
        endpoint_url: S3-compatible endpoint of `s3://` inputs and outputs (None: the registry store's).
        progress: called as the input is read and as each block of lines is written.

    Returns:
        The counts; a line the API would refuse, or that is no request, counts as failed (its output line says why).

    Raises:
        NotFoundError, InvalidInputError, AlreadyExistsError, PermissionDeniedError: from `check_batch`, before anything
            runs; InvalidInputError also for an empty or binary input.
        LmaasError: the actors could not load the model (the message says why); no output is written.
    """
    import ray

    started = time.monotonic()
    checked = check_batch(config, registry=registry, tenant=tenant, endpoint_url=endpoint_url)
    version, store, key = checked.version, checked.output_store, checked.output_path
    say = progress or (lambda _p: None)
    plan = plan_input(checked.filesystem, checked.paths, lines_per_block=config.lines_per_block, max_block_bytes=config.max_block_bytes,
                      progress=lambda n: say(BatchProgress("reading", None, seconds=time.monotonic() - started, bytes_read=n)))
    if plan.rows == 0:
        raise InvalidInputError(f"input {config.input} holds no lines; each line is one request (custom_id, method, url, body)",
                                param="input")
    actors, cpus = _placement(config, ray.cluster_resources())
    actors = min(actors, len(plan.ranges))  # an actor without a block would only load the model
    say(BatchProgress("starting", plan.rows, seconds=time.monotonic() - started))
    metrics = _Metrics(version.ref)
    completed = failed = prompt_tokens = output_tokens = 0
    answers = _answers(plan, config, version.ref, ModelSource.of(registry, version.ref, checked.tenant), actors, cpus)
    with store.writer(key, overwrite=config.overwrite) as out, contextlib.closing(answers):
        for block in answers:
            oks = block.column("ok").to_pylist()
            out.write("".join(line + "\n" for line in block.column("json").to_pylist()).encode())
            ok = sum(oks)
            completed, failed = completed + ok, failed + len(oks) - ok
            block_prompt, block_output = _total(block, "prompt_tokens"), _total(block, "completion_tokens")
            prompt_tokens, output_tokens = prompt_tokens + block_prompt, output_tokens + block_output
            now = time.monotonic() - started
            metrics.block(ok, len(oks) - ok, block_output, completed + failed, output_tokens, now)
            say(BatchProgress("running", plan.rows, completed, failed, output_tokens, now))
        if completed + failed != plan.rows:  # every line answered exactly once, or nothing is published
            raise LmaasError(f"the batch answered {completed + failed:,} of {plan.rows:,} lines; nothing was written")
    return BatchResult(plan.rows, completed, failed, config.output, version.ref, time.monotonic() - started, prompt_tokens, output_tokens,
                       actors)


def _answers(plan: InputPlan, config: BatchConfig, ref: str, source: ModelSource, actors: int, cpus: float) -> Iterator[pa.Table]:
    """The answered blocks (pyarrow tables of `worker.OUTPUT_SCHEMA`) as Ray Data finishes them."""
    import ray.data

    from lmaas.data.ingest import _lmaas_cause

    models = tuple(dict.fromkeys((config.model, ref)))
    with _pipeline_context():
        blocks = ray.data.from_items(range_items(plan), override_num_blocks=len(plan.ranges))  # one range per Ray Data block
        with warnings.catch_warnings():
            # Ray 2.60 deprecates `**ray_remote_args` but names no parameter for max_restarts / max_task_retries; its
            # default (-1, forever) would loop forever on a line that kills its actor every time
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            answered = blocks.map_batches(
                BatchWorker,
                fn_constructor_kwargs={"source": source, "engine": config.engine.model_dump(), "models": models,
                                       "num_threads": config.engine.num_threads or max(1, int(cpus)), "filesystem": plan.filesystem,
                                       "fault": os.environ.get(FAULT_ENV)},
                batch_size=None,  # a whole block (one line range) per call: the unit that is retried and written
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=config.blocks_per_actor),
                num_cpus=cpus,
                num_gpus=config.num_gpus or None,
                max_restarts=config.max_retries,
                max_task_retries=config.max_retries,
            )
        try:
            yield from answered.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)
        except Exception as exc:
            cause = _lmaas_cause(exc)
            if cause is not None and cause is not exc:
                raise type(cause)(cause.message, param=cause.param) from None
            raise


@contextlib.contextmanager
def _pipeline_context() -> Iterator[None]:
    """Ray Data settings of a batch, restored afterwards.

    No block re-shaping (`target_max_block_size` None): each line range reaches one actor call on its own, and each
    call's answers leave as one block, so a block run again after its actor died replaces its lost run exactly
    (see `reader`). Reservations off for the reason `data.ingest.pipeline_context` gives; no progress bars (the CLI
    draws its own).
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.target_max_block_size, ctx.op_resource_reservation_enabled, ctx.execution_options.preserve_order)
    ctx.enable_progress_bars, ctx.target_max_block_size, ctx.op_resource_reservation_enabled = False, None, False
    ctx.execution_options.preserve_order = False  # write blocks as they finish; lines are matched by custom_id
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.target_max_block_size, ctx.op_resource_reservation_enabled, ctx.execution_options.preserve_order = saved


def _placement(config: BatchConfig, resources: dict[str, float]) -> tuple[int, float]:
    """(actors, CPUs per actor): `config.concurrency`, else as many as the cluster's GPUs (or CPUs) hold."""
    if config.concurrency is not None:
        return config.concurrency, config.num_cpus
    if config.num_gpus > 0:
        return max(1, int(resources.get("GPU", 0) // config.num_gpus)), config.num_cpus
    return max(1, int(resources.get("CPU", 1) // config.num_cpus)), config.num_cpus


def _input_source(given: str, registry: ModelRegistry, tenant: str | None) -> str:
    """Where the input's bytes are: an uploaded file's place in the store, or the path or URI as given."""
    if is_file_id(given):
        record = FileStore(registry.storage, registry.engine).get(given, tenant=tenant)
        if record.purpose != "batch":
            raise InvalidInputError(f"input {given} was uploaded with purpose {record.purpose!r}; a batch reads files of purpose 'batch'",
                                    param="input")
        return registry.storage.url(record.path)
    if tenant is not None:
        _check_own_area(given, registry.storage, tenant, "input")
    return given


def _check_own_area(location: str, storage: Storage, tenant: str, param: str) -> None:
    from lmaas.data.sources import UPLOADS_PREFIX, check_tenant_source

    try:
        check_tenant_source(location, storage, tenant)
    except PermissionDeniedError:
        raise PermissionDeniedError(f"{param} {location}: a tenant's batch reads and writes only its own uploaded files and its area "
                                    f"{UPLOADS_PREFIX}/{tenant}/ in the artifact store; other places need an admin", param=param) from None


def _resolve_input(source: str, endpoint_url: str | None) -> tuple[pafs.FileSystem, list[str]]:
    try:
        return resolve_files(source, endpoint_url=endpoint_url)
    except NotFoundError as exc:
        raise NotFoundError(exc.message.replace("source", "input", 1), param="input") from None


def _output_location(output: str, endpoint_url: str | None) -> tuple[Storage, str]:
    """The store holding `output` (its folder or bucket) and its path there."""
    scheme, sep, rest = output.partition("://")
    if sep and scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket or not key or key.endswith("/"):
            raise InvalidInputError(f"output {output} must name an object: s3://BUCKET/KEY", param="output")
        return Storage(f"s3://{bucket}", endpoint_url=endpoint_url), key
    if sep and scheme != "file":
        raise InvalidInputError(f"output {output}: unsupported scheme {scheme!r}; use a path, file:// or s3://", param="output")
    path = os.path.abspath(os.path.expanduser(rest if sep else output))
    if output.endswith("/") or os.path.isdir(path):
        raise InvalidInputError(f"output {output} is a directory; name the output file", param="output")
    folder, name = posixpath.split(path)
    return Storage(f"file://{folder}"), name


def _total(block: pa.Table, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(block.column(column)).as_py() or 0)


class _Metrics:
    """A batch's Prometheus metrics (through Ray's metrics, exported by the driver's node as `ops.metrics` describes):
    lines answered by status and output tokens (counters), lines/s and output tokens/s so far (gauges), by model."""

    def __init__(self, model: str) -> None:
        self.tags = {"model": model}
        try:
            from ray.util import metrics

            self._lines = metrics.Counter("lmaas_batch_lines", "Batch lines answered, by model and status (completed, failed).",
                                          tag_keys=("model", "status"))
            self._tokens = metrics.Counter("lmaas_batch_output_tokens", "Tokens generated for batch lines, by model.", tag_keys=("model",))
            self._lines_per_s = metrics.Gauge("lmaas_batch_lines_per_second", "Lines/s of the running batch since it started.",
                                              tag_keys=("model",))
            self._tokens_per_s = metrics.Gauge("lmaas_batch_output_tokens_per_second", "Output tokens/s of the running batch since it started.",
                                               tag_keys=("model",))
        except Exception:  # noqa: BLE001 - metrics must never stop a batch
            self._lines = None

    def block(self, completed: int, failed: int, tokens: int, lines_so_far: int, tokens_so_far: int, seconds: float) -> None:
        if self._lines is None:
            return
        for status, count in (("completed", completed), ("failed", failed)):
            if count:
                self._lines.inc(count, {**self.tags, "status": status})
        if tokens:
            self._tokens.inc(tokens, self.tags)
        if seconds > 0:
            self._lines_per_s.set(lines_so_far / seconds, self.tags)
            self._tokens_per_s.set(tokens_so_far / seconds, self.tags)
