"""The input of a batch as blocks of lines: a first pass that cuts it into line ranges, then each range read where it is answered.

Why cut it first, in the driver: Ray Data runs again the call of an actor that died, and the retry's output replaces
the lost one only if it is cut the same way (a task's outputs are matched by position). So every block is a fixed
byte range of one file (`LineRange`), one Ray Data item that the actor reads (`read_range`) and answers in one call,
giving exactly one output block (the pipeline runs with no block re-shaping, `run._pipeline_context`): a block run
again gives the same lines, whatever its answers hold. Reading in the actor also spares a read task, and the worker
process Ray would start for it, per block. The first pass reads the input once more (a stream, in bounded memory)
and gives every line its number, for error lines, and the total, for progress, before any model starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from lmaas.batch.lines import decode_line, is_blank, split_lines
from lmaas.errors import InvalidInputError
from lmaas.registry.files import MAX_LINE_BYTES

_CHUNK = 1 << 20
SCHEMA = pa.schema([("file", pa.int32()), ("line", pa.int64()), ("text", pa.string()), ("problem", pa.string())])
"""A block of input lines: which input file, its line number there, its text, or the problem that left it without."""


@dataclass(frozen=True)
class LineRange:
    """One block of input: bytes `start`..`end` of file `file`, holding `rows` non-blank lines, the first on line `first_line`."""

    file: int
    start: int
    end: int
    first_line: int
    rows: int


@dataclass(frozen=True)
class InputPlan:
    """The input files and their blocks."""

    filesystem: pafs.FileSystem
    """Where `paths` are."""
    paths: list[str]
    ranges: list[LineRange]
    rows: int
    """Non-blank lines: the batch's total."""
    bytes: int


def _chunks(stream: pa.NativeFile, size: int | None = None) -> Iterator[bytes]:
    left = size
    while left is None or left > 0:
        data = stream.read(_CHUNK if left is None else min(_CHUNK, left))
        if not data:
            return
        if left is not None:
            left -= len(data)
        yield bytes(data)


def plan_input(
    filesystem: pafs.FileSystem, paths: list[str], *, lines_per_block: int, max_block_bytes: int, max_line_bytes: int = MAX_LINE_BYTES,
    progress: Callable[[int], None] | None = None,
) -> InputPlan:
    """Read the input once and cut it into blocks of at most `lines_per_block` lines (and about `max_block_bytes`).

    Args:
        filesystem, paths: the input files, as `storage.resolve_files` gives them.
        progress: called with the bytes read so far, every few MiB.

    Raises:
        InvalidInputError: a binary file (compressed, or not text at all); `param` is `input`.
    """
    ranges: list[LineRange] = []
    total_rows = total_bytes = 0
    for index, path in enumerate(paths):
        offset, line, start, start_line, rows = 0, 0, 0, 1, 0
        with filesystem.open_input_stream(path) as stream:
            chunks = _chunks(stream)
            first = next(chunks, b"")
            if b"\0" in first[:8192]:
                raise InvalidInputError(f"input {path}: a binary file, not JSONL text (decompress a compressed file first)", param="input")
            for raw, size in split_lines(_prepend(first, chunks), max_line_bytes):
                line += 1
                offset += size
                if not is_blank(raw):
                    rows += 1
                    total_rows += 1
                if rows and (rows >= lines_per_block or offset - start >= max_block_bytes):
                    ranges.append(LineRange(index, start, offset, start_line, rows))
                    start, start_line, rows = offset, line + 1, 0
                if progress is not None and offset // (8 * _CHUNK) != (offset - size) // (8 * _CHUNK):
                    progress(total_bytes + offset)
            if rows:
                ranges.append(LineRange(index, start, offset, start_line, rows))
        total_bytes += offset
    return InputPlan(filesystem, list(paths), ranges, total_rows, total_bytes)


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def read_range(filesystem: pafs.FileSystem, path: str, block: LineRange, max_line_bytes: int = MAX_LINE_BYTES) -> pa.Table:
    """The non-blank lines of one block, as a table of `SCHEMA`.

    Raises:
        RuntimeError: the file changed since `plan_input` read it (another count of lines in the range).
    """
    files, lines, texts, problems = [], [], [], []
    with filesystem.open_input_file(path) as f:
        f.seek(block.start)
        for number, (raw, _size) in enumerate(split_lines(_chunks(f, block.end - block.start), max_line_bytes), block.first_line):
            if is_blank(raw):
                continue
            text, problem = decode_line(raw, number, max_line_bytes)
            files.append(block.file)
            lines.append(number)
            texts.append(text)
            problems.append(problem)
    if len(lines) != block.rows:
        raise RuntimeError(f"{path} changed while the batch ran: bytes {block.start}..{block.end} hold {len(lines)} lines, not {block.rows}")
    return pa.table([files, lines, texts, problems], schema=SCHEMA)


def range_items(plan: InputPlan) -> list[dict[str, Any]]:
    """The plan's blocks as Ray Data items, one per block: what an actor reads and answers in one call (`read_range`)."""
    return [{"path": plan.paths[r.file], "file": r.file, "start": r.start, "end": r.end, "first_line": r.first_line, "rows": r.rows}
            for r in plan.ranges]
