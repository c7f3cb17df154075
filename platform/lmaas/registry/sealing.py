"""Encryption at rest, streamed: files of any size are sealed and opened one segment at a time.

Format `LMAE2` (a segmented AEAD, after the STREAM construction of Hoang, Reyhanitabar, Rogaway
and Vizár, as in Tink's streaming AEAD and age):

    b"LMAE2" | nonce prefix (7 random bytes) | segment 0 | segment 1 | ... | last segment

Each segment is AES-256-GCM over at most `SEGMENT_BYTES` of plaintext (its ciphertext is 16 bytes
longer, the tag), with the nonce `prefix | segment number (4 bytes, big-endian) | last (1 byte)`
and the file's path in the store as associated data. So a segment cannot be altered, moved within
the file or to another file, and the file cannot be cut short or extended: the last segment says
it is the last, and nothing may follow it. An empty file is one empty last segment. Memory stays
at one segment whatever the file's size.

Files sealed whole by lmaas before (`LMAE1`: magic, nonce, one GCM ciphertext) still open.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import BinaryIO

from lmaas.errors import IntegrityError

MAGIC = b"LMAE2"
WHOLE_MAGIC = b"LMAE1"
SEGMENT_BYTES = 1 << 20
TAG_BYTES = 16
PREFIX_BYTES = 7
MAX_SEGMENTS = 2**32


def _aead(key: bytes):  # noqa: ANN202 - cryptography's AESGCM, imported lazily
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= MAX_SEGMENTS:
        raise ValueError("file too large to seal (2**32 segments)")
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class SealingWriter(io.RawIOBase):
    """A write-only file that seals what it is given into `out`; `close()` writes the last segment.

    An exception before `close()` leaves `out` without a last segment, which never opens: use it
    inside `Storage.writer`, whose target appears only when its block ends without error.
    """

    def __init__(self, key: bytes, path: str, out: BinaryIO) -> None:
        super().__init__()
        self._aead, self._aad, self._out = _aead(key), path.encode(), out
        self._prefix = os.urandom(PREFIX_BYTES)
        self._index = 0
        self._pending = bytearray()
        out.write(MAGIC + self._prefix)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # noqa: ANN001 - bytes-like
        self._pending += data
        # a full segment is sealed only once more follows it: the last one must carry the last flag
        while len(self._pending) > SEGMENT_BYTES:
            self._seal(bytes(self._pending[:SEGMENT_BYTES]), last=False)
            del self._pending[:SEGMENT_BYTES]
        return len(data)

    def _seal(self, plain: bytes, *, last: bool) -> None:
        self._out.write(self._aead.encrypt(_nonce(self._prefix, self._index, last), plain, self._aad))
        self._index += 1

    def close(self) -> None:
        if not self.closed:
            self._seal(bytes(self._pending), last=True)
            self._pending.clear()
        super().close()


def seal(key: bytes, path: str, src: BinaryIO, out: BinaryIO) -> None:
    """Seal all of `src` into `out` for the store path `path`."""
    writer = SealingWriter(key, path, out)
    while chunk := src.read(SEGMENT_BYTES):
        writer.write(chunk)
    writer.close()


def unsealed(key: bytes, path: str, src: BinaryIO, where: str) -> Iterator[bytes]:
    """The plaintext of a sealed file, one segment at a time (each checked before it is yielded).

    Raises (while iterating):
        IntegrityError: not a sealed file, a wrong key, or an altered, reordered, cut short or extended file.
    """
    head = src.read(len(MAGIC))
    if head == WHOLE_MAGIC:
        yield open_whole(key, path, head + src.read(), where)
        return
    if head != MAGIC:
        raise IntegrityError(f"{where} is not an lmaas-encrypted file: altered")
    prefix = src.read(PREFIX_BYTES)
    if len(prefix) != PREFIX_BYTES:
        raise IntegrityError(f"{where} is cut short: altered")
    aead, aad = _aead(key), path.encode()
    sealed_segment = SEGMENT_BYTES + TAG_BYTES
    current, index = _read_full(src, sealed_segment), 0
    while True:
        following = _read_full(src, sealed_segment) if len(current) == sealed_segment else b""
        last = not following
        try:
            yield aead.decrypt(_nonce(prefix, index, last), current, aad)
        except Exception:  # noqa: BLE001 - InvalidTag, or a segment shorter than a tag
            raise IntegrityError(f"{where} does not decrypt (segment {index}): wrong encryption key, or the file was altered, "
                                 "reordered or cut short") from None
        if last:
            return
        current, index = following, index + 1


def open_whole(key: bytes, path: str, sealed: bytes, where: str) -> bytes:
    """A sealed file's plaintext from its bytes (either format)."""
    if sealed.startswith(WHOLE_MAGIC):
        from cryptography.exceptions import InvalidTag

        nonce, body = sealed[len(WHOLE_MAGIC): len(WHOLE_MAGIC) + 12], sealed[len(WHOLE_MAGIC) + 12:]
        try:
            return _aead(key).decrypt(nonce, body, path.encode())
        except InvalidTag:
            raise IntegrityError(f"{where} does not decrypt: wrong encryption key, or the file was altered") from None
    return b"".join(unsealed(key, path, io.BytesIO(sealed), where))


def seal_bytes(key: bytes, path: str, data: bytes) -> bytes:
    out = io.BytesIO()
    seal(key, path, io.BytesIO(data), out)
    return out.getvalue()


def _read_full(src: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes: fewer only at the end of `src` (a stream may return short reads)."""
    parts, got = [], 0
    while got < n:
        chunk = src.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class UnsealingReader(io.RawIOBase):
    """A read-only file over `unsealed(...)`: for code that reads a sealed file's plaintext as a file (header checks)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks, self._pending = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
