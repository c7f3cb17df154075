"""The model actors of a batch: each downloads the version once, starts its engine and answers whole blocks of lines.

Ray Data runs `BatchWorker` as the callable class of `map_batches` in an actor pool, handing it one line range of
the input at a time (`reader`), which it reads itself. A block's lines all go to the engine at once (`asyncio`,
bounded by `RequestLimiter`), so its continuous batching keeps full; the answers come back as one output block of
JSON lines. Ray restarts an actor that dies (its process killed, its node lost) and runs its unfinished blocks again
on it: a block is answered whole or not at all.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from lmaas.batch.lines import Answer, RequestLimiter, answer_line
from lmaas.batch.reader import LineRange, read_range
from lmaas.serve.options import EngineOptions

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from lmaas.registry import ModelRegistry

MAX_REQUESTS_IN_FLIGHT = 512
"""Engine requests one actor keeps in flight (half of lmaas's engine's waiting queue)."""
FAULT_ENV = "LMAAS_FAULT_KILL_BATCH_ACTOR_AT"
"""Fault injection for tests: `N:MARKER`. The first actor to have answered N lines creates file MARKER and kills
its own process (SIGKILL), once per MARKER; read by the driver (`run_batch`) and handed to the actors."""
OUTPUT_SCHEMA = pa.schema([("json", pa.string()), ("ok", pa.bool_()), ("custom_id", pa.string()), ("prompt_tokens", pa.int64()),
                           ("completion_tokens", pa.int64()), ("node", pa.string())])
"""One row per input line; `node` is the Ray node whose actor answered it (the same for a whole block)."""


@dataclass(frozen=True)
class ModelSource:
    """Where an actor gets the batch's model: the registry's store and database, a pinned `name:version`, the tenant."""

    storage_uri: str
    endpoint_url: str | None
    database_url: str
    ref: str
    tenant: str | None

    @classmethod
    def of(cls, registry: ModelRegistry, ref: str, tenant: str | None) -> ModelSource:
        """The source of version `ref` of `registry`'s, downloaded as `tenant`."""
        return cls(registry.storage.uri, registry.storage.endpoint_url, registry.engine.url.render_as_string(hide_password=False), ref,
                   tenant)

    def download(self, directory: Path) -> str:
        """Download the version into `directory` (sha256-checked, signature and encryption as the registry's environment
        sets, `ModelRegistry.configured`); returns its task."""
        from lmaas import db
        from lmaas.config import apply_secrets_file
        from lmaas.registry import ModelRegistry
        from lmaas.storage import Storage

        apply_secrets_file()  # S3 credentials a worker gets by reference (`Settings.worker_env`)
        registry = ModelRegistry.configured(Storage(self.storage_uri, endpoint_url=self.endpoint_url),
                                            db.connect(self.database_url, migrate=False))
        return registry.download(self.ref, directory, tenant=self.tenant).task


class BatchWorker:
    """One model actor (Ray Data instantiates it once per actor, and again when Ray restarts the actor).

    Args:
        source: where the model is.
        engine: `EngineOptions` as a dict.
        models: the names a line's `body.model` may give, the batch's reference first.
        num_threads: torch threads of the engine.
        filesystem: where the input's files are.
        fault: `FAULT_ENV`'s value in the driver (None: no fault).
    """

    def __init__(self, source: ModelSource, engine: dict[str, Any], models: tuple[str, ...], num_threads: int, filesystem: pafs.FileSystem,
                 fault: str | None = None) -> None:
        from lmaas.serve.openai_api import OpenAIServing

        self.directory = Path(tempfile.mkdtemp(prefix="lmaas-batch-"))
        atexit.register(shutil.rmtree, self.directory, True)
        task = source.download(self.directory)
        self.engine = EngineOptions(**engine).build(task, self.directory, models[0], num_threads=num_threads)
        self.serving = OpenAIServing(dict.fromkeys(models, self.engine))
        self.models = models
        self.filesystem = filesystem
        self.node = _node_id()
        self.limiter: RequestLimiter | None = None
        self.answered = 0
        self.fault = None
        if fault:
            at, marker = fault.split(":", 1)
            self.fault = (int(at), marker)

    async def __call__(self, ranges: pa.Table) -> pa.Table:
        """Read the line ranges of `ranges` (`reader.range_items`) and answer all their lines at once; one output row per line."""
        if self.limiter is None:  # made on the loop Ray Data runs this on
            self.limiter = RequestLimiter(MAX_REQUESTS_IN_FLIGHT)
        rows = []
        for item in ranges.to_pylist():
            block = LineRange(item["file"], item["start"], item["end"], item["first_line"], item["rows"])
            rows += (await asyncio.to_thread(read_range, self.filesystem, item["path"], block)).to_pylist()
        answers = await asyncio.gather(*(self._answer(row) for row in rows))
        return pa.table([[a.json for a in answers], [a.ok for a in answers], [a.custom_id for a in answers],
                         [a.prompt_tokens for a in answers], [a.completion_tokens for a in answers], [self.node] * len(answers)],
                        schema=OUTPUT_SCHEMA)

    async def _answer(self, row: dict[str, Any]) -> Answer:
        assert self.limiter is not None
        answer = await answer_line(row["text"], row["line"], self.serving, self.models, self.limiter, problem=row["problem"])
        self.answered += 1
        if self.fault is not None and self.answered >= self.fault[0]:
            _die_once(self.fault[1])
        return answer


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _die_once(marker: str) -> None:
    """Kill this process (as the OOM killer or a lost node would), unless an actor did so for `marker` already."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
