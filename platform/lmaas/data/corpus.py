"""The built-in corpus: this interpreter's own standard library sources, found at run time."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from lmaas.errors import InvalidInputError

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_dir() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(limit: int | None = None) -> list[Path]:
    """UTF-8 `.py` files of the standard library (tests and vendored packages left out), sorted.

    Args:
        limit: keep only the first `limit` files (None: all, about a thousand).

    Raises:
        InvalidInputError: no standard library sources are found (a stripped interpreter).
    """
    root = stdlib_dir()
    found: list[Path] = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(names):
            if name.endswith(".py"):
                found.append(Path(dirpath) / name)
    found.sort()
    out = []
    for path in found:
        if limit is not None and len(out) >= limit:
            break
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if data.strip() and b"\0" not in data:
            out.append(path)
    if not out:
        raise InvalidInputError(f"no standard library sources under {root}; name a corpus instead", param="sources")
    return out


def copy_stdlib(dest: str | os.PathLike[str], limit: int | None = None) -> list[Path]:
    """Copy the first `limit` standard library files into `dest` (keeping relative paths)."""
    root = stdlib_dir()
    dest = Path(dest)
    out = []
    for path in stdlib_files(limit):
        target = dest / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        out.append(target)
    return out


def parse_stdlib_source(source: str) -> int | None | bool:
    """`stdlib` -> None (all files), `stdlib:N` -> N; False for any other source."""
    if source == "stdlib":
        return None
    if source.startswith("stdlib:"):
        count = source.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise InvalidInputError(f"source {source!r}: use stdlib or stdlib:N with N >= 1", param="sources")
        return int(count)
    return False
