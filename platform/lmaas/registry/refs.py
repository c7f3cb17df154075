"""Model references, the one syntax every part of lmaas accepts.

- `name`: its `production` alias if set, else its latest `ready` version;
- `name:7`: version 7;
- `name@staging`: whatever the alias `staging` points at.

Parsing is pure; resolving a reference against the database is `ModelRegistry.resolve`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmaas.errors import InvalidInputError

MAX_VERSION = 2**31 - 1
"""Versions are 32-bit integers in the database (`lmaas.db.MAX_INT`)."""

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
DEFAULT_ALIAS = "production"


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: a name plus at most one of a version number or an alias."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def validate_model_name(name: str) -> str:
    """Return `name` if it is a valid model name (`[a-z0-9][a-z0-9._-]{0,63}`).

    Raises:
        InvalidInputError: it is not.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid model name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
            param="name",
        )
    return name


def validate_alias(alias: str) -> str:
    """Return `alias` if it is a valid alias (`[a-z][a-z0-9_-]{0,63}`: never a number).

    Raises:
        InvalidInputError: it is not.
    """
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias):
        raise InvalidInputError(
            f"invalid alias {alias!r}: use 1-64 characters of a-z, 0-9, '_', '-', starting with a letter",
            param="alias",
        )
    return alias


def parse_ref(ref: str | ModelRef) -> ModelRef:
    """Parse `name`, `name:7` or `name@alias`.

    Raises:
        InvalidInputError: malformed reference, name, version or alias.
    """
    if isinstance(ref, ModelRef):
        return ref
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidInputError("empty model reference: use name, name:VERSION or name@ALIAS", param="model")
    ref = ref.strip()
    if "@" in ref:
        name, _, alias = ref.partition("@")
        return ModelRef(validate_model_name(name), alias=validate_alias(alias))
    if ":" in ref:
        name, _, version = ref.partition(":")
        if not version.isdigit() or not 1 <= int(version) <= MAX_VERSION:
            raise InvalidInputError(f"invalid version in {ref!r}: a version is a positive integer up to {MAX_VERSION}", param="model")
        return ModelRef(validate_model_name(name), version=int(version))
    return ModelRef(validate_model_name(ref))


def validate_file_path(path: str) -> str:
    """Return `path` if it is a safe relative file path inside a version.

    Raises:
        InvalidInputError: absolute, empty, `..`/`.` components, backslashes, or a reserved or temporary name.
    """
    parts = path.split("/") if isinstance(path, str) else [""]
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\0" in path
        or any(part in ("", ".", "..") for part in parts)
        or parts[0].startswith("_manifest")
        or parts[0].startswith("_claim")
        or any(part.startswith(".") and (".tmp-" in part or ".staging-" in part) for part in parts)
    ):
        raise InvalidInputError(f"invalid file path {path!r}: use a relative path without '..' or hidden parts", param="files")
    return path
