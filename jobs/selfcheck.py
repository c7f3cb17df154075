"""Self-check job: Ray tasks on every node write to the artifact store and the database.

Laptop (starts a local Ray cluster):
    python jobs/selfcheck.py --config jobs/configs/selfcheck.yaml
Any cluster (from a laptop, through the Ray Jobs API):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/selfcheck.py --config jobs/configs/selfcheck.yaml --set tasks=16
"""

from __future__ import annotations

import argparse
import json
import sys

from lmaas import cluster
from lmaas.config import load_config, load_settings
from lmaas.errors import LmaasError
from lmaas.ops.health import SelfCheckConfig, self_check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (SelfCheckConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        config = load_config(SelfCheckConfig, args.config, args.overrides)
        settings = load_settings()
        cluster.connect(settings)
        report = self_check(settings, tasks=config.tasks, cpus_per_task=config.cpus_per_task)
    except LmaasError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
