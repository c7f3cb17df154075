"""Packing: documents -> fixed-length sequences, and the deterministic train/validation split."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np

_SPLIT_BUCKETS = 10_000


def split_of(text: str, validation_percent: float) -> str:
    """`train` or `validation` for one document, from a hash of its text alone.

    Adding or removing other documents never moves this one across the split.
    """
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") % _SPLIT_BUCKETS
    return "validation" if bucket < validation_percent * _SPLIT_BUCKETS / 100 else "train"


class Packer:
    """Concatenates documents (each followed by EOS) and cuts the stream into `block_size` rows.

    The tail shorter than one block is dropped at the end (`dropped` counts its tokens).
    """

    def __init__(self, block_size: int, eos_id: int) -> None:
        self.block_size = block_size
        self.eos_id = eos_id
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.dropped = 0

    def add(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Add one document; return the finished rows (shape `[n, block_size]`, int32, maybe n=0)."""
        doc = np.asarray(ids, dtype=np.int32)
        return self.extend(np.append(doc, np.int32(self.eos_id)).astype(np.int32, copy=False))

    def extend(self, stream: np.ndarray) -> np.ndarray:
        """Add tokens that already carry their documents' EOS (`docs_to_stream`); return the finished rows.

        `extend(docs_to_stream(docs, eos))` gives exactly the rows of `add(doc)` for each doc.
        """
        stream = np.asarray(stream, dtype=np.int32)
        if len(stream) == 0:
            return np.empty((0, self.block_size), dtype=np.int32)
        self._pending.append(stream)
        self._pending_len += len(stream)
        if self._pending_len < self.block_size:
            return np.empty((0, self.block_size), dtype=np.int32)
        stream = np.concatenate(self._pending)
        rows = len(stream) // self.block_size
        cut = rows * self.block_size
        rest = stream[cut:]
        self._pending = [rest] if len(rest) else []
        self._pending_len = len(rest)
        return stream[:cut].reshape(rows, self.block_size)

    def finish(self) -> None:
        """Drop the incomplete tail."""
        self.dropped += self._pending_len
        self._pending, self._pending_len = [], 0


def docs_to_stream(docs: Iterable[list[int]], eos_id: int) -> np.ndarray:
    """One int32 array: each document's ids followed by `eos_id`, in order (the packer's input)."""
    flat: list[int] = []
    for ids in docs:
        flat += ids
        flat.append(eos_id)
    return np.array(flat, dtype=np.int32)


def split_streams(texts: list[str], ids: list[list[int]], eos_id: int, validation_percent: float) -> dict[str, tuple[np.ndarray, int]]:
    """Per split (`split_of` each text): (its documents as one EOS-separated stream, document count)."""
    by_split: dict[str, list[list[int]]] = {"train": [], "validation": []}
    for text, doc in zip(texts, ids):
        by_split[split_of(text, validation_percent)].append(doc)
    return {split: (docs_to_stream(docs, eos_id), len(docs)) for split, docs in by_split.items()}


def pack(docs: Iterable[Iterable[int]], block_size: int, eos_id: int) -> Iterator[np.ndarray]:
    """Rows of `block_size` tokens from documents, in order (a convenience over `Packer`)."""
    packer = Packer(block_size, eos_id)
    for doc in docs:
        rows = packer.add(doc)
        yield from rows
    packer.finish()
