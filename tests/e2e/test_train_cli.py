"""`lmaas train` and `lmaas runs` as a user runs them, against the session Ray cluster."""

from __future__ import annotations

import json
import subprocess

import pytest


@pytest.fixture
def env(ray_cluster, lmaas_env):
    return {**lmaas_env, "RAY_ADDRESS": ray_cluster.address_info["gcs_address"]}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_train_from_the_cli_registers_a_model_and_lists_the_run(cli, env):
    ingest = cli("data", "ingest", "stdlib:20", "--name", "clidata", "--block-size", "64", "--vocab-size", "400", env=env)
    assert ingest.returncode == 0, ingest.stderr
    result = cli("train", "jobs/configs/train_tiny_cpu.yaml", "--set", "dataset=clidata", "--set", "max_steps=20",
                 "--set", "output_model=cli-lm", "--set", "alias=staging", env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step     20  loss" in result.stderr  # live progress, one line per report
    assert "registered cli-lm:1 (alias staging)" in result.stdout
    run_id = result.stdout.split()[1].rstrip(":")
    runs = json.loads(cli("runs", "--json", env=env).stdout)
    assert [(r["run_id"], r["status"], r["model"]) for r in runs] == [(run_id, "finished", "cli-lm:1")]
    assert json.loads(cli("runs", run_id, env=env).stdout)["metrics"]["step"] == 20
    shown = cli("models", "show", "cli-lm@staging", env=env)
    assert shown.returncode == 0 and run_id in shown.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "model=huge"], "unknown model size 'huge'"),
        (["--set", "lr=0"], "learning rate must be above 0"),
        (["--set", "modle=tiny"], "modle"),
        (["--set", "dataset=nope"], "dataset nope not found"),
        (["--set", "num_workers=64"], "needs 32 CPUs; the cluster has 2"),
        (["--resume", "no-such-run"], "run 'no-such-run' not found"),
        (["no/such/config.yaml"], "cannot read config no/such/config.yaml"),
    ],
)
def test_bad_input_is_one_line_before_any_worker_starts(cli, env, args, message):
    assert message in one_error_line(cli("train", *args, env=env))
