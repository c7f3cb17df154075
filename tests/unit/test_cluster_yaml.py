"""cluster.yaml is a launcher config Ray accepts, and it carries lmaas's settings to every node."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def load() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_ray_launcher_schema_accepts_it():
    from ray.autoscaler._private.util import prepare_config, validate_config

    # what `ray up` does before launching anything: merge the provider defaults, then validate
    validate_config(prepare_config(load()))


def test_required_launcher_fields():
    config = load()
    for field in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers"):
        assert field in config, field
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node in types.items():
        assert node["node_config"]["InstanceType"], name
        assert "resources" in node, name
        if name != config["head_node_type"]:
            assert node["min_workers"] <= node["max_workers"], name
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]


def test_has_an_autoscaling_gpu_worker_type():
    gpu = load()["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert gpu["min_workers"] == 0 < gpu["max_workers"]


def test_installs_lmaas_and_passes_its_settings():
    config = load()
    assert config["file_mounts"]["~/lmaas"] == "."
    assert any("pip install" in c and "~/lmaas" in c for c in config["setup_commands"])
    assert any("torch==2.13.0" in c for c in config["setup_commands"])
    env_file = config["file_mounts"]["~/cluster.env"]
    example = (REPO / "deployments" / "cluster.env.example").read_text()
    assert "LMAAS_STORAGE=s3://" in example and "LMAAS_DATABASE_URL=postgresql://" in example
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert ". ~/cluster.env" in start and "set -a" in start, "ray start must inherit the settings"
    assert env_file == "./cluster.env"
