"""`CompressConfig` refuses bad input on construction; every shipped compress YAML validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmaas.compress import CompressConfig
from lmaas.config import load_config
from lmaas.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("compress_*.yaml"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method=int3", "method"),
        ("sparsity=1.0", "strictly between 0 and 1"),
        ("sparsity=0", "strictly between 0 and 1"),
        ("method=distill", "jobs/distill.py"),
        ("bogus=1", "bogus"),
        ("output_name=Bad Name", "output_name"),
    ],
)
def test_bad_input_is_one_clear_error(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(CompressConfig, None, ["method=prune", override])


def test_two_four_is_half():
    with pytest.raises(ConfigError, match="2:4"):
        load_config(CompressConfig, None, ["method=prune", "pattern=2:4", "sparsity=0.7"])


def test_parameters_recorded_per_method():
    assert CompressConfig(method="int4-weight", group_size=64).parameters() == {"group_size": 64, "quantize_embeddings": True}
    assert set(CompressConfig(method="prune").parameters()) >= {"sparsity", "pattern", "recovery_steps"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path):
    text = path.read_text()
    assert text.startswith("#") and "jobs/compress.py" in text.split("\n\n")[0], "the header says how to run it"
    load_config(CompressConfig, path)


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"compress_int8.yaml", "compress_int4.yaml", "compress_prune.yaml", "compress_export.yaml"}
