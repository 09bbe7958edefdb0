"""create_indices: the bucket -> rows index of a folder of bucketed parquet shards.

Only the ``bucket_height`` and ``bucket_width`` columns are read (never the image bytes), in parallel
over files. The index is one ``.npz`` file (no pickle) with, per row, ``file_id``, ``row`` (row in its
file), ``bucket_height``, ``bucket_width``, and a JSON record of the shards (relative path, size in
bytes, mtime, row count, SHA-256 of the parquet footer) so that :meth:`BucketIndex.load` can tell when
the data changed under it: by size and mtime (``stat``, free), or by size and footer hash (``footer``,
one small read per shard; survives a copy that does not keep mtimes, and catches a shard rewritten
with the same size and mtime, since the footer holds every row group's offsets and create_phase's
statistics).

A *global sample id* is a row's position in this flat index: files in sorted path order, rows in file
order. Sample ids are what the schedule hands out and what a checkpointed cursor refers to.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mmdit.data.phase import list_shards

INDEX_VERSION = 2  # 2 added footer_sha256; version 1 indices still load (stat checks only)
READABLE_VERSIONS = (1, 2)
VERIFY_MODES = ("stat", "footer", "none")
BUCKET_COLUMNS = ("bucket_height", "bucket_width")


@dataclass(frozen=True)
class ShardInfo:
    """Identity of one parquet shard when the index was built."""

    path: str  # relative to the parquet folder, '/'-separated
    size: int  # bytes
    mtime_ns: int
    num_rows: int
    footer_sha256: str = ""  # empty in version-1 indices


def footer_sha256(path: Path) -> str:
    """SHA-256 of a parquet file's footer (its metadata block and the 8 bytes after it)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size < 12:
            raise ValueError(f"{path} is {size} bytes, too short for parquet")
        handle.seek(size - 8)
        tail = handle.read(8)
        (length,) = struct.unpack("<i", tail[:4])
        if tail[4:] != b"PAR1" or not 0 < length <= size - 12:
            raise ValueError(f"{path} has no parquet footer; is it a complete parquet file?")
        handle.seek(size - 8 - length)
        return hashlib.sha256(handle.read(length) + tail).hexdigest()


def _scan_shard(root: Path, rel: Path) -> tuple[ShardInfo, np.ndarray, np.ndarray]:
    """Read only the bucket columns of one shard."""
    path = root / rel
    stat = path.stat()
    source = pq.ParquetFile(path)
    missing = [c for c in BUCKET_COLUMNS if c not in source.schema_arrow.names]
    if missing:
        raise ValueError(
            f"{path} has no {missing} column(s); it is not bucketed: run data/create_phase.py on the raw "
            "shards and index its output folder"
        )
    table = source.read(columns=list(BUCKET_COLUMNS), use_threads=False)
    heights = table.column(0).to_numpy().astype(np.int32, copy=False)
    widths = table.column(1).to_numpy().astype(np.int32, copy=False)
    info = ShardInfo(rel.as_posix(), stat.st_size, stat.st_mtime_ns, table.num_rows, footer_sha256(path))
    return info, heights, widths


class BucketIndex:
    """Bucket -> global sample ids, and sample id -> (file, row), for one parquet folder."""

    def __init__(
        self,
        parquet_folder: str | Path,
        files: list[ShardInfo],
        file_id: np.ndarray,
        row: np.ndarray,
        bucket_height: np.ndarray,
        bucket_width: np.ndarray,
    ) -> None:
        n = len(file_id)
        if not (len(row) == len(bucket_height) == len(bucket_width) == n):
            raise ValueError("file_id, row, bucket_height and bucket_width must have the same length")
        self.parquet_folder = Path(parquet_folder)
        self.files = list(files)
        self.file_id = np.asarray(file_id, dtype=np.int32)
        self.row = np.asarray(row, dtype=np.int32)
        self.bucket_height = np.asarray(bucket_height, dtype=np.int32)
        self.bucket_width = np.asarray(bucket_width, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.file_id)

    @cached_property
    def buckets(self) -> dict[tuple[int, int], np.ndarray]:
        """``(height, width) -> sorted global sample ids`` for every bucket, in (height, width) order."""
        key = self.bucket_height.astype(np.int64) << 32 | self.bucket_width.astype(np.int64)
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]]) if len(key) else np.array([], int)
        ends = np.r_[starts[1:], len(key)]
        return {
            (int(sorted_key[s] >> 32), int(sorted_key[s] & 0xFFFFFFFF)): order[s:e].astype(np.int64)
            for s, e in zip(starts, ends)
        }

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """``(height, width) -> number of rows``."""
        return {bucket: len(ids) for bucket, ids in self.buckets.items()}

    def file_path(self, file_id: int) -> Path:
        return self.parquet_folder / self.files[int(file_id)].path

    def locate(self, sample_id: int) -> tuple[Path, int]:
        """The shard path and row number of a global sample id."""
        if not 0 <= sample_id < len(self):
            raise IndexError(f"sample id {sample_id} is outside the index (0..{len(self) - 1})")
        return self.file_path(self.file_id[sample_id]), int(self.row[sample_id])

    def locate_many(self, sample_ids) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised :meth:`locate`: ``(file_ids, rows)``."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        return self.file_id[ids], self.row[ids]

    def bucket_of(self, sample_id: int) -> tuple[int, int]:
        """``(height, width)`` of a sample's bucket."""
        return int(self.bucket_height[sample_id]), int(self.bucket_width[sample_id])

    # --- persistence -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the index atomically to ``path`` (an .npz archive, whatever the suffix)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "version": INDEX_VERSION,
            "parquet_folder": str(self.parquet_folder.resolve()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": [asdict(f) for f in self.files],
        }
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:  # a handle, so numpy does not append ".npz" to the name
            np.savez(
                handle,
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                file_id=self.file_id,
                row=self.row,
                bucket_height=self.bucket_height,
                bucket_width=self.bucket_width,
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, parquet_folder: str | Path | None = None, verify: str = "stat") -> BucketIndex:
        """Load an index written by :func:`create_indices` and check it still matches ``parquet_folder``.

        ``verify``: ``"stat"`` (file set, byte sizes and modification times, from ``stat`` only),
        ``"footer"`` (file set, sizes and a hash of every footer; use it on a copied folder whose
        mtimes changed) or ``"none"``. A mismatch raises ``ValueError`` naming the shards.
        ``parquet_folder`` defaults to the folder the index was built from.
        """
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r}; choose one of {list(VERIFY_MODES)}")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"bucket index {str(path)!r} not found; build it with "
                "python src/create_indices.py --data_parquet_folder <folder> --bucket_indices_path <path>"
            )
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(bytes(archive["meta"]).decode())
            arrays = {k: archive[k] for k in ("file_id", "row", "bucket_height", "bucket_width")}
        if meta.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"bucket index {path} has version {meta.get('version')}, expected one of "
                             f"{list(READABLE_VERSIONS)}; re-run src/create_indices.py")
        folder = Path(parquet_folder) if parquet_folder is not None else Path(meta["parquet_folder"])
        index = cls(folder, [ShardInfo(**f) for f in meta["files"]], **arrays)
        if verify != "none":
            index.verify(footer=verify == "footer", index_path=path)
        return index

    def _changed(self, info: ShardInfo, footer: bool) -> str | None:
        """How shard ``info`` differs from the file on disk now, or None."""
        path = self.parquet_folder / info.path
        stat = path.stat()
        if stat.st_size != info.size:
            return f"{info.path} (size {info.size} -> {stat.st_size} bytes)"
        if not footer:
            if stat.st_mtime_ns != info.mtime_ns:
                return (f"{info.path} (modified after indexing: mtime {info.mtime_ns} -> {stat.st_mtime_ns} ns; "
                        "if the folder was only copied, load with verify='footer')")
            return None
        if not info.footer_sha256:
            return f"{info.path} (the index predates footer hashes)"
        try:
            digest = footer_sha256(path)
        except (OSError, ValueError) as err:
            return f"{info.path} ({err})"
        return None if digest == info.footer_sha256 else f"{info.path} (rewritten after indexing: footer hash differs)"

    def verify(self, footer: bool = False, index_path: str | Path | None = None) -> None:
        """Raise ``ValueError`` if shards were added, removed or changed since the index was built.

        Changed means another size or mtime, or with ``footer`` another size or footer hash.
        """
        current = {p.as_posix() for p in list_shards(self.parquet_folder)}
        known = {f.path: f for f in self.files}
        added = sorted(current - known.keys())
        removed = sorted(known.keys() - current)
        changed = [c for rel in sorted(current & known.keys()) if (c := self._changed(known[rel], footer))]
        if not (added or removed or changed):
            return

        def names(items: list[str]) -> str:
            return ", ".join(items[:10]) + (f" and {len(items) - 10} more" if len(items) > 10 else "")

        problems = [f"{len(v)} {k}: {names(v)}" for k, v in
                    (("added", added), ("removed", removed), ("changed", changed)) if v]
        raise ValueError(
            f"bucket index {index_path or ''} does not match the parquet folder {str(self.parquet_folder)!r}: "
            + "; ".join(problems)
            + ". Re-run: python src/create_indices.py --data_parquet_folder "
            f"{self.parquet_folder} --bucket_indices_path {index_path or '<path>'}"
        )


def build_index(parquet_folder: str | Path, n_proc: int = 1) -> BucketIndex:
    """Scan the bucket columns of every shard under ``parquet_folder`` with ``n_proc`` threads.

    Threads rather than processes: pyarrow reads and decodes without holding the GIL, and nothing
    has to be pickled back.
    """
    root = Path(parquet_folder)
    shards = list_shards(root)
    if not shards:
        raise FileNotFoundError(f"no *.parquet files under {str(root)!r}")
    n_proc = n_proc or os.cpu_count() or 1
    if n_proc <= 1:
        results = [_scan_shard(root, rel) for rel in shards]
    else:
        with ThreadPoolExecutor(n_proc) as pool:
            results = list(pool.map(lambda rel: _scan_shard(root, rel), shards))
    files = [info for info, _, _ in results]
    counts = np.array([info.num_rows for info in files], dtype=np.int64)
    total = int(counts.sum())
    if total >= 2**31:
        raise ValueError(f"{total} rows do not fit the int32 index; split the folder")
    file_id = np.repeat(np.arange(len(files), dtype=np.int32), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    row = (np.arange(total, dtype=np.int64) - starts).astype(np.int32)
    heights = np.concatenate([h for _, h, _ in results]) if results else np.zeros(0, np.int32)
    widths = np.concatenate([w for _, _, w in results]) if results else np.zeros(0, np.int32)
    return BucketIndex(root, files, file_id, row, heights, widths)


def create_indices(parquet_folder: str | Path, bucket_indices_path: str | Path, n_proc: int = 1) -> BucketIndex:
    """Build the index of ``parquet_folder`` and save it to ``bucket_indices_path``."""
    index = build_index(parquet_folder, n_proc)
    index.save(bucket_indices_path)
    return index


def describe(index: BucketIndex) -> str:
    """A short human summary: rows, shards and the largest buckets."""
    counts = sorted(index.bucket_counts().items(), key=lambda kv: -kv[1])
    lines = [f"{len(index)} rows in {len(index.files)} shards, {len(counts)} buckets"]
    lines += [f"  {h}x{w} (HxW): {n}" for (h, w), n in counts[:20]]
    if len(counts) > 20:
        lines.append(f"  ... and {len(counts) - 20} smaller buckets")
    return "\n".join(lines)
