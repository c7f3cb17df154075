"""The job queue's admission rule and its validation, on a real SQLite database (no Ray)."""

from __future__ import annotations

import pytest

from lmaas import db
from lmaas.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from lmaas.ops import queue
from lmaas.ops.queue import QueuedJob, plan


def job(id: int, priority: str = "normal", cpus: float = 1.0, tenant: str = "a", gpus: float = 0.0) -> QueuedJob:
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return QueuedJob(id, tenant, "command", queue.PRIORITIES[priority], "queued", {}, "true", resources, None, float(id), None, None, "")


def ids(jobs: list[QueuedJob]) -> list[int]:
    return [j.id for j in jobs]


def test_highest_priority_first_then_fifo():
    queued = [job(1, "low"), job(2, "normal"), job(3, "high"), job(4, "normal"), job(5, "high")]
    assert ids(plan(queued, [], {"CPU": 10}, 10)) == [3, 5, 2, 4, 1]
    assert ids(plan(queued, [], {"CPU": 3}, 10)) == [3, 5, 2]


def test_a_job_that_does_not_fit_holds_back_the_ones_behind_it():
    queued = [job(1, "high", cpus=4), job(2, "normal", cpus=1)]
    assert ids(plan(queued, [], {"CPU": 2}, 10)) == []  # no overtaking: job 1 is next when 4 CPUs are free
    assert ids(plan(queued, [], {"CPU": 5}, 10)) == [1, 2]
    assert ids(plan([job(1, gpus=1)], [], {"CPU": 8}, 10)) == []  # GPUs count too


def test_a_tenant_at_its_limit_waits_without_blocking_others():
    running = [job(90, tenant="a")]
    queued = [job(1, "high", tenant="a"), job(2, "high", tenant="a"), job(3, "low", tenant="b")]
    assert ids(plan(queued, running, {"CPU": 10}, 1)) == [3]
    assert ids(plan(queued, running, {"CPU": 10}, 2)) == [1, 3]


@pytest.fixture
def engine(tmp_path):
    return db.connect(f"sqlite:///{tmp_path / 'q.db'}")


def test_submit_validates_before_queueing(engine):
    with pytest.raises(InvalidInputError, match="priority must be one of high, normal, low"):
        queue.submit(engine, kind="command", entrypoint="true", priority="urgent")
    with pytest.raises(InvalidInputError, match="non-empty command"):
        queue.submit(engine, kind="command", entrypoint="  ")
    with pytest.raises(InvalidInputError, match="train config: max_steps"):
        queue.submit(engine, kind="train", config={"dataset": "d", "max_steps": 0})
    with pytest.raises(InvalidInputError, match="asks for 3 CPU and the cluster has 2"):
        queue.submit(engine, kind="train", config={"dataset": "d", "num_workers": 4}, capacity={"CPU": 2.0})
    with pytest.raises(InvalidInputError, match="unknown job kind"):
        queue.submit(engine, kind="evaluate", config={})
    with pytest.raises(PermissionDeniedError, match="only an admin's job") as info:  # a tenant may not pin workers to nodes
        queue.submit(engine, kind="train", config={"dataset": "d", "resources_per_worker": {"head": 0.1}}, tenant="acme", storage=object())
    assert info.value.param == "config.resources_per_worker"
    with pytest.raises(PermissionDeniedError, match="straight to vLLM") as info:
        queue.submit(engine, kind="batch", config={"input": "in.jsonl", "model": "m", "output": "out.jsonl",
                                                   "engine": {"engine_kwargs": {"tokenizer": "/etc"}}}, tenant="acme", storage=object())
    assert info.value.param == "config.engine.engine_kwargs"
    assert queue.list_jobs(engine) == []  # nothing half-queued


def test_submit_records_what_the_job_needs_and_cancel_a_queued_job(engine):
    train = queue.submit(engine, kind="train", config={"dataset": "d", "num_workers": 2, "cpus_per_worker": 0.5}, priority="high")
    assert (train.state, train.priority_name, train.resources) == ("queued", "high", {"CPU": 2.0})  # workers + the data feed
    assert train.config["num_workers"] == 2 and train.config["lr"] > 0  # stored validated, defaults filled
    cmd = queue.submit(engine, kind="command", entrypoint="python x.py", resources={"CPU": 0.5, "GPU": 0}, tenant="t")
    assert cmd.resources == {"CPU": 0.5}
    assert ids(queue.list_jobs(engine, tenant="t")) == [cmd.id]
    assert queue.cancel(engine, cmd.id).state == "cancelled"
    with pytest.raises(InvalidInputError, match="already cancelled"):
        queue.cancel(engine, cmd.id)
    with pytest.raises(NotFoundError, match="no job 999"):
        queue.get(engine, 999)


def test_infer_kind_from_the_config_fields():
    assert queue.infer_kind({"dataset": "d", "max_steps": 5}) == "train"
    assert queue.infer_kind({"name": "x", "sources": ["stdlib:3"]}) == "ingest"
    assert queue.infer_kind({"ref": "m", "method": "prune"}) == "compress"
    assert queue.infer_kind({"input": "in.jsonl", "model": "m", "output": "out.jsonl", "concurrency": 2}) == "batch"
    batch = queue.job_config("batch", {"input": "in.jsonl", "model": "m", "output": "out.jsonl", "concurrency": 2, "num_cpus": 0.5})
    assert queue.resources_for("batch", batch) == {"CPU": 1.0}  # what its actors reserve
    with pytest.raises(InvalidInputError, match="fit no job kind"):
        queue.infer_kind({"bogus": 1})
