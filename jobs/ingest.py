"""Ingest job: read, tokenize and pack a corpus into a new dataset version.

Laptop (starts a local Ray cluster):
    python jobs/ingest.py --config jobs/configs/ingest_stdlib.yaml
Any cluster (from a laptop, through the Ray Jobs API):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/ingest.py --config jobs/configs/ingest_stdlib.yaml --set sources=[s3://bucket/corpus]
"""

from __future__ import annotations

import argparse
import json
import sys

from lmaas import cluster, db
from lmaas.config import load_config, load_settings
from lmaas.data.config import IngestConfig
from lmaas.data.ingest import ingest, quiet_ray_data_logs
from lmaas.errors import LmaasError
from lmaas.storage import Storage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (IngestConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        config = load_config(IngestConfig, args.config, args.overrides)
        settings = load_settings()
        engine = db.connect(settings.database_url)
        cluster.connect(settings)
        quiet_ray_data_logs()
        result = ingest(config, storage=Storage.from_settings(settings), engine=engine, endpoint_url=settings.s3_endpoint_url)
    except LmaasError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps({**result.version.to_dict(), "unchanged": result.unchanged}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
