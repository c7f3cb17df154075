"""Run by test_data_multinode.py in its own process: a 2-node Ray cluster simulated on this machine.

Ingests part of the built-in corpus, then trains with 2 Ray Train workers that each stream their
shard of the version, then runs an offline batch (`lmaas.batch.run_batch`) with one model actor per
node; prints one JSON line with where tokenization ran, what each worker saw, and where the batch's
blocks were answered.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

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


def run_batch_on_both_nodes(work: str, storage, engine) -> dict:  # noqa: ANN001
    """40 completion lines in blocks of 4, two actors of 0.75 CPU: one fits on each 1-CPU node."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from serve_helpers import make_causal_lm

    from lmaas.batch import BatchConfig, run_batch
    from lmaas.registry import ModelRegistry

    registry = ModelRegistry(storage, engine)
    registry.register_version("tiny", make_causal_lm(Path(work) / "lm"), task="causal-lm")
    source = Path(work) / "requests.jsonl"
    source.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                          "body": {"prompt": f"def f{i}(x):", "max_tokens": 4, "temperature": 0}}) + "\n"
                              for i in range(40)))
    output = Path(work) / "answers.jsonl"
    from ray.data import DataContext

    # both actors up before the first block goes out: else, under load, the first one ready answers all 10 blocks
    DataContext.get_current().wait_for_min_actors_s = 180
    result = run_batch(BatchConfig(input=str(source), model="tiny", output=str(output), concurrency=2, num_cpus=0.75,
                                   lines_per_block=4, engine={"engine": "lmaas", "num_threads": 1}), registry=registry)
    return {"batch_blocks_per_node": result.blocks_per_node, "batch_completed": result.completed,
            "batch_ids": [json.loads(line)["custom_id"] for line in output.read_text().splitlines()]}


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
        batch = run_batch_on_both_nodes(work, storage, engine)
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
            "node_ids": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
            **batch,
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
