"""Job entrypoints under jobs/ as a user runs them, and every shipped YAML config validates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmaas.compress import CompressConfig, DistillConfig
from lmaas.compress.merge import MergeConfig
from lmaas.config import load_config
from lmaas.data.config import IngestConfig
from lmaas.ops.health import SelfCheckConfig
from lmaas.train.config import TrainConfig
from lmaas.train.finetune import FineTuneConfig
from lmaas.train.sweep import SweepConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {"selfcheck": SelfCheckConfig, "ingest_stdlib": IngestConfig, **dict.fromkeys(
    ("compress_int8", "compress_int4", "compress_prune", "compress_export"), CompressConfig),
    **dict.fromkeys(("train_tiny_cpu", "train_small_gpu_ddp", "train_1b_fsdp", "train_finetune", "train_lora"), TrainConfig),
    "sweep_lr": SweepConfig, "distill_tiny": DistillConfig, "finetune_lora": FineTuneConfig, "merge_linear": MergeConfig}


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    model = CONFIGS[path.stem.split("-")[0]]
    config = load_config(model, path)
    assert isinstance(config, model)
    assert path.read_text().startswith("#"), "each config's header says how to run it"


def run_job(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        env=env, capture_output=True, text=True, timeout=240, cwd=REPO,
    )


def test_selfcheck_job_on_a_running_cluster(ray_cluster, lmaas_env, tmp_path):
    env = {**lmaas_env, "RAY_ADDRESS": ray_cluster.address_info["gcs_address"]}
    result = run_job("selfcheck.py", "--config", "jobs/configs/selfcheck.yaml", "--set", "tasks=3", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["workers"]) == 3
    assert (tmp_path / "home" / "store" / report["prefix"] / "_manifest.json").exists()


def test_selfcheck_job_bad_override_is_one_line(lmaas_env):
    result = run_job("selfcheck.py", "--set", "tasks=0", env=lmaas_env)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: ") and "tasks" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
