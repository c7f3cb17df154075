"""Distillation job: train a smaller student on a registered teacher (Ray Train, DDP or FSDP) and register it.

Laptop (starts a local Ray cluster):
    python jobs/distill.py --config jobs/configs/distill_tiny.yaml
Any cluster (from a laptop, through the Ray Jobs API):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/distill.py --config jobs/configs/distill_tiny.yaml --set teacher=tiny-lm:3
Continue a run from its latest checkpoint:
    python jobs/distill.py --config jobs/configs/distill_tiny.yaml --resume RUN_ID
"""

from __future__ import annotations

import argparse
import json
import sys

from lmaas import cluster
from lmaas.compress import DistillConfig
from lmaas.compress.distill import check_distill, distill
from lmaas.config import load_config, load_settings
from lmaas.data.ingest import quiet_ray_data_logs
from lmaas.errors import LmaasError
from lmaas.registry import ModelRegistry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (DistillConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", metavar="RUN_ID", help="continue this distillation run from its latest checkpoint")
    args = parser.parse_args(argv)
    try:
        config = load_config(DistillConfig, args.config, args.overrides)
        settings = load_settings()
        registry = ModelRegistry.from_settings(settings)
        check_distill(config, registry)  # bad input fails here, before Ray starts
        cluster.connect(settings)
        quiet_ray_data_logs()
        result = distill(config, registry, resume=args.resume, progress=lambda line: print(line, flush=True))
    except LmaasError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps({"ref": result.version.ref, "status": result.version.status, **result.report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
