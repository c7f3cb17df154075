"""`lmaas compress` and `jobs/compress.py` as a user runs them, on an imported tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_helpers import make_causal_lm, publish_dataset, stdlib_lines  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--set", "threads=1", "--set", "timing_repeats=1", "--set", "decode_tokens=4", "--set", "eval_tokens=512"]


@pytest.fixture
def imported(cli, lmaas_env, tmp_path: Path) -> dict[str, str]:
    model_dir = make_causal_lm(tmp_path / "src")
    result = cli("models", "import", str(model_dir), "--name", "demo", env=lmaas_env)
    assert result.returncode == 0, result.stderr
    return lmaas_env


def test_compress_registers_a_variant_that_models_show_reports(cli, imported):
    result = cli("compress", "demo", "--method", "int8-weight", *QUICK, env=imported)
    assert result.returncode == 0, result.stderr
    assert "registered demo-int8-weight:1 from demo:1: passed" in result.stdout
    shown = cli("models", "show", "demo-int8-weight", env=imported)
    assert shown.returncode == 0, shown.stderr
    assert "int8-weight vs demo:1" in shown.stdout and "perplexity" in shown.stdout and "report.json" in shown.stdout
    as_json = json.loads(cli("models", "show", "demo-int8-weight:1", "--json", env=imported).stdout)
    assert as_json["parent"] == "demo:1" and 0 < as_json["metrics"]["size_ratio"] < 0.4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--method", "int3"], "method"),
        (["demo", "--method", "prune", "--set", "sparsity=1.5"], "sparsity must be strictly between 0 and 1"),
        (["nope", "--method", "prune"], "no model named 'nope'"),
        (["demo", "--method", "prune", "--set", "recovery_steps=10"], "no training dataset"),
        (["demo", "--method", "distill", "--set", "temperature=0"], "temperature must be above 0"),
        (["demo", "--method", "distill", "--set", "alpha=2"], "alpha must be between 0 and 1"),
        (["demo", "--method", "distill"], "demo:1 records no training dataset; set dataset=NAME:N"),
        (["demo", "--method", "int8-weight", "--resume", "run-1"], "--resume continues a distill run"),
    ],
)
def test_bad_input_is_one_line(cli, imported, args, message):
    result = cli("compress", *args, env=imported)
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_compress_job_on_a_running_cluster(ray_cluster, imported):
    env = {**imported, "RAY_ADDRESS": ray_cluster.address_info["gcs_address"]}
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "compress.py"), "--config", "jobs/configs/compress_int8.yaml",
         "--set", "ref=demo", "--set", "alias=null", "--set", "gate.min_agreement=0", *QUICK, "--cpus", "0.5"],
        env=env, capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ref"] == "demo-int8-dynamic:1" and report["method"] == "int8-dynamic"


def test_distill_trains_a_student_on_the_cluster_and_gates_it(cli, lmaas_env, ray_cluster, tmp_path: Path):
    """A random-weight teacher with a dataset in its own tokenizer; a 1-layer student that a strict gate archives."""
    from tokenizers import Tokenizer

    from lmaas import db
    from lmaas.config import load_settings
    from lmaas.storage import Storage

    teacher = make_causal_lm(tmp_path / "src")
    settings = load_settings()
    ids = Tokenizer.from_file(str(teacher / "tokenizer.json")).encode("\n".join(stdlib_lines(3000))).ids
    dataset = publish_dataset(Storage.from_settings(settings), db.connect(settings.database_url), tmp_path / "ds", ids, teacher)
    assert cli("models", "import", str(teacher), "--name", "demo", "--dataset", dataset, env=lmaas_env).returncode == 0
    env = {**lmaas_env, "RAY_ADDRESS": ray_cluster.address_info["gcs_address"]}
    result = cli("compress", "demo", "--method", "distill", "--config", "jobs/configs/distill_tiny.yaml",
                 "--set", "num_workers=1", "--set", "max_steps=6", "--set", "warmup_steps=1",
                 "--set", "log_interval=3", "--set", "checkpoint_interval=6", "--set", "eval_interval=6",
                 "--set", "gate.min_agreement=0.99", "--set", "alias=production", "--set", "eval_threads=1",
                 "--set", "timing_repeats=1", "--set", "decode_tokens=4", "--set", "eval_tokens=512", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "registered demo-distilled:1 from demo:1: gate failed (agreement" in result.stdout and "archived" in result.stdout
    assert "distill vs demo:1" in result.stdout
    shown = json.loads(cli("models", "show", "demo-distilled:1", "--json", env=env).stdout)
    assert shown["status"] == "archived" and shown["parent"] == "demo:1" and shown["dataset"] == dataset
    assert shown["metrics"]["gate_passed"] == 0.0 and shown["metrics"]["train_steps"] == 6
    assert shown["aliases"] == []  # a student that misses its gate is never aliased
