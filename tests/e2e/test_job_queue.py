"""`lmaas jobs` against a real `ray start --head` cluster: admission, priorities, cancel, logs, real jobs.

The cluster has 2 CPUs; command jobs reserve 1 CPU each, so at most 2 run at a time.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ray_head_process, wait_for  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def head():
    with ray_head_process(num_cpus=2) as (address, env):
        yield address, env


@pytest.fixture
def env(head, lmaas_env):
    return {**lmaas_env, "RAY_ADDRESS": head[1]["RAY_ADDRESS"], "RAY_AUTH_MODE": "token"}


def jobs_json(cli, env) -> list[dict]:
    result = cli("jobs", "list", "--json", "--limit", "500", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_until_finished(cli, env, count: int, timeout: float) -> list[dict]:
    rows: list[dict] = []

    def finished() -> bool:
        nonlocal rows
        rows = jobs_json(cli, env)
        return len(rows) == count and all(r["state"] in ("succeeded", "failed", "cancelled") for r in rows)

    wait_for(finished, timeout, "queued jobs to finish", interval=2)
    return rows


def overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant."""
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_fifty_jobs_at_once_respect_priorities_and_capacity(cli, env, head, tmp_path):
    """50 jobs queued in one go on a cluster with room for 2: all finish, in priority order, head responsive."""
    from lmaas import db
    from lmaas.config import load_settings
    from lmaas.ops import queue

    engine = db.connect(load_settings().database_url)
    marker = tmp_path / "ran"
    marker.mkdir()
    priorities = ["low", "normal", "high"] * 17
    for i, priority in enumerate(priorities[:49]):
        queue.submit(engine, kind="command", entrypoint=f"touch {marker}/{i} && sleep 0.2", priority=priority,
                     resources={"CPU": 1}, tenant=f"t{i % 3}")
    # the 50th through the CLI, which starts the queue's admitter on the cluster
    submitted = cli("jobs", "submit", "--command", f"touch {marker}/49", "--cpus", "1", "--priority", "low", env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert "queued job 50: command, priority low" in submitted.stdout

    slowest = 0.0
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:  # bounded; the dashboard must keep answering while jobs churn
        started = time.monotonic()
        request = urllib.request.Request(f"{head[0]}/api/version", headers={"Authorization": f"Bearer {_token()}"})
        with urllib.request.urlopen(request, timeout=10):
            slowest = max(slowest, time.monotonic() - started)
        rows = jobs_json(cli, env)
        if all(r["state"] in ("succeeded", "failed", "cancelled") for r in rows):
            break
        time.sleep(1)
    assert slowest < 3, f"the head took {slowest:.1f} s to answer"
    assert {r["state"] for r in rows} == {"succeeded"}, [r for r in rows if r["state"] != "succeeded"][:3]
    assert len(list(marker.iterdir())) == 50

    # all were queued before the admitter started, so admission order is (priority, id) exactly
    admitted = sorted(rows, key=lambda r: r["admitted_at"])
    rank = {"high": 0, "normal": 1, "low": 2}
    assert [(rank[r["priority"]], r["id"]) for r in admitted] == sorted((rank[r["priority"]], r["id"]) for r in rows)
    # never more than the 2 CPUs' worth running: by the queue's clock and by Ray's
    assert overlap([(r["admitted_at"], r["finished_at"]) for r in rows]) <= 2
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head[0], headers={"Authorization": f"Bearer {_token()}"})
    infos = [client.get_job_info(r["submission_id"]) for r in rows]
    assert overlap([(i.start_time, i.end_time) for i in infos]) <= 2


def test_real_jobs_failures_cancel_and_logs(cli, env):
    """An ingest job runs through the queue; a failing one reports why; queued and running jobs cancel."""
    ingest = cli("jobs", "submit", "jobs/configs/ingest_stdlib.yaml", "--set", "name=queued-data", "--set", "sources=[stdlib:8]",
                 "--set", "vocab_size=300", "--priority", "high", env=env)
    assert ingest.returncode == 0, ingest.stderr
    assert "ingest, priority high" in ingest.stdout and "needs 1 CPU" in ingest.stdout
    bad = cli("jobs", "submit", "--kind", "compress", "--set", "ref=no-such-model", "--set", "method=int8-dynamic", env=env)
    assert bad.returncode != 0 and "config file or --command" in bad.stderr  # --set needs a config file
    bad = cli("jobs", "submit", "jobs/configs/compress_int8.yaml", "--set", "ref=no-such-model", env=env)
    assert bad.returncode == 0, bad.stderr  # valid config; the model is looked up when the job runs
    long = cli("jobs", "submit", "--command", "sleep 120", "--cpus", "1", env=env)
    waiting = cli("jobs", "submit", "--command", "sleep 120", "--cpus", "2", "--priority", "low", env=env)
    assert long.returncode == 0 and waiting.returncode == 0

    def state(job_id: int) -> str:
        return next(r["state"] for r in jobs_json(cli, env) if r["id"] == job_id)

    long_id, waiting_id = (int(r.stdout.split()[2].rstrip(":")) for r in (long, waiting))
    wait_for(lambda: state(long_id) == "running", 120, "the long job to run", interval=1)
    assert state(waiting_id) == "queued"  # needs both CPUs while one is taken
    cancelled = cli("jobs", "cancel", str(waiting_id), env=env)
    assert cancelled.returncode == 0 and f"job {waiting_id} cancelled" in cancelled.stdout
    cancelled = cli("jobs", "cancel", str(long_id), env=env)
    assert cancelled.returncode == 0 and f"job {long_id} cancelled" in cancelled.stdout

    rows = {r["kind"]: r for r in wait_until_finished(cli, env, 4, 300) if r["kind"] != "command"}
    assert rows["ingest"]["state"] == "succeeded", rows["ingest"]
    assert rows["compress"]["state"] == "failed"
    assert "no-such-model" in rows["compress"]["message"]  # the job's one-line error, shown by `jobs list`
    assert state(long_id) == "cancelled"

    logs = cli("jobs", "logs", str(rows["ingest"]["id"]), env=env)
    assert logs.returncode == 0 and '"dataset": "queued-data:1"' in logs.stdout
    listed = cli("jobs", "list", env=env)
    assert "succeeded" in listed.stdout and "no-such-model" in listed.stdout

    from lmaas import db
    from lmaas.config import load_settings
    from lmaas.data.versions import get_version

    assert get_version(db.connect(load_settings().database_url), "queued-data:1").documents == 8


def test_bad_submissions_fail_in_one_line(cli, env, lmaas_env):
    cases = [
        (("jobs", "submit", "--command", "true", "--priority", "urgent"), env, "priority must be one of"),
        (("jobs", "submit", "--command", "true", "--cpus", "64"), env, "asks for 64 CPU and the cluster has 2"),
        (("jobs", "submit", "jobs/configs/train_tiny_cpu.yaml", "--set", "lr=-1"), env, "lr"),
        (("jobs", "submit", "jobs/configs/selfcheck.yaml"), env, "pass --kind"),
        (("jobs", "submit", "--command", "true"), lmaas_env, "RAY_ADDRESS"),
        (("jobs", "cancel", "12345"), env, "no job 12345"),
        (("jobs", "logs", "12345"), env, "no job 12345"),
    ]
    for args, run_env, words in cases:
        result = cli(*args, env=run_env)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, result.stderr)


def _token() -> str:
    return (Path.home() / ".ray" / "auth_token").read_text().strip()
