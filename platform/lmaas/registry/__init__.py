"""The model registry: immutable model versions, movable aliases, lineage and integrity.

`ModelRegistry` (in `store`) is the one way train, compress, serve, the CLI and the REST API
register, resolve and load models; `resolve_ref` (in `refs`) is the one reference parser.
"""

from lmaas.registry.entities import Alias, Lineage, ModelVersion, RegisteredModel
from lmaas.registry.refs import ModelRef, parse_ref, validate_model_name
from lmaas.registry.store import ModelRegistry

__all__ = [
    "Alias",
    "Lineage",
    "ModelRef",
    "ModelRegistry",
    "ModelVersion",
    "RegisteredModel",
    "parse_ref",
    "validate_model_name",
]
