"""Run by test_data_multinode.py in its own process: a 2-node Ray cluster simulated on this machine.

Ingests part of the built-in corpus, then trains with 2 Ray Train workers that each stream their
shard of the version; prints one JSON line with where tokenization ran and what each worker saw.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster


def train_func(config: dict) -> None:
    import ray.train

    rows = []
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=16):
        rows += [tuple(r) for r in batch["input_ids"].tolist()]
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"node": ray.get_runtime_context().get_node_id(), "rows": rows}, f)


def main() -> None:
    from ray.data import DataContext
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lmaas import db
    from lmaas.data.config import IngestConfig
    from lmaas.data.feed import shard_paths, training_dataset
    from lmaas.data.ingest import ingest
    from lmaas.storage import Storage

    work = tempfile.mkdtemp(prefix="lmaas-multinode-")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
    DataContext.get_current().enable_progress_bars = False
    try:
        storage = Storage(f"file://{work}/store")
        engine = db.connect(f"sqlite:///{work}/lmaas.db")
        config = IngestConfig(name="multi", sources=["stdlib:40"], vocab_size=300, block_size=64, batch_size=2,
                              cpus_per_task=0.25)
        result = ingest(config, storage=storage, engine=engine)
        version = result.version
        trainer = TorchTrainer(
            train_func,
            train_loop_config={"out": work},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
            datasets={"train": training_dataset(version, storage)},
            run_config=RunConfig(name=f"multinode-{os.getpid()}", storage_path=f"{work}/runs"),
        )
        trainer.fit()
        workers = [json.load(open(os.path.join(work, f"rank{r}.json"))) for r in range(2)]
        expected = []
        for path in shard_paths(version, storage):
            expected += [tuple(r) for r in pq.read_table(path).column("input_ids").to_pylist()]
        print(json.dumps({
            "nodes": len([n for n in ray.nodes() if n["Alive"]]),
            "tokenize_nodes": result.tokenize_nodes,
            "train_rows": version.train_rows,
            "worker_rows": [w["rows"] for w in workers],
            "worker_nodes": [w["node"] for w in workers],
            "expected_rows": expected,
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
