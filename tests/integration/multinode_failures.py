"""Run by test_failures.py in its own process: a worker node dies under a Serve app and a training job.

    python tests/integration/multinode_failures.py    # prints one JSON report as its last line

A 2-node Ray cluster simulated on this machine (`ray.cluster_utils.Cluster`): the head (Serve's
controller and proxy, the gateway pinned by the `gateway` resource, the training driver) and
worker node A (`trainer` resource). A model deployment runs one replica per node
(`max_replicas_per_node: 1`); a 1-worker training job runs on A (`resources_per_worker`).
While clients call the gateway over HTTP with an API key, node A's processes are SIGKILLed
(`Cluster.remove_node(allow_graceful=False)`); a few seconds later node B joins with the
`trainer` resource. The report says which requests failed and when, where training resumed and
how it ended, and when the deployment had 2 replicas again.

The GCS declares a silent node dead after `health_check_period_ms` x `health_check_failure_threshold`
(3 s x 5 by default); this cluster uses 1 s x 10: the killed node is declared dead within ~10 s (Serve
and Ray Train notice their own actors' deaths sooner, from the broken connections), while a live node
may stall for up to 10 s on a loaded machine without being declared dead.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import free_port  # noqa: E402
from serve_helpers import ClientLoop, replica_placement  # noqa: E402

APP = "lmaas-ha-nodes"
KEY = "lmaas_hanodes_" + "k" * 40
DEPLOYMENT = "model-tiny"
TRAIN_STEPS = 60
"""Long enough that the node dies mid-run: the kill lands once rank 0 has reported step 10 and Ray
Train has registered a checkpoint (measured: steps 10-15 done by then; 5 steps with a checkpoint
take ~1 s here, so 60 leave ~9 s of margin; 120 cost ~12 s more after the restart)."""
NODE_CHECK = {"health_check_period_ms": 1000, "health_check_failure_threshold": 10}


def main() -> None:
    from ray import serve
    from tokenizers import Tokenizer

    from lmaas import db
    from lmaas.auth import KeyStore
    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry
    from lmaas.serve.deployments import build_app, run_app, http_port
    from lmaas.train.config import TrainConfig
    from lmaas.train.run import train
    from serve_helpers import make_causal_lm, publish_dataset, stdlib_lines

    work = Path(tempfile.mkdtemp(prefix="lmaas-ha-nodes-"))
    report: dict = {}
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"gateway": 1}, "include_dashboard": False, "_system_config": NODE_CHECK})
    node_a = cluster.add_node(num_cpus=1, resources={"trainer": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    try:
        settings = load_settings(home=work / "home")
        registry = ModelRegistry.from_settings(settings)
        model_dir = make_causal_lm(work / "lm", max_seq_len=128)
        registry.register_version("tiny", model_dir, task="causal-lm")
        ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode("\n".join(stdlib_lines(1500))).ids
        dataset = publish_dataset(registry.storage, registry.engine, work / "dataset", ids, model_dir)
        KeyStore(db.connect(settings.database_url)).create_key("default", ["inference"], create_tenant=True, secret=KEY)

        reports: list[dict] = []
        outcome: dict = {}

        def run_training() -> None:
            config = TrainConfig(dataset=dataset, num_workers=1, cpus_per_worker=0.25, resources_per_worker={"trainer": 1},
                                 batch_size=4, max_steps=TRAIN_STEPS, log_interval=5, checkpoint_interval=5, eval_interval=TRAIN_STEPS,
                                 eval_batches=1, warmup_steps=5, max_failures=2, output_model=None)
            try:
                result = train(config, storage=registry.storage, engine=registry.engine, progress=reports.append)
                outcome.update(history=result.history, metrics=result.metrics)
            except BaseException as exc:  # noqa: BLE001 - reported, the test asserts on it
                outcome["error"] = "".join(traceback.format_exception_only(type(exc), exc))[-2000:]

        trainer = threading.Thread(target=run_training, daemon=True)
        trainer.start()  # its start-up (~20-30 s) overlaps Serve's

        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()})
        model = {"ref": "tiny:1", "name": "tiny", "min_replicas": 2, "max_replicas": 2, "max_replicas_per_node": 1, "num_cpus": 0.1,
                 "refresh_interval_s": 0, "health_check_period_s": 1, "graceful_shutdown_timeout_s": 2, "engine": {"num_threads": 1}}
        args = {"models": [model], "ingress": {"num_cpus": 0.05, "resources": {"gateway": 0.1}}, "env": settings.env()}
        run_app(build_app(args), APP)
        base = f"http://127.0.0.1:{http_port()}"
        placement = replica_placement(APP, DEPLOYMENT)
        report["replica_nodes"] = sorted(placement.values())
        report["node_a"], report["head"] = node_a.node_id, cluster.head_node.node_id
        report["serve_ready_s"] = round(time.monotonic() - t0, 1)

        with ClientLoop(base, KEY, threads=2) as loop:
            deadline = time.monotonic() + 150
            store = work / "home" / "store"
            while (len(loop.answers) < 20 or not any(r["step"] >= 10 for r in reports) or not _checkpoint_registered(store)) \
                    and trainer.is_alive() and time.monotonic() < deadline:
                time.sleep(0.1)  # traffic on both replicas, and training past a checkpoint Ray Train has registered
            report["steps_before_removal"] = [r["step"] for r in reports]
            before = len(loop.answers)
            removed = time.monotonic()
            cluster.remove_node(node_a, allow_graceful=False)  # SIGKILL: raylet, its workers, the replica, the train worker
            report["removed_after_s"] = round(removed - t0, 1)
            time.sleep(3)  # only the head serves now
            report["served_by_head_alone"] = sum(1 for a in loop.answers if a[0] > removed and a[1] == 200)
            joined = time.monotonic()
            cluster.add_node(num_cpus=1, resources={"trainer": 1})
            trainer.join(timeout=180)
            report["train_finished_after_join_s"] = round(time.monotonic() - joined, 1)
            report["replicas_back_after_removal_s"] = _wait_for_replicas(APP, DEPLOYMENT, 2, removed, timeout=60)
            time.sleep(1)
        answers = loop.answers
        failed = [a for a in answers if a[1] != 200]
        report.update(
            train_steps=TRAIN_STEPS, requests=len(answers), requests_before_removal=before, failed=len(failed),
            failed_at_s=[round(a[0] - removed, 2) for a in failed], failed_samples=[a[2] for a in failed[:3]],
            last_failure_after_removal_s=round(max((a[0] for a in failed), default=removed) - removed, 2),
            ok_after_removal=sum(1 for a in answers if a[0] > removed and a[1] == 200),
            reports=[{"step": r["step"], "restarts": r["restarts"]} for r in reports],
            train=outcome if "error" in outcome else {"history_steps": [h["step"] for h in outcome.get("history", [])],
                                                      "restarts": outcome.get("metrics", {}).get("restarts")},
            total_s=round(time.monotonic() - t0, 1),
        )
        print(json.dumps(report), flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(work, ignore_errors=True)


def _checkpoint_registered(store: Path) -> bool:
    """Whether Ray Train's controller has registered a checkpoint of the run in `store`.

    A report's checkpoint uploads in the background (`CheckpointUploadMode.ASYNC`) and reaches the
    controller at its next poll, so a step's progress report comes before its checkpoint counts: a
    node lost in between restarts the run from step 0. The controller writes its snapshot on each
    registration.
    """
    for snapshot in store.glob("runs/*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except ValueError:  # being written
            continue
    return False


def _wait_for_replicas(app: str, deployment: str, count: int, since: float, timeout: float) -> float | None:
    """Seconds from `since` until `deployment` runs `count` replicas (None: not within `timeout`)."""
    from ray import serve

    from lmaas.serve.ingress import _running_replicas

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and _running_replicas(status.deployments.get(deployment)) >= count and len(replica_placement(app, deployment)) == count:
            return round(time.monotonic() - since, 1)
        time.sleep(0.5)
    return None


if __name__ == "__main__":
    sys.exit(main())
