"""IngestConfig validates itself; load_config gives one-line errors naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lmaas.config import load_config
from lmaas.data.config import IngestConfig
from lmaas.data.versions import parse_ref
from lmaas.errors import ConfigError, InvalidInputError


def test_defaults_run_on_a_laptop():
    config = IngestConfig()
    assert config.sources == ["stdlib:200"] and config.block_size >= 8 and config.cpus_per_task < 1


@pytest.mark.parametrize(
    "override, field",
    [("block_size=7", "block_size"), ("vocab_size=100", "vocab_size"), ("name=Bad Name", "name"),
     ("format=docx", "format"), ("sources=[]", "sources"), ("validation_percent=100", "validation_percent"),
     ("nonsense=1", "nonsense")],
)
def test_bad_values_are_rejected_with_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(IngestConfig, None, [override])
    assert field in info.value.message


def test_block_size_below_8_says_why():
    with pytest.raises(ValidationError, match="below 8"):
        IngestConfig(block_size=4)


def test_overrides_keep_types():
    config = load_config(IngestConfig, None, ["block_size=64", "sources=[a, s3://b/c]", "name=web"])
    assert config.block_size == 64 and config.sources == ["a", "s3://b/c"] and config.name == "web"


def test_dataset_refs():
    assert parse_ref("web") == ("web", None)
    assert parse_ref("web:3") == ("web", 3)
    for bad in ("web:0", "web:x", ":3"):
        with pytest.raises(InvalidInputError):
            parse_ref(bad)
