"""What the serving benchmarks share: ports, percentiles, and lmaas on a local Ray cluster (registry + `build_app`).

Imported by bench/serve_llm.py and bench/serve_embeddings.py (run from the repository root with PYTHONPATH=platform).
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from pathlib import Path

BENCH_KEY = "lmaas_bench_" + "b" * 40
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}
"""Every /v1 route of lmaas wants an API key: both benchmarks' clients send this one to both servers."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    """The p-th percentile of sorted `values` (nearest rank)."""
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


def matmul_gflops(threads: int) -> float:
    """This machine's fp32 matmul speed (2048 x 2048, `threads` torch threads): the compute roofline."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    return 2 * 2048**3 * reps / (time.perf_counter() - start) / 1e9


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not come up")


def start_lmaas(home: Path, register: list[tuple[str, Path, str]], models: list[dict], haproxy: bool = True) -> str:
    """Register `(name, directory, task)` models in a temporary registry under `home` and serve `models`
    (`ServedModel` dicts) with `build_app` on a local 2-CPU Ray cluster, with the inference key `BENCH_KEY`;
    returns the HTTP base URL."""
    os.environ["LMAAS_HOME"] = str(home)
    if haproxy:  # HAProxy instead of Serve's Python proxy: set before the cluster starts (see NOTES.md)
        os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
    import ray
    from ray import serve

    from lmaas import db
    from lmaas.auth import KeyStore
    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry
    from lmaas.serve.deployments import build_app

    settings = load_settings()
    registry = ModelRegistry.from_settings(settings)
    for name, directory, task in register:
        registry.register_version(name, directory, task=task)
    KeyStore(db.connect(settings.database_url)).create_key("default", ["inference"], create_tenant=True, secret=BENCH_KEY)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": models, "ingress": {"num_cpus": 0.1}, "env": settings.env()}), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_http(url, 60)
    return url


def stop_lmaas() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
