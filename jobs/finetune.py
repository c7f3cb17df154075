"""Fine-tuning job: fine-tune a registered model on a chat JSONL file (LoRA by default) and register the result.

Laptop (starts a local Ray cluster):
    python jobs/finetune.py --config jobs/configs/finetune_lora.yaml --set model=base:1 --set training_file=chat.jsonl
Any cluster (from a laptop, through the Ray Jobs API; the file uploaded first, by id):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/finetune.py --config jobs/configs/finetune_lora.yaml --set model=base:1 --set training_file=file-...
"""

from __future__ import annotations

import argparse
import json
import sys

from lmaas import cluster, db
from lmaas.config import load_config, load_settings
from lmaas.data.ingest import quiet_ray_data_logs
from lmaas.errors import LmaasError
from lmaas.storage import Storage
from lmaas.train.finetune import FineTuneConfig, check_fine_tune, fine_tune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (FineTuneConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        config = load_config(FineTuneConfig, args.config, args.overrides)
        settings = load_settings()
        engine, storage = db.connect(settings.database_url), Storage.from_settings(settings)
        check_fine_tune(config, storage=storage, engine=engine)  # a wrong model or file fails before Ray starts
        cluster.connect(settings)
        quiet_ray_data_logs()
        result = fine_tune(config, storage=storage, engine=engine, endpoint_url=settings.s3_endpoint_url,
                           progress=lambda event: print(event["message"], flush=True))
    except LmaasError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
