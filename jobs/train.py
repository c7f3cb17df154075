"""Training job: train a GPT-style model with Ray Train (DDP or FSDP) and register it.

Laptop (starts a local Ray cluster):
    python jobs/train.py --config jobs/configs/train_tiny_cpu.yaml
Any cluster (from a laptop, through the Ray Jobs API):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/train_tiny_cpu.yaml --set max_steps=200
Continue a run from its latest checkpoint:
    python jobs/train.py --config jobs/configs/train_tiny_cpu.yaml --resume RUN_ID
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
from lmaas.train.config import TrainConfig
from lmaas.train.run import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (TrainConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", metavar="RUN_ID", help="continue this run from its latest checkpoint")
    args = parser.parse_args(argv)
    try:
        config = load_config(TrainConfig, args.config, args.overrides)
        settings = load_settings()
        engine = db.connect(settings.database_url)
        cluster.connect(settings)
        quiet_ray_data_logs()

        def progress(m: dict) -> None:
            val = f" val_loss {m['val_loss']:.3f}" if "val_loss" in m else ""
            print(f"step {m['step']}/{config.max_steps} loss {m['loss']:.3f}{val} {m['tokens_per_s']:,.0f} tokens/s", flush=True)

        result = train(config, storage=Storage.from_settings(settings), engine=engine, resume=args.resume, progress=progress)
    except LmaasError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    mv = result.model_version
    print(json.dumps({"run_id": result.run_id, "run": result.run_uri, "checkpoint": result.checkpoint_uri,
                      "model": f"{mv.name}:{mv.version}" if mv else None, "metrics": result.metrics,
                      "seconds": round(result.seconds, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
