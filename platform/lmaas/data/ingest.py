"""The ingest pipeline: sources -> tokenizer -> parallel tokenize (Ray Data) -> pack -> dataset version.

Ray Data reads and tokenizes in parallel tasks (`read_*`, `map_batches`) spread over the
cluster; the driver streams the tokenized documents in source order (bounded by Ray Data's
backpressure, never the whole corpus at once), packs them into `block_size` rows per split and
writes Parquet shards to a local staging directory, which is published in one step.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.engine import Engine

from lmaas.data import sources as sources_mod
from lmaas.data import tokenizer as tok
from lmaas.data.config import IngestConfig
from lmaas.data.packing import Packer, split_streams
from lmaas.data.versions import DatasetVersion, check_name_free, find_by_content, publish_version
from lmaas import errors
from lmaas.errors import InvalidInputError, LmaasError
from lmaas.storage import Manifest, Storage

Progress = Callable[[str, int], None]
"""Called with (stage, count): `documents` (cumulative documents tokenized), `tokens`, `publish`."""


@dataclass
class IngestResult:
    """What an ingest produced: the version, whether it already existed, and how it ran."""

    version: DatasetVersion
    unchanged: bool
    seconds: float
    tokenize_nodes: list[str] = field(default_factory=list)
    dropped_tokens: int = 0


class _ShardWriter:
    """Rows of one split -> `split/part-NNNNN.parquet` files of `rows_per_shard` rows."""

    def __init__(self, directory: Path, rows_per_shard: int, block_size: int, *, labels: bool = False) -> None:
        self.directory = directory
        self.rows_per_shard = rows_per_shard
        self.block_size = block_size
        self.labels = labels
        """Rows come as [n, 2, block_size] (ids, labels): chat datasets train on some tokens only."""
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.rows = 0
        self.shards = 0

    def add(self, rows: np.ndarray) -> None:
        if len(rows):
            self._buffer.append(rows)
            self._buffered += len(rows)
        while self._buffered >= self.rows_per_shard:
            stacked = np.concatenate(self._buffer)
            self._write(stacked[: self.rows_per_shard])
            rest = stacked[self.rows_per_shard :]
            self._buffer, self._buffered = ([rest], len(rest)) if len(rest) else ([], 0)

    def close(self) -> None:
        if self._buffered:
            self._write(np.concatenate(self._buffer))
        self._buffer, self._buffered = [], 0

    def _write(self, rows: np.ndarray) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

        def column(values: np.ndarray) -> pa.FixedSizeListArray:
            return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa.int32()), self.block_size)

        table = pa.table({"input_ids": column(rows[:, 0]), "labels": column(rows[:, 1])} if self.labels else {"input_ids": column(rows)})
        pq.write_table(table, self.directory / f"part-{self.shards:05d}.parquet", compression="zstd")
        self.shards += 1
        self.rows += len(rows)


def ingest(
    config: IngestConfig,
    *,
    storage: Storage,
    engine: Engine,
    endpoint_url: str | None = None,
    progress: Progress | None = None,
    tenant: str = "default",
) -> IngestResult:
    """Ingest `config.sources` into a new version of dataset `config.name` (or find it unchanged).

    Needs a Ray connection (`lmaas.cluster.connect`).

    Args:
        config: what to read and how to tokenize and pack it.
        storage: artifact store the shards are published to.
        engine: metadata database the version is recorded in.
        endpoint_url: S3-compatible endpoint for `s3://` sources.
        progress: called as documents are tokenized and when publishing starts.
        tenant: who owns the new version; the name must be free or already this tenant's (checked
            before reading anything), and an identical existing version counts only if it is its own.

    Returns:
        The new version, or the existing one with identical content (`unchanged=True`).

    Raises:
        NotFoundError: a source does not exist.
        UnreachableError: an S3 source's endpoint does not answer.
        InvalidInputError: a binary file, a bad JSONL line or field, an empty or too small corpus.
        AlreadyExistsError: another tenant's datasets hold the name.
    """
    started = time.monotonic()
    check_name_free(engine, config.name, tenant)
    resolved = [sources_mod.resolve(s, config.format, endpoint_url=endpoint_url) for s in config.sources]
    staging = Path(tempfile.mkdtemp(prefix="lmaas-ingest-"))
    try:
        with pipeline_context():
            docs = sources_mod.read_documents(resolved, text_field=config.text_field, num_cpus=config.cpus_per_task)
            spec = _tokenizer(config, docs)
            if config.format == "chat":
                stats = _write_examples(tokenize_examples(docs, spec, config), config, staging / "content", progress)
            else:
                tokenized = tokenize_documents(docs, spec, config)
                stats = _pack_and_write(tokenized, spec, config, staging / "content", progress)
            if stats["documents"] == 0:
                raise InvalidInputError(f"the corpus is empty: no text documents in {', '.join(config.sources)}", param="sources")
            if stats["train_rows"] == 0:
                raise InvalidInputError(
                    f"the corpus is too small: {stats['tokens_seen']} tokens make no training sequence of block_size "
                    f"{config.block_size}; add data or lower block_size",
                    param="block_size",
                )
            spec.save(staging / "content" / "tokenizer")
            content_hash = Manifest.of_dir(staging / "content").sha256
            existing = find_by_content(engine, config.name, content_hash, tenant=tenant)
            if existing is not None:
                return IngestResult(existing, True, time.monotonic() - started, stats["nodes"], stats["dropped"])
            if progress:
                progress("publish", 0)
            record = {
                "name": config.name,
                "tenant": tenant,
                "sources": list(config.sources),
                "content_hash": content_hash,
                "tokenizer_hash": spec.sha256,
                "block_size": config.block_size,
                "vocab_size": spec.vocab_size,
                "documents": stats["documents"],
                "train_rows": stats["train_rows"],
                "validation_rows": stats["validation_rows"],
                "tokens": (stats["train_rows"] + stats["validation_rows"]) * config.block_size,
            }
            version = publish_version(storage, engine, staging / "content", record)
            return IngestResult(version, False, time.monotonic() - started, stats["nodes"], stats["dropped"])
    except Exception as exc:
        cause = _lmaas_cause(exc)
        if cause is not None and cause is not exc:
            raise type(cause)(cause.message, param=cause.param) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def pipeline_context() -> Iterator[None]:
    """Ray Data settings of the ingest pipeline, restored afterwards (the benchmark runs under them too)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.execution_options.preserve_order, ctx.op_resource_reservation_enabled)
    ctx.enable_progress_bars = False
    # Ray 2.60's per-operator reservations deadlock this read -> tokenize pipeline once the read
    # blocks fill a small object store (tokenize gets no budget, read waits on it forever:
    # tests/integration/test_data_memory.py); the global backpressure alone keeps memory bounded.
    # They also hold the tokenize operator to one task at a time for its first blocks.
    ctx.op_resource_reservation_enabled = False
    ctx.execution_options.preserve_order = True  # shards (and their hash) must not depend on task timing
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order, ctx.op_resource_reservation_enabled = saved


def _lmaas_cause(exc: BaseException) -> LmaasError | None:
    """The project error a Ray task raised, unwrapped from Ray's exception wrappers."""
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, LmaasError):
            return current
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    # Ray Data re-raises a task's failure as RayTaskError(UserCodeException) whose chain keeps
    # only the remote traceback text; the project error is its last `lmaas.errors.X: message` line.
    found = re.findall(r"lmaas\.errors\.(\w+): (.+)", str(exc))
    if found:
        name, message = found[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, LmaasError):
            return cls(message.strip())
    return None


def _tokenizer(config: IngestConfig, docs) -> tok.TokenizerSpec:  # noqa: ANN001 - ray.data.Dataset
    if config.tokenizer:
        return tok.load_pretrained(config.tokenizer)
    sample: list[str] = []
    for batch in docs.limit(config.tokenizer_sample_docs).iter_batches(batch_format="pyarrow", batch_size=256):
        sample += batch.column("text").to_pylist()
    if not sample:
        raise InvalidInputError(f"the corpus is empty: no text documents in {', '.join(config.sources)}", param="sources")
    return tok.train_bpe(sample, config.vocab_size)


def tokenize_documents(docs, spec: tok.TokenizerSpec, config: IngestConfig):  # noqa: ANN001, ANN201 - ray.data.Dataset
    """Documents -> per batch and split, one compact row: the batch's token stream (EOS after each document).

    Each task encodes `config.batch_size` documents with one `encode_batch` call and returns at
    most two rows (train, validation) holding int32 arrays, so no per-document Python objects
    cross the object store and the driver only concatenates and cuts.
    """
    return docs.map_batches(
        _tokenize,
        fn_kwargs={"spec_json": spec.json, "eos_id": spec.eos_id, "validation_percent": config.validation_percent},
        batch_format="pyarrow",
        batch_size=config.batch_size,
        num_cpus=config.cpus_per_task,
        zero_copy_batch=True,
    )


def _tokenize(batch: pa.Table, spec_json: str, eos_id: int, validation_percent: float) -> pa.Table:
    # Ray runs many of these at once; one thread per task keeps the cores from being oversubscribed.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import ray

    texts = batch.column("text").to_pylist()
    streams = split_streams(texts, tok.encode_batch(spec_json, texts), eos_id, validation_percent)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    splits = [s for s, (_, n) in streams.items() if n]
    arrays = [streams[s][0] for s in splits]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    values = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int32)
    return pa.table(
        {
            "split": pa.array(splits, type=pa.string()),
            "stream": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32())),
            "documents": pa.array([streams[s][1] for s in splits], type=pa.int64()),
            "node": pa.array([node] * len(splits), type=pa.string()),
        }
    )


def tokenize_examples(docs, spec: tok.TokenizerSpec, config: IngestConfig):  # noqa: ANN001, ANN201 - ray.data.Dataset
    """Fine-tuning examples (JSON lines) -> one row each: `split`, and ids and labels padded (or cut) to `block_size`.

    One example per row, never packed with another: no example attends to another's tokens, at the
    cost of the padding (EOS ids whose labels the loss skips). An example longer than `block_size` is
    cut to it (its `cut` tokens are reported as dropped); one cut before its first answer token is
    dropped whole.
    """
    return docs.map_batches(
        _tokenize_examples,
        fn_kwargs={"spec_json": spec.json, "eos_token": spec.eos_token, "eos_id": spec.eos_id, "chat_template": spec.chat_template,
                   "block_size": config.block_size, "validation_percent": config.validation_percent},
        batch_format="pyarrow",
        batch_size=config.batch_size,
        num_cpus=config.cpus_per_task,
        zero_copy_batch=True,
    )


def _tokenize_examples(batch: pa.Table, spec_json: str, eos_token: str, eos_id: int, chat_template: str | None, block_size: int,
                       validation_percent: float) -> pa.Table:
    import json

    import ray

    from lmaas.data.chat import IGNORE, tokenize_example
    from lmaas.data.packing import split_of

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = tok.hf_tokenizer(spec_json, eos_token, chat_template)
    lines = batch.column("text").to_pylist()
    rows = np.full((len(lines), 2, block_size), IGNORE, dtype=np.int32)
    rows[:, 0, :] = eos_id
    cut = np.zeros(len(lines), dtype=np.int64)
    for i, line in enumerate(lines):
        ids, labels = tokenize_example(tokenizer, json.loads(line), eos_id=eos_id)
        n = min(len(ids), block_size)
        rows[i, 0, :n], rows[i, 1, :n], cut[i] = ids[:n], labels[:n], len(ids) - n
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return pa.table({
        "split": pa.array([split_of(line, validation_percent) for line in lines], type=pa.string()),
        "rows": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), type=pa.int32()), 2 * block_size),
        "trained": pa.array((rows[:, 1] != IGNORE).sum(axis=1), type=pa.int64()),
        "cut": pa.array(cut, type=pa.int64()),
        "node": pa.array([node] * len(lines), type=pa.string()),
    })


def _write_examples(tokenized, config: IngestConfig, out: Path, progress: Progress | None) -> dict:  # noqa: ANN001
    writers = {s: _ShardWriter(out / s, config.rows_per_shard, config.block_size, labels=True) for s in ("train", "validation")}
    documents = tokens_seen = dropped = 0
    nodes: set[str] = set()
    for batch in tokenized.iter_batches(batch_format="pyarrow", batch_size=None):
        rows = batch.column("rows").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, 2, config.block_size)
        splits = np.array(batch.column("split").to_pylist())
        trained = batch.column("trained").to_numpy()
        kept = trained > 0  # an example cut before its first answer token teaches nothing (and alone would make the loss NaN)
        for split, writer in writers.items():
            writer.add(rows[(splits == split) & kept])
        documents += len(rows)
        tokens_seen += int(np.sum(trained))
        # an example with no answer token left was cut to a full row: its whole row is dropped too
        dropped += int(np.sum(batch.column("cut").to_numpy())) + int(np.sum(~kept)) * config.block_size
        nodes.update(batch.column("node").to_pylist())
        if progress and len(rows):
            progress("documents", documents)
    for writer in writers.values():
        writer.close()
    return {
        "documents": documents,
        "tokens_seen": tokens_seen,
        "train_rows": writers["train"].rows,
        "validation_rows": writers["validation"].rows,
        "dropped": dropped,
        "nodes": sorted(n for n in nodes if n),
    }


def _pack_and_write(tokenized, spec: tok.TokenizerSpec, config: IngestConfig, out: Path, progress: Progress | None) -> dict:  # noqa: ANN001
    packers = {s: Packer(config.block_size, spec.eos_id) for s in ("train", "validation")}
    writers = {s: _ShardWriter(out / s, config.rows_per_shard, config.block_size) for s in packers}
    documents = tokens_seen = 0
    nodes: set[str] = set()
    for batch in tokenized.iter_batches(batch_format="pyarrow", batch_size=None):
        column = batch.column("stream").combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False)
        counts = batch.column("documents").to_pylist()
        for i, split in enumerate(batch.column("split").to_pylist()):
            writers[split].add(packers[split].extend(values[offsets[i] : offsets[i + 1]]))
            tokens_seen += int(offsets[i + 1] - offsets[i]) - counts[i]  # without the EOS tokens
        documents += sum(counts)
        nodes.update(batch.column("node").to_pylist())
        if progress and counts:
            progress("documents", documents)
    for split, packer in packers.items():
        packer.finish()
        writers[split].close()
    return {
        "documents": documents,
        "tokens_seen": tokens_seen,
        "train_rows": writers["train"].rows,
        "validation_rows": writers["validation"].rows,
        "dropped": sum(p.dropped for p in packers.values()),
        "nodes": sorted(n for n in nodes if n),
    }


def quiet_ray_data_logs() -> None:
    """Keep Ray Data's execution logs off the console (CLI and jobs report progress and errors themselves).

    Ray Data configures its loggers when first imported, so this imports it first.
    """
    import logging

    import ray.data  # noqa: F401 - configures the "ray.data" loggers, which are then turned down

    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
