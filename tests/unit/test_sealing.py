"""Encryption at rest, streamed (`lmaas.registry.sealing`): segments that cannot be altered, moved, dropped or added."""

from __future__ import annotations

import io
import os

import pytest

from lmaas.errors import IntegrityError
from lmaas.registry import sealing

KEY = os.urandom(32)
SEG = sealing.SEGMENT_BYTES + sealing.TAG_BYTES
HEAD = len(sealing.MAGIC) + sealing.PREFIX_BYTES


def opened(sealed: bytes, path: str = "model.safetensors", key: bytes = KEY) -> bytes:
    return b"".join(sealing.unsealed(key, path, io.BytesIO(sealed), "the file"))


@pytest.mark.parametrize("size", [0, 1, sealing.SEGMENT_BYTES, sealing.SEGMENT_BYTES + 1, 3 * sealing.SEGMENT_BYTES - 5])
def test_round_trip_in_segments(size):
    plain = os.urandom(size)
    sealed = sealing.seal_bytes(KEY, "model.safetensors", plain)
    segments = max(1, -(-size // sealing.SEGMENT_BYTES))
    assert len(sealed) == HEAD + size + segments * sealing.TAG_BYTES
    assert opened(sealed) == plain
    # written through the file interface in odd-sized pieces: the same plaintext back
    out = io.BytesIO()
    writer = sealing.SealingWriter(KEY, "model.safetensors", out)
    for i in range(0, size, 300_001):
        writer.write(plain[i:i + 300_001])
    writer.close()
    assert opened(out.getvalue()) == plain
    assert sealing.UnsealingReader(sealing.unsealed(KEY, "model.safetensors", io.BytesIO(sealed), "f")).read() == plain


def test_altered_reordered_cut_or_extended_files_do_not_open():
    plain = os.urandom(2 * sealing.SEGMENT_BYTES + 10)
    sealed = sealing.seal_bytes(KEY, "model.safetensors", plain)
    first, second, last = sealed[HEAD:HEAD + SEG], sealed[HEAD + SEG:HEAD + 2 * SEG], sealed[HEAD + 2 * SEG:]
    flipped = bytearray(sealed)
    flipped[HEAD + SEG + 5] ^= 1
    tries = {
        "a flipped bit": bytes(flipped),
        "two segments swapped": sealed[:HEAD] + second + first + last,
        "the last segment dropped": sealed[:HEAD + 2 * SEG],
        "a segment appended": sealed + first,
        "cut inside a segment": sealed[:-7],
        "another key": None,
        "another file's path": None,
    }
    for what, data in tries.items():
        with pytest.raises(IntegrityError, match="does not decrypt|cut short"):
            if what == "another key":
                opened(sealed, key=os.urandom(32))
            elif what == "another file's path":
                opened(sealed, path="config.json")
            else:
                opened(data)
    with pytest.raises(IntegrityError, match="not an lmaas-encrypted file"):
        opened(b"PK\x03\x04" + plain[:100])


def test_files_sealed_whole_before_still_open():
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    old = sealing.WHOLE_MAGIC + nonce + AESGCM(KEY).encrypt(nonce, b"weights", b"model.safetensors")
    assert opened(old) == b"weights" and sealing.open_whole(KEY, "model.safetensors", old, "f") == b"weights"
    with pytest.raises(IntegrityError, match="does not decrypt"):
        sealing.open_whole(KEY, "config.json", old, "f")
