"""A user's path to a real cluster: `ray start --head`, then `ray job submit` of a job in jobs/.

The head runs in its own process group with its own temp dir, so stopping it never touches the
test session's cluster (`ray stop` would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ray_head_process  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` with the dashboard (and so the Jobs API): (dashboard URL, env)."""
    with ray_head_process() as head:
        yield head


def test_ray_job_submit_runs_the_selfcheck_job(ray_head, lmaas_env, tmp_path):
    address, _ = ray_head
    result = submit(address, lmaas_env, "jobs/selfcheck.py", "--config", "jobs/configs/selfcheck.yaml", "--set", "tasks=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    report = last_json(result.stdout)
    assert len(report["workers"]) == 2
    assert (tmp_path / "home" / "store" / report["prefix"] / "_manifest.json").exists()


def test_ray_job_submit_ingests_then_trains_and_registers(ray_head, lmaas_env, tmp_path):
    address, _ = ray_head
    ingest = submit(address, lmaas_env, "jobs/ingest.py", "--config", "jobs/configs/ingest_stdlib.yaml",
                    "--set", "name=jobdata", "--set", "sources=[stdlib:30]", "--set", "vocab_size=512", "--set", "block_size=64")
    assert ingest.returncode == 0, ingest.stdout[-3000:] + ingest.stderr[-3000:]
    train = submit(address, lmaas_env, "jobs/train.py", "--config", "jobs/configs/train_tiny_cpu.yaml",
                   "--set", "dataset=jobdata", "--set", "max_steps=20", "--set", "output_model=job-lm")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "step 20/20 loss" in train.stdout  # live progress reached the submitting laptop
    report = last_json(train.stdout)
    assert report["model"] == "job-lm:1" and report["metrics"]["step"] == 20
    run_dir = tmp_path / "home" / "store" / "runs" / report["run_id"]
    assert (run_dir / "loss.png").is_file() and json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def last_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.rindex("\n{") + 1 : stdout.rindex("}") + 1])


def submit(address: str, lmaas_env: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit` of a jobs/ script, as a user types it, with lmaas settings for the job."""
    runtime_env = {"env_vars": {"LMAAS_HOME": lmaas_env["LMAAS_HOME"]}, "excludes": [".venv", ".git"]}
    for _attempt in range(6):  # bounded: the head's job agent registers a few seconds after the dashboard
        result = subprocess.run(
            [
                str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
                "--runtime-env-json", json.dumps(runtime_env), "--", "python", *entrypoint,
            ],
            env={**lmaas_env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=400, cwd=REPO,
        )
        if "No available agent" not in result.stderr:
            return result
        time.sleep(5)
    return result
