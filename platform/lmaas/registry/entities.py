"""What the registry holds, as plain frozen data: no I/O, no database, no storage.

A `RegisteredModel` is a name with an owner; each `ModelVersion` of it is immutable (its files
and their sha256 never change once registered; only `status` moves between `ready` and
`archived`); an `Alias` is the only mutable pointer, naming one version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

READY = "ready"
ARCHIVED = "archived"
STATUSES = (READY, ARCHIVED)
TASKS = ("causal-lm", "embedding", "seq2seq-lm", "classification", "adapter", "other")
"""Formats/tasks a version can declare; serving picks its engine from this. An `adapter` is a LoRA
adapter (`lmaas.models.adapter`) whose `parent` is its base causal LM."""


@dataclass(frozen=True)
class ModelFile:
    """One file of a version: its path inside the version, sha256 (of the plaintext) and size."""

    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class RegisteredModel:
    """A model name and who owns it; its versions are listed separately."""

    name: str
    tenant: str
    description: str
    tags: dict[str, str]
    created_at: float
    latest_version: int
    """The highest version number ever allocated (0 before the first registration)."""
    public: bool = False
    """Visible to (and callable by) every tenant, not only its owner; only an admin sets it."""

    def visible_to(self, tenant: str | None) -> bool:
        """Whether `tenant` may see it (None: no tenant filter, everything is visible)."""
        return tenant is None or self.public or self.tenant == tenant

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tenant": self.tenant,
            "description": self.description,
            "tags": dict(self.tags),
            "created_at": self.created_at,
            "latest_version": self.latest_version,
            "public": self.public,
        }


@dataclass(frozen=True)
class ModelVersion:
    """One immutable, registered version of a model."""

    name: str
    version: int
    task: str
    status: str
    prefix: str
    """Where its files live in the artifact store (relative to the store root)."""
    files: tuple[ModelFile, ...]
    manifest_sha256: str
    """One hash over every file's path and sha256 (see `lmaas.storage.Manifest.sha256`)."""
    created_at: float
    run: str | None = None
    dataset: str | None = None
    """The dataset version it was trained on, as a reference string (`name:version`)."""
    dataset_sha256: str | None = None
    parent: str | None = None
    """The version it was derived from (compressed/distilled variants, an adapter's base), as `name:version`."""
    parents: tuple[str, ...] = ()
    """Every version it was made from, in order (`parent` first): several for a weight merge."""
    metrics: dict[str, float] = field(default_factory=dict)
    description: str = ""
    signature: str | None = None
    """Ed25519 signature (hex) over `signing_payload()`, or None if unsigned."""
    encrypted: bool = False
    tenant: str = "default"

    @property
    def ref(self) -> str:
        """The exact reference of this version, `name:version`."""
        return f"{self.name}:{self.version}"

    @property
    def size(self) -> int:
        """Total bytes of its files."""
        return sum(f.size for f in self.files)

    def signing_payload(self) -> bytes:
        """The bytes a signature covers: name, version and the hash of every file."""
        return signing_payload(self.name, self.version, self.manifest_sha256)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "task": self.task,
            "status": self.status,
            "size": self.size,
            "files": [f.to_dict() for f in self.files],
            "manifest_sha256": self.manifest_sha256,
            "created_at": self.created_at,
            "run": self.run,
            "dataset": self.dataset,
            "dataset_sha256": self.dataset_sha256,
            "parent": self.parent,
            "parents": list(self.parents),
            "metrics": dict(self.metrics),
            "description": self.description,
            "signed": self.signature is not None,
            "encrypted": self.encrypted,
            "tenant": self.tenant,
        }


@dataclass(frozen=True)
class Alias:
    """A movable name (`production`, `staging`, `canary`) pointing at one version of a model."""

    name: str
    alias: str
    version: int
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alias": self.alias, "version": self.version, "updated_at": self.updated_at}


@dataclass(frozen=True)
class Lineage:
    """Where a version came from and what came of it."""

    version: ModelVersion
    parent: ModelVersion | None
    children: tuple[ModelVersion, ...]
    aliases: tuple[str, ...]
    deployments: tuple[str, ...]
    parents: tuple[ModelVersion, ...] = ()
    """Every parent the caller may see, `parent` first (a merge has several)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.version.ref,
            "dataset": self.version.dataset,
            "dataset_sha256": self.version.dataset_sha256,
            "run": self.version.run,
            "parent": self.parent.ref if self.parent else None,
            "parents": [p.ref for p in self.parents],
            "children": [c.ref for c in self.children],
            "aliases": list(self.aliases),
            "deployments": list(self.deployments),
        }


def signing_payload(name: str, version: int, manifest_sha256: str) -> bytes:
    """The bytes a version's signature covers: its name, number and the hash of every file."""
    return f"lmaas-model-version/1\n{name}\n{version}\n{manifest_sha256}\n".encode()
