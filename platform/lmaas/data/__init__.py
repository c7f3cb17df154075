"""Data: sharded ingest with Ray Data, tokenizer training, packing, versioned datasets.

`ingest(config, ...)` reads a corpus (text, JSONL, Parquet, CSV; local or S3), trains or reuses a
byte-level BPE tokenizer, tokenizes in parallel Ray tasks, packs documents into fixed-length
sequences, splits train/validation by document hash and publishes Parquet shards as an
immutable dataset version. `training_dataset(...)` hands a version to Ray Train workers.
"""

from lmaas.data.config import IngestConfig
from lmaas.data.versions import DatasetVersion

__all__ = ["DatasetVersion", "IngestConfig"]
