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
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
from lmaas.ops.metrics import BatchMetrics
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
    error_output: str | None = None
    """Where the failed lines are, when `BatchConfig.error_output` split them out."""
    cancelled: bool = False
    """The batch was stopped (`run_batch`'s `cancel`): the outputs hold the `completed` + `failed` lines answered
    before, each once and whole; the others were never answered."""
    blocks_per_node: dict[str, int] = field(default_factory=dict)
    """Answered blocks by the Ray node whose actor answered them."""

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def lines_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "completed": self.completed, "failed": self.failed, "output": self.output, "model": self.model,
                "seconds": round(self.seconds, 3), "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "actors": self.actors, "lines_per_s": round(self.lines_per_s, 2), "output_tokens_per_s": round(self.output_tokens_per_s, 2),
                "error_output": self.error_output, "cancelled": self.cancelled, "blocks_per_node": dict(self.blocks_per_node)}


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
    error_store: Storage | None = None
    error_path: str | None = None
    """Where failed lines go (`BatchConfig.error_output`; None: to the output)."""


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
    outputs = []
    for param in ("output", "error_output") if config.error_output else ("output",):
        location = getattr(config, param)
        store, key = _output_location(location, endpoint_url, param)
        if tenant is not None:
            _check_own_area(location, registry.storage, tenant, param)
        if not config.overwrite and store.exists(key):
            raise AlreadyExistsError(f"{param} {location} exists; name another, or set overwrite", param=param)
        outputs.append((store, key))
    if len(outputs) == 2 and outputs[0][0].url(outputs[0][1]) == outputs[1][0].url(outputs[1][1]):
        raise InvalidInputError("error_output must be another place than output (or left out: every line to output)", param="error_output")
    errors = outputs[1] if len(outputs) == 2 else (None, None)
    return CheckedBatch(version, source, filesystem, paths, *outputs[0], tenant, *errors)


def run_batch(
    config: BatchConfig, *, registry: ModelRegistry, tenant: str | None = None, endpoint_url: str | None = None,
    progress: Progress | None = None, cancel: threading.Event | None = None,
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
        cancel: set (from any thread, a signal handler's too) to stop the batch: it stops waiting at once, publishes
            the lines answered so far (each whole, once) and returns with `cancelled`; blocks still in the actors
            are dropped. Set before the first block, it publishes empty outputs.

    Returns:
        The counts; a line the API would refuse, or that is no request, counts as failed (its output line says why,
        in `error_output` when given).

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
    metrics = BatchMetrics(version.ref)
    completed = failed = prompt_tokens = output_tokens = 0
    nodes: dict[str, int] = {}
    cancel = cancel or threading.Event()
    answers = _answers(plan, config, version.ref, ModelSource.of(registry, version.ref, checked.tenant), actors, cpus)
    with contextlib.ExitStack() as stack:  # the writers exit (publish) first, then the pipeline closes
        out = stack.enter_context(store.writer(key, overwrite=config.overwrite))
        errors = (stack.enter_context(checked.error_store.writer(checked.error_path, overwrite=config.overwrite))
                  if checked.error_store is not None and checked.error_path is not None else out)
        for block in _until(answers, cancel):
            oks = block.column("ok").to_pylist()
            lines = [line + "\n" for line in block.column("json").to_pylist()]
            out.write("".join(line for line, ok in zip(lines, oks, strict=True) if ok or errors is out).encode())
            if errors is not out:
                errors.write("".join(line for line, ok in zip(lines, oks, strict=True) if not ok).encode())
            ok = sum(oks)
            completed, failed = completed + ok, failed + len(oks) - ok
            block_prompt, block_output = _total(block, "prompt_tokens"), _total(block, "completion_tokens")
            prompt_tokens, output_tokens = prompt_tokens + block_prompt, output_tokens + block_output
            node = block.column("node")[0].as_py() if block.num_rows else ""
            nodes[node] = nodes.get(node, 0) + 1
            now = time.monotonic() - started
            metrics.block(ok, len(oks) - ok, block_output, completed + failed, output_tokens, now)
            say(BatchProgress("running", plan.rows, completed, failed, output_tokens, now))
        if completed + failed != plan.rows and not cancel.is_set():  # every line answered exactly once, or nothing is published
            raise LmaasError(f"the batch answered {completed + failed:,} of {plan.rows:,} lines; nothing was written")
    return BatchResult(plan.rows, completed, failed, config.output, version.ref, time.monotonic() - started, prompt_tokens, output_tokens,
                       actors, config.error_output, cancel.is_set() and completed + failed < plan.rows, nodes)


def _until(blocks: Iterator[pa.Table], cancel: threading.Event) -> Iterator[pa.Table]:
    """`blocks` until `cancel` is set: they are pulled in a thread, so a cancel is seen at once, not when the next
    block is done. That thread closes the pipeline (stopping Ray Data's execution) at the end, on a cancel, or when
    the caller leaves; an error in it is raised here."""
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    left = threading.Event()

    def stopped() -> bool:
        return cancel.is_set() or left.is_set()

    def offer(item: tuple[str, Any]) -> bool:
        while not stopped():
            try:
                handoff.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def pull() -> None:
        try:
            with contextlib.closing(blocks):
                for block in blocks:
                    if not offer(("block", block)):
                        return
            offer(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            offer(("error", exc))

    thread = threading.Thread(target=pull, name="lmaas-batch-blocks", daemon=True)
    thread.start()
    try:
        while not cancel.is_set():
            try:
                kind, item = handoff.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        left.set()


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


def _output_location(output: str, endpoint_url: str | None, param: str = "output") -> tuple[Storage, str]:
    """The store holding `output` (its folder or bucket) and its path there."""
    scheme, sep, rest = output.partition("://")
    if sep and scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket or not key or key.endswith("/"):
            raise InvalidInputError(f"{param} {output} must name an object: s3://BUCKET/KEY", param=param)
        return Storage(f"s3://{bucket}", endpoint_url=endpoint_url), key
    if sep and scheme != "file":
        raise InvalidInputError(f"{param} {output}: unsupported scheme {scheme!r}; use a path, file:// or s3://", param=param)
    path = os.path.abspath(os.path.expanduser(rest if sep else output))
    if output.endswith("/") or os.path.isdir(path):
        raise InvalidInputError(f"{param} {output} is a directory; name the output file", param=param)
    folder, name = posixpath.split(path)
    return Storage(f"file://{folder}"), name


def _total(block: pa.Table, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(block.column(column)).as_py() or 0)
