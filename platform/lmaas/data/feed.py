"""Feeding training: a dataset version as a Ray Dataset that Ray Train workers stream.

    ds = training_dataset(version, storage)
    TorchTrainer(..., datasets={"train": ds})
    # in each worker:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=8):
        batch["input_ids"]  # int64 tensor [8, block_size]
"""

from __future__ import annotations

import numpy as np

from lmaas.data.versions import DatasetVersion
from lmaas.errors import InvalidInputError, NotFoundError
from lmaas.storage import Storage

SPLITS = ("train", "validation")


def shard_paths(version: DatasetVersion, storage: Storage, split: str = "train") -> list[str]:
    """Paths (on the store's pyarrow filesystem) of a version's shards for `split`.

    Raises:
        InvalidInputError: unknown split.
        NotFoundError: the version's directory is not published in this store.
    """
    if split not in SPLITS:
        raise InvalidInputError(f"split {split!r}: use one of {', '.join(SPLITS)}", param="split")
    manifest = storage.read_manifest(version.prefix)
    if manifest is None:
        raise NotFoundError(f"dataset {version.ref}: {storage.url(version.prefix)} is not published in this store")
    _, root = storage.pyarrow_filesystem()
    return [f"{root}/{version.prefix}/{e.path}" for e in manifest.files if e.path.startswith(f"{split}/") and e.path.endswith(".parquet")]


def training_dataset(version: DatasetVersion, storage: Storage, split: str = "train", *, num_cpus: float = 0.25):
    """A Ray Dataset of `{"input_ids": int64 [block_size]}` rows (and `labels` in a chat dataset) for one split of `version`."""
    import ray.data

    paths = shard_paths(version, storage, split)
    if not paths:
        raise NotFoundError(f"dataset {version.ref} has no {split} rows")
    filesystem, _ = storage.pyarrow_filesystem()
    ds = ray.data.read_parquet(paths, filesystem=filesystem, num_cpus=num_cpus)
    return ds.map_batches(_as_tensor, batch_format="numpy", num_cpus=num_cpus)


def _as_tensor(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`input_ids` (and, in a chat dataset, `labels`: -100 where the loss skips a token) as int64 [rows, block_size]."""
    return {name: np.stack(list(v)).astype(np.int64) if v.dtype == object else v.astype(np.int64)
            for name, v in batch.items() if name in ("input_ids", "labels")}
