"""Which files of create_phase's input folder are readable parquet shards, and why the others are not.

A folder cloned from a dataset hub without ``git lfs pull`` holds pointer files named ``*.parquet``;
a crawl leaves half-downloaded shards; a glob renames a README. Each is found here, before any work,
with a reason a person can act on.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

PARQUET_MAGIC = b"PAR1"
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"


def unreadable_reason(path: Path, image_column: str) -> str | None:
    """Why ``path`` is not a parquet shard create_phase can convert, or None when it is one."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(len(LFS_POINTER_PREFIX))
            handle.seek(max(0, size - 4))
            tail = handle.read(4)
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    if head.startswith(LFS_POINTER_PREFIX):
        return "git-lfs pointer: run git lfs pull"
    if size == 0:
        return "empty file"
    if not head.startswith(PARQUET_MAGIC):
        return "not a parquet file (does not start with PAR1)"
    if tail != PARQUET_MAGIC or size < 12:
        return f"truncated parquet file ({size:,} bytes, no footer): download it again"
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged footer
        return f"unreadable parquet footer ({type(err).__name__}: {str(err)[:200]})"
    if image_column not in names:
        return f"no column {image_column!r} (columns: {names}); pass --image_column"
    return None


def check_inputs(root: Path, shards: list[Path], image_column: str) -> dict[Path, str]:
    """``{relative path: reason}`` for every shard of ``root`` that cannot be converted."""
    problems = {}
    for rel in shards:
        reason = unreadable_reason(root / rel, image_column)
        if reason is not None:
            problems[rel] = reason
    return problems


def describe_problems(problems: dict[Path, str], limit: int = 5) -> str:
    """One line naming the unreadable files and their reasons (the first ``limit`` of them)."""
    shown = "; ".join(f"{rel.as_posix()} ({reason})" for rel, reason in list(problems.items())[:limit])
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} input file(s) are not readable parquet: {shown}{more}"
