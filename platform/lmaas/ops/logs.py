"""Structured logs: one JSON object per line, carrying the request id of the HTTP request being served.

    lmaas logs tiny --tail 50          # the replica logs of deployment `tiny` (its served name)
    lmaas logs tiny --follow

The gateway takes a request id from the `X-Request-Id` header (Serve's proxy makes one when the
client sends none and returns it in the response), puts it in `REQUEST_ID` for the request's
context, and passes it to the model replica with each call; the replica's log line for that
request carries the same id, so `lmaas logs DEPLOYMENT | grep ID` follows one request from the
gateway to its engine replica.

`configure_logging()` sends the `lmaas` loggers of a process (a Serve replica, a job driver) to
stderr as JSON; Ray keeps each worker's stderr in `worker-*.err` under the node's log directory,
which `replica_logs` reads back through Ray's state API (the dashboard's log API) or, on a
cluster started without the dashboard, from the local node's log directory.
"""

from __future__ import annotations

import contextvars
import glob
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("lmaas_request_id", default=None)
"""The id of the HTTP request this code runs for (None outside a request)."""

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(value: str | None) -> str:
    """`value` when it is a usable id (1-128 of `[A-Za-z0-9._:-]`), else a fresh one: a client cannot inject log syntax."""
    return value if value and _VALID_ID.match(value) else new_request_id()


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "request_id"?, ...extra}`: fields passed with `extra=` are kept."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            out["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: int | str = logging.INFO, stream=None) -> logging.Logger:  # noqa: ANN001 - a text stream
    """Send the `lmaas` loggers to `stream` as JSON lines; safe to call more than once per process.

    The default is the process's own stderr (`sys.__stderr__`): a Serve replica replaces `sys.stderr`
    with a writer into Serve's logger, which would wrap each JSON line in Serve's text format.
    """
    stream = stream or sys.__stderr__
    logger = logging.getLogger("lmaas")
    for handler in logger.handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.setStream(stream)
            break
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # Ray's root handler would print each line a second time, unstructured
    return logger


# ---- reading replica logs back (`lmaas logs`) ----

SERVE_NAMESPACE = "serve"
_RAY_MARKER = re.compile(r"^:(job_id|actor_name|task_name):")
"""Lines Ray writes into worker logs to attribute what follows (not the replica's own output)."""


def replica_actors(deployment: str, app_name: str) -> list[tuple[str, str]]:
    """(actor name, actor id) of the live replicas of Serve deployment `deployment` in `app_name`."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == SERVE_NAMESPACE and actor["name"].startswith(prefix):
            try:
                handle = ray.get_actor(actor["name"], namespace=SERVE_NAMESPACE)
            except ValueError:  # it stopped in between
                continue
            found.append((actor["name"], handle._actor_id.hex()))
    return sorted(found)


def replica_logs(deployment: str, app_name: str, *, tail: int = 100) -> dict[str, list[str]]:
    """The last `tail` lines each replica of `deployment` wrote to stderr (where `configure_logging` sends them).

    Returns:
        replica actor name -> its lines, oldest first.
    """
    return {name: [line for line in _actor_log(actor_id, tail) if not _RAY_MARKER.match(line)]
            for name, actor_id in replica_actors(deployment, app_name)}


def _actor_log(actor_id: str, tail: int) -> list[str]:
    import ray
    from ray.util.state import get_log
    from ray.util.state.exception import RayStateApiException

    try:
        # the GCS address names this cluster (several may run on one machine); Ray finds its dashboard from it
        address = ray.get_runtime_context().gcs_address
        text = "".join(get_log(address=address, actor_id=actor_id, suffix="err", tail=tail, timeout=10))
        return text.splitlines()[-tail:] if tail > 0 else text.splitlines()
    except (RayStateApiException, OSError):  # no dashboard (requests' ConnectionError is an OSError) on this cluster: read the local node's files
        return _local_worker_log(actor_id, tail)


def _local_worker_log(actor_id: str, tail: int) -> list[str]:
    """The actor's stderr file, when it runs on this machine's node (clusters started without the dashboard)."""
    import ray

    info = ray._private.state.actors(actor_id)  # the GCS's actor table: no dashboard needed
    node = ray._private.worker.global_worker.node
    if (info.get("Address") or {}).get("NodeID") != node.node_id:
        return [f"(replica {actor_id} runs on another node; its logs need the Ray dashboard's log API)"]
    lines: list[str] = []
    for path in sorted(glob.glob(os.path.join(node.get_logs_dir_path(), f"worker-*-{info['Pid']}.err"))):
        with open(path, errors="replace") as f:
            lines += f.read().splitlines()
    return lines[-tail:] if tail > 0 else lines


def follow_replica_logs(deployment: str, app_name: str, *, interval_s: float = 1.0, tail: int = 200) -> Iterator[str]:
    """New lines of every replica of `deployment` as they are written (until interrupted).

    Polls each replica's last `tail` lines and yields what was not seen yet (a replica writing more
    than `tail` lines between two polls loses the excess).
    """
    seen: dict[str, list[str]] = {}
    while True:
        for name, lines in replica_logs(deployment, app_name, tail=tail).items():
            previous = seen.get(name, [])
            start = _overlap(previous, lines)
            for line in lines[start:]:
                yield line
            seen[name] = lines
        time.sleep(interval_s)


def _overlap(previous: list[str], lines: list[str]) -> int:
    """Index in `lines` after the longest suffix of `previous` it starts with."""
    for size in range(min(len(previous), len(lines)), 0, -1):
        if previous[-size:] == lines[:size]:
            return size
    return 0
