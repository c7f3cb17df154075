"""A user's path to a real cluster: `ray start --head`, then `ray job submit` of a job in jobs/.

The head runs in its own process group with its own temp dir, so stopping it never touches the
test session's cluster (`ray stop` would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` with the dashboard (and so the Jobs API) on a free port."""
    temp_dir = tempfile.mkdtemp(prefix="lmaas-rh-")
    gcs_port, dashboard_port = free_port(), free_port()
    # as from an activated venv: job entrypoints' `python` is the one lmaas is installed in
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
            # the session's own cluster holds the default agent ports on this machine
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        token = None
        for _ in range(600):  # bounded: 60 s
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}")
            try:
                token = token or (Path.home() / ".ray" / "auth_token").read_text().strip()
                request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(request, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise TimeoutError("Ray head dashboard did not come up in 60 s")
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


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
