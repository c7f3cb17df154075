"""Prometheus metrics of lmaas, recorded through Ray's metrics system (`ray.util.metrics`).

Every Ray node exports what its processes record on its metrics export port (`ray start
--metrics-export-port`, the dashboard's "Metrics" view, a Prometheus scrape config over
`/tmp/ray/session_latest/metrics/prometheus/prom_metrics_service_discovery.json`). Ray prefixes
each name with `ray_`: `lmaas_requests` is scraped as `ray_lmaas_requests_total`. A series shows
up about 10 s after it is first recorded. Serve's own metrics (`ray_serve_*`: replicas, HTTP
requests at the proxy) sit beside them; `deployments/monitoring/` holds a Grafana dashboard and
Prometheus alert rules over both.

Who records what:

- the gateway (`OpenAIIngress`): requests by model/version/route/status, request latency, 429
  quota rejections by tenant (`RequestMetrics`, an ASGI middleware in `serve/openai_app.py`), and
  per model its requests and server errors of the last 5 minutes (`RecentRequests`, gauges that
  `lmaas status` sums over the cluster's nodes: `recent_traffic`; the same window, with the
  gateway's time to first token, is each deployment's `traffic` in `GET /api/v1/deployments`);
- model replicas (`ModelServer`): time to first token, inter-token latency, prompt and output
  tokens per request, and every `ENGINE_POLL_S` the engine's waiting requests, running batch size
  and KV-cache use (`ServingMetrics`);
- training (rank 0): tokens/s, loss, validation loss, step, checkpoint stall (`TrainMetrics`);
- offline batches (`lmaas batch`, `/v1/batches`), their driver: lines answered by status, output tokens,
  lines/s and output tokens/s so far, by model (`BatchMetrics`);
- the job queue's admitter: queued/running jobs and finished jobs by state (`JobMetrics`).

Metric objects are created once per process, on first use; outside a Ray worker or driver
(`ray.is_initialized()` false) every recorder is a no-op, so library code can call them anywhere.
The engine (`serve/engine`) never imports Ray: replicas read its `EngineStats`.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ENGINE_POLL_S = 2.0
"""How often a replica samples its engine's gauges."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

RECENT_WINDOW_S = 300.0
"""The window of the gateway's recent-traffic gauges (what `lmaas status` calls "recent")."""

SERVE_TAGS = ("model", "version")
TRAIN_TAGS = ("run", "model")


@dataclass(frozen=True)
class MetricSpec:
    """One lmaas metric: `name` as recorded; Prometheus sees `exported` (plus `_bucket/_sum/_count` for histograms)."""

    name: str
    kind: str
    """"counter", "gauge" or "histogram"."""
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")

    def series(self) -> tuple[str, ...]:
        """Every series name Prometheus stores for this metric."""
        if self.kind == "histogram":
            return tuple(f"ray_{self.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        return (self.exported,)


METRICS = (
    # gateway
    MetricSpec("lmaas_requests", "counter", "HTTP requests answered by the gateway, by model, version, route and status code.",
               ("model", "version", "route", "status")),
    MetricSpec("lmaas_request_latency_seconds", "histogram", "Gateway request latency (until the last byte of the response).",
               ("model", "route"), LATENCY_BUCKETS),
    MetricSpec("lmaas_quota_rejections", "counter", "Requests refused with 429 by a rate limit or token quota, by tenant.", ("tenant",)),
    MetricSpec("lmaas_recent_requests", "gauge", "Requests for a model answered by one gateway replica in the last 5 minutes.", ("model",)),
    MetricSpec("lmaas_recent_server_errors", "gauge", "Of those, answered with a 5xx status.", ("model",)),
    # model replicas
    MetricSpec("lmaas_time_to_first_token_seconds", "histogram", "From a replica receiving a generation request to its first token.",
               SERVE_TAGS, TOKEN_LATENCY_BUCKETS),
    MetricSpec("lmaas_inter_token_latency_seconds", "histogram", "Gap between consecutive tokens of one stream.",
               SERVE_TAGS, TOKEN_LATENCY_BUCKETS),
    MetricSpec("lmaas_prompt_tokens", "counter", "Prompt (input) tokens processed.", SERVE_TAGS),
    MetricSpec("lmaas_output_tokens", "counter", "Generated (output) tokens.", SERVE_TAGS),
    MetricSpec("lmaas_engine_waiting_requests", "gauge", "Requests queued in a replica's engine, not yet decoding.", SERVE_TAGS),
    MetricSpec("lmaas_engine_running_requests", "gauge", "Requests in a replica's running batch.", SERVE_TAGS),
    MetricSpec("lmaas_kv_cache_usage_ratio", "gauge",
               "KV-cache in use / KV-cache capacity of a replica's engine (0..1; see EngineStats.kv_cache_tokens).", SERVE_TAGS),
    # training
    MetricSpec("lmaas_train_tokens_per_second", "gauge", "Training throughput over the last log interval (all workers).", TRAIN_TAGS),
    MetricSpec("lmaas_train_loss", "gauge", "Training loss over the last log interval.", TRAIN_TAGS),
    MetricSpec("lmaas_train_val_loss", "gauge", "Loss on the validation split at the last evaluation.", TRAIN_TAGS),
    MetricSpec("lmaas_train_step", "gauge", "Optimizer steps done.", TRAIN_TAGS),
    MetricSpec("lmaas_train_checkpoint_stall_seconds", "histogram",
               "Seconds training waited for one checkpoint: gather, write and hand-off to Ray's asynchronous upload.",
               TRAIN_TAGS, CHECKPOINT_BUCKETS),
    # offline batches (the batch's driver)
    MetricSpec("lmaas_batch_lines", "counter", "Batch lines answered, by model and status (completed, failed).", ("model", "status")),
    MetricSpec("lmaas_batch_output_tokens", "counter", "Tokens generated for batch lines, by model.", ("model",)),
    MetricSpec("lmaas_batch_lines_per_second", "gauge", "Lines/s of the running batch since it started.", ("model",)),
    MetricSpec("lmaas_batch_output_tokens_per_second", "gauge", "Output tokens/s of the running batch since it started.", ("model",)),
    # job queue
    MetricSpec("lmaas_jobs", "gauge", "Jobs in the queue by state (queued, submitted, running).", ("state",)),
    MetricSpec("lmaas_jobs_finished", "counter", "Queued jobs that finished, by kind and final state (succeeded, failed, cancelled).",
               ("kind", "state")),
)
SPECS = {spec.name: spec for spec in METRICS}

RAY_SERVE_METRICS = (
    "ray_serve_deployment_replica_healthy",
    "ray_serve_deployment_request_counter_total",
    "ray_serve_deployment_error_counter_total",
    "ray_serve_replica_starts_total",
    "ray_serve_num_http_requests_total",
    "ray_serve_num_http_error_requests_total",
    "ray_serve_deployment_processing_latency_ms_bucket",
)
"""Serve's own series the dashboard and alerts use (Ray docs: "Ray Serve metrics")."""

_lock = threading.Lock()
_objects: dict[str, Any] = {}


def _metric(name: str) -> Any:
    """The Ray metric object `name` of this process (created on first use), or None without Ray."""
    found = _objects.get(name)
    if found is not None:
        return found
    import ray

    if not ray.is_initialized():
        return None
    from ray.util import metrics as ray_metrics

    with _lock:
        if name not in _objects:
            spec = SPECS[name]
            if spec.kind == "counter":
                _objects[name] = ray_metrics.Counter(spec.name, spec.description, tag_keys=spec.tags)
            elif spec.kind == "gauge":
                _objects[name] = ray_metrics.Gauge(spec.name, spec.description, tag_keys=spec.tags)
            else:
                _objects[name] = ray_metrics.Histogram(spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tags)
        return _objects[name]


def _inc(name: str, value: float, tags: dict[str, str]) -> None:
    if value:
        metric = _metric(name)
        if metric is not None:
            metric.inc(value, tags)


def _set(name: str, value: float, tags: dict[str, str]) -> None:
    metric = _metric(name)
    if metric is not None:
        metric.set(value, tags)


def _observe(name: str, value: float, tags: dict[str, str]) -> None:
    metric = _metric(name)
    if metric is not None:
        metric.observe(value, tags)


class RecentRequests:
    """Requests and server errors (5xx) per model over the last `window_s` seconds, in per-second buckets (O(1) per request),
    and the times to first token of the newest `MAX_TTFT_SAMPLES` of them."""

    MAX_TTFT_SAMPLES = 1000

    def __init__(self, window_s: float = RECENT_WINDOW_S) -> None:
        self.window_s = window_s
        self._buckets: dict[str, deque[list[int]]] = {}  # model -> [second, requests, errors], oldest first
        self._totals: dict[str, list[int]] = {}
        self._ttft: dict[str, deque[tuple[int, float]]] = {}  # model -> (second, seconds to first token), oldest first
        self._lock = threading.Lock()

    def add(self, model: str, status: int, now: float | None = None, ttft_s: float | None = None) -> tuple[int, int]:
        """Count one answered request (`ttft_s`: its time to first token, when it generated one);
        returns the model's (requests, errors) in the window."""
        second = int(time.time() if now is None else now)
        with self._lock:
            buckets = self._buckets.setdefault(model, deque())
            totals = self._totals.setdefault(model, [0, 0])
            if ttft_s is not None:
                self._ttft.setdefault(model, deque(maxlen=self.MAX_TTFT_SAMPLES)).append((second, ttft_s))
            if not buckets or buckets[-1][0] != second:
                buckets.append([second, 0, 0])
            error = int(status >= 500)
            buckets[-1][1] += 1
            buckets[-1][2] += error
            totals[0] += 1
            totals[1] += error
            return self._expire(model, second)

    def counts(self, now: float | None = None) -> dict[str, tuple[int, int]]:
        """model -> (requests, errors) in the window ending `now`."""
        second = int(time.time() if now is None else now)
        with self._lock:
            return {model: self._expire(model, second) for model in list(self._buckets)}

    def traffic(self, models: Iterable[str], now: float | None = None) -> dict[str, Any]:
        """The window's traffic of `models` together (the names clients sent for one deployment).

        Returns:
            {"window_s", "requests", "requests_per_s" (averaged over the window), "errors", "error_rate"
            (None without requests), "ttft_p50_ms" (None without a generated token)}.
        """
        second = int(time.time() if now is None else now)
        requests = errors = 0
        ttfts: list[float] = []
        with self._lock:
            for model in dict.fromkeys(models):
                if model not in self._buckets:
                    continue
                r, e = self._expire(model, second)
                requests, errors = requests + r, errors + e
                ttfts += [t for s, t in self._ttft.get(model, ()) if s > second - self.window_s]
        ttfts.sort()
        return {
            "window_s": self.window_s,
            "requests": requests,
            "requests_per_s": requests / self.window_s,
            "errors": errors,
            "error_rate": errors / requests if requests else None,
            "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2] if ttfts else None,
        }

    def _expire(self, model: str, second: int) -> tuple[int, int]:
        buckets, totals = self._buckets[model], self._totals[model]
        while buckets and buckets[0][0] <= second - self.window_s:
            _, requests, errors = buckets.popleft()
            totals[0] -= requests
            totals[1] -= errors
        ttft = self._ttft.get(model)
        while ttft and ttft[0][0] <= second - self.window_s:
            ttft.popleft()
        return totals[0], totals[1]


class GatewayMetrics:
    """What the gateway records per HTTP request (duck-typed: `RequestMetrics` in serve/ takes any object with these)."""

    PUBLISH_INTERVAL_S = 1.0
    """The recent-traffic gauges are set at most this often per model (and on every 5xx); `refresh` catches up.
    Ray exports metrics every few seconds anyway, and each record is a call into Ray's metrics core that the
    gateway's event loop pays for."""

    def __init__(self) -> None:
        self.recent = RecentRequests()
        self._published: dict[str, float] = {}

    def request(self, *, model: str, version: str, route: str, status: int, seconds: float, ttft_s: float | None = None) -> None:
        """Record one answered request; `ttft_s`: from its arrival to its first generated token (None: no token)."""
        _inc("lmaas_requests", 1, {"model": model, "version": version, "route": route, "status": str(status)})
        _observe("lmaas_request_latency_seconds", seconds, {"model": model, "route": route})
        if model:
            counts = self.recent.add(model, status, ttft_s=ttft_s)
            now = time.monotonic()
            if status >= 500 or now - self._published.get(model, -self.PUBLISH_INTERVAL_S) >= self.PUBLISH_INTERVAL_S:
                self._published[model] = now
                self._publish(model, *counts)

    def refresh(self) -> None:
        """Re-publish the recent-traffic gauges, so requests older than the window drop out without new traffic."""
        for model, (requests, errors) in self.recent.counts().items():
            self._publish(model, requests, errors)

    def _publish(self, model: str, requests: int, errors: int) -> None:
        _set("lmaas_recent_requests", requests, {"model": model})
        _set("lmaas_recent_server_errors", errors, {"model": model})

    def quota_rejection(self, tenant: str) -> None:
        _inc("lmaas_quota_rejections", 1, {"tenant": tenant})


def recent_traffic(endpoints: Iterable[tuple[str, int]], timeout: float = 3.0) -> dict[str, dict[str, float]]:
    """Requests and server errors of the last 5 minutes per model, summed over every gateway replica.

    Args:
        endpoints: (host, metrics export port) of each Ray node (`ray.nodes()`: NodeManagerAddress, MetricsExportPort).

    Returns:
        model (as clients named it) -> {"requests", "errors", "error_rate"}; a node that does not answer is skipped.
    """
    sums: dict[str, list[float]] = {}
    for host, port in endpoints:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
                text = response.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            for index, series in enumerate(("ray_lmaas_recent_requests{", "ray_lmaas_recent_server_errors{")):
                if line.startswith(series):
                    labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
                    sums.setdefault(labels.get("model", ""), [0.0, 0.0])[index] += float(line.rsplit(" ", 1)[1])
    return {model: {"requests": r, "errors": e, "error_rate": e / r if r else 0.0} for model, (r, e) in sums.items() if r}


class ServingMetrics:
    """What one model replica records, tagged with its served name and the version it runs.

    A stream costs one histogram observation per token (`token`) plus a few per request (`finished`).
    """

    def __init__(self, model: str, version: str) -> None:
        self.tags = {"model": model, "version": version}
        self._ttft = _metric("lmaas_time_to_first_token_seconds")
        self._itl = _metric("lmaas_inter_token_latency_seconds")

    def first_token(self, seconds: float) -> None:
        if self._ttft is not None:
            self._ttft.observe(seconds, self.tags)

    def token(self, gap_s: float) -> None:
        if self._itl is not None:
            self._itl.observe(gap_s, self.tags)

    def finished(self, prompt_tokens: int, output_tokens: int) -> None:
        _inc("lmaas_prompt_tokens", prompt_tokens, self.tags)
        _inc("lmaas_output_tokens", output_tokens, self.tags)

    def engine(self, stats: Any) -> None:
        """Gauges from an `EngineStats` (duck-typed: running, waiting, kv_cache_tokens, kv_cache_capacity)."""
        _set("lmaas_engine_waiting_requests", stats.waiting, self.tags)
        _set("lmaas_engine_running_requests", stats.running, self.tags)
        capacity = getattr(stats, "kv_cache_capacity", 0)
        _set("lmaas_kv_cache_usage_ratio", min(1.0, stats.kv_cache_tokens / capacity) if capacity else 0.0, self.tags)


class TrainMetrics:
    """What rank 0 of a training run records at each report."""

    def __init__(self, run: str, model: str) -> None:
        self.tags = {"run": run, "model": model}

    def report(self, metrics: dict[str, Any]) -> None:
        """Record the loop's metrics dict (`step`, `loss`, `tokens_per_s`, `val_loss`, `checkpoint_stall_s`)."""
        for key, name in (("step", "lmaas_train_step"), ("loss", "lmaas_train_loss"), ("tokens_per_s", "lmaas_train_tokens_per_second"),
                          ("val_loss", "lmaas_train_val_loss")):
            if metrics.get(key) is not None:
                _set(name, float(metrics[key]), self.tags)
        if metrics.get("checkpoint_stall_s") is not None:
            _observe("lmaas_train_checkpoint_stall_seconds", float(metrics["checkpoint_stall_s"]), self.tags)


class BatchMetrics:
    """What a batch's driver records as each answered block is written."""

    def __init__(self, model: str) -> None:
        self.tags = {"model": model}

    def block(self, completed: int, failed: int, tokens: int, lines_so_far: int, tokens_so_far: int, seconds: float) -> None:
        for status, count in (("completed", completed), ("failed", failed)):
            _inc("lmaas_batch_lines", count, {**self.tags, "status": status})
        _inc("lmaas_batch_output_tokens", tokens, self.tags)
        if seconds > 0:
            _set("lmaas_batch_lines_per_second", lines_so_far / seconds, self.tags)
            _set("lmaas_batch_output_tokens_per_second", tokens_so_far / seconds, self.tags)


class JobMetrics:
    """What the job queue's admitter records."""

    def counts(self, by_state: dict[str, int]) -> None:
        for state in ("queued", "submitted", "running"):
            _set("lmaas_jobs", by_state.get(state, 0), {"state": state})

    def finished(self, kind: str, state: str) -> None:
        _inc("lmaas_jobs_finished", 1, {"kind": kind, "state": state})
