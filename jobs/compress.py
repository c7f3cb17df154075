"""Compression job: quantize, prune or export a registered model into a measured, gated child version.

Laptop (starts a local Ray cluster and runs the work in one Ray task):
    python jobs/compress.py --config jobs/configs/compress_int8.yaml
Any cluster (from a laptop, through the Ray Jobs API):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/compress.py --config jobs/configs/compress_prune.yaml --set ref=tiny-lm:3
"""

from __future__ import annotations

import argparse
import json
import sys

from lmaas import cluster
from lmaas.compress import CompressConfig, check_request
from lmaas.config import load_config, load_settings
from lmaas.errors import LmaasError
from lmaas.registry import ModelRegistry


def compress_task(config: CompressConfig) -> dict:
    """Runs on a cluster node: the registry comes from that node's settings (same store and database)."""
    from lmaas.compress import compress

    result = compress(config, ModelRegistry.from_settings(load_settings()), progress=lambda line: print(line, flush=True))
    return {"ref": result.version.ref, "status": result.version.status, **result.report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (CompressConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs the compression task reserves")
    args = parser.parse_args(argv)
    try:
        config = load_config(CompressConfig, args.config, args.overrides)
        settings = load_settings()
        check_request(config, ModelRegistry.from_settings(settings))  # bad input fails here, before any work
        cluster.connect(settings)
        import ray

        report = ray.get(ray.remote(num_cpus=args.cpus)(compress_task).remote(config))
    except LmaasError as exc:
        # raised inside the Ray task, it arrives wrapped: keep the project's one-line message
        print(f"error: {getattr(exc, 'message', None) or str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
