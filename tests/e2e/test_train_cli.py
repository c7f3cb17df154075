"""`lmaas train`'s refusals, against the session Ray cluster.

A successful `lmaas train` + `lmaas runs` end to end is the README tour's (tests/e2e/test_readme_tour.py).
"""

from __future__ import annotations

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
