"""`lmaas data ...` and `jobs/ingest.py` as a user runs them, against the session Ray cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--block-size", "64", "--vocab-size", "300"]


@pytest.fixture
def env(ray_cluster, lmaas_env):
    return {**lmaas_env, "RAY_ADDRESS": ray_cluster.address_info["gcs_address"]}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_ingest_list_show(cli, env):
    first = cli("data", "ingest", "stdlib:12", "--name", "demo", *SMALL, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("created demo:1: 12 documents")
    again = cli("data", "ingest", "stdlib:12", "--name", "demo", *SMALL, env=env)
    assert again.returncode == 0 and "unchanged" in again.stdout and "demo:1" in again.stdout
    listed = json.loads(cli("data", "list", "--json", env=env).stdout)
    assert [(v["name"], v["version"]) for v in listed] == [("demo", 1)]
    assert "demo:1" in cli("data", "list", env=env).stdout
    shown = json.loads(cli("data", "show", "demo:1", env=env).stdout)
    assert shown["content_hash"] == listed[0]["content_hash"] and shown["block_size"] == 64
    assert "not found" in one_error_line(cli("data", "show", "demo:9", env=env))


def test_bad_input_is_one_line(cli, env, tmp_path):
    assert "block_size" in one_error_line(cli("data", "ingest", "stdlib:3", "--name", "x", "--block-size", "4", env=env))
    assert "nope.txt" in one_error_line(cli("data", "ingest", str(tmp_path / "nope.txt"), "--name", "x", env=env))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "wrong field"}\n')
    line = one_error_line(cli("data", "ingest", str(bad), "--name", "x", *SMALL, env=env))
    assert "bad.jsonl:2" in line and "'text'" in line
    assert json.loads(cli("data", "list", "--json", env=env).stdout) == []


def test_ingest_job(env):
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "ingest.py"), "--config", "jobs/configs/ingest_stdlib.yaml",
         "--set", "sources=[stdlib:8]", "--set", "vocab_size=300", "--set", "block_size=32"],
        env=env, capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    version = json.loads(result.stdout)
    assert version["name"] == "stdlib" and version["documents"] == 8 and version["train_rows"] > 0
