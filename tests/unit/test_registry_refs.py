"""Model references, names, file paths and entities: pure functions, no I/O."""

from __future__ import annotations

import pytest

from lmaas.errors import InvalidInputError
from lmaas.registry.entities import ModelFile, ModelVersion, signing_payload
from lmaas.registry.refs import ModelRef, parse_ref, validate_alias, validate_file_path, validate_model_name


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tiny", ModelRef("tiny")),
        ("tiny:7", ModelRef("tiny", version=7)),
        ("tiny@staging", ModelRef("tiny", alias="staging")),
        ("all-minilm-l6.v2_x:12", ModelRef("all-minilm-l6.v2_x", version=12)),
        ("  tiny  ", ModelRef("tiny")),
    ],
)
def test_parse_ref(text: str, expected: ModelRef):
    assert parse_ref(text) == expected
    assert parse_ref(str(expected)) == expected  # round trip


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty model reference"),
        ("tiny:0", "positive integer"),
        ("tiny:-1", "positive integer"),
        ("tiny:latest", "positive integer"),
        ("tiny:2147483648", "up to 2147483647"),  # past the database's 32-bit column: 400, not a database error
        ("tiny@", "invalid alias"),
        ("tiny@7", "invalid alias"),
        ("tiny@Prod", "invalid alias"),
        ("Tiny", "invalid model name"),
        ("../x", "invalid model name"),
        ("a/b", "invalid model name"),
        ("-x", "invalid model name"),
        ("x" * 65, "invalid model name"),
    ],
)
def test_bad_refs_are_invalid_input(text: str, words: str):
    with pytest.raises(InvalidInputError, match=words) as info:
        parse_ref(text)
    assert info.value.status == 400


def test_name_limits():
    assert validate_model_name("a" * 64) == "a" * 64
    assert validate_model_name("0") == "0"
    for bad in ("", "a" * 65, "a b", "a\n", "ä"):
        with pytest.raises(InvalidInputError):
            validate_model_name(bad)
    assert validate_alias("production") == "production"
    with pytest.raises(InvalidInputError):
        validate_alias("1")


@pytest.mark.parametrize("path", ["model.safetensors", "1_Pooling/config.json", ".gitattributes"])
def test_safe_file_paths(path: str):
    assert validate_file_path(path) == path


@pytest.mark.parametrize(
    "path", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a\\..\\b", "_manifest.json", "", ".x.tmp-123", "a\0b"]
)
def test_unsafe_file_paths_are_refused(path: str):
    with pytest.raises(InvalidInputError, match="invalid file path"):
        validate_file_path(path)


def test_version_entity_is_plain_data():
    files = (ModelFile("model.safetensors", "a" * 64, 100), ModelFile("config.json", "b" * 64, 20))
    version = ModelVersion("tiny", 3, "causal-lm", "ready", "models/tiny/x", files, "c" * 64, 1.0, parent="base:1")
    assert version.ref == "tiny:3"
    assert version.size == 120
    data = version.to_dict()
    assert data["ref"] == "tiny:3" and data["size"] == 120 and data["signed"] is False
    assert data["files"][0] == {"path": "model.safetensors", "sha256": "a" * 64, "size": 100}
    with pytest.raises(AttributeError):
        version.version = 4  # frozen
    assert version.signing_payload() == signing_payload("tiny", 3, "c" * 64)
    assert signing_payload("tiny", 4, "c" * 64) != version.signing_payload()
