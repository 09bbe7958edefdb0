"""Random access to bucketed rows: sample ids -> decoded RGB arrays and captions.

Reads are grouped by shard and by row group: each row group holding requested rows is read once per
call, and only the image and caption columns (plus any ``extra_columns``). A shard's footer (its
parquet metadata) is parsed once per process and run and shared by every reader (:data:`FOOTERS`), so
reopening a shard costs an ``open``, not a footer parse; open handles are kept in a per-reader LRU of
``open_files``. A row group is the smallest unit parquet can read, so create_phase writes small ones
(bench/reader.py measures the size).
Images go through the same :func:`mmdit.data.images.decode` as create_phase, so a shard written by an
older create_phase or another tool (EXIF-rotated, 16-bit, transparent, CMYK) still gives the picture a
viewer sees.
A :class:`RowReader` is not thread-safe: give each worker its own.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mmdit.data.images import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, ImagePolicy, SkipImage, decode, fit_to_bucket
from mmdit.data.indices import BucketIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardFooter:
    """A shard's parsed parquet metadata, the first row of each row group, and the file it was read from."""

    metadata: pq.FileMetaData
    starts: np.ndarray
    names: tuple[str, ...]
    stamp: tuple[int, int]  # (size, mtime_ns): a rewritten shard is parsed again

    @property
    def resident_bytes(self) -> int:
        """Memory the parsed footer holds, estimated: pyarrow's parsed metadata is ~7.7x the serialized
        footer (measured by bench/reader.py for create_phase's columns at 16-64 rows per group)."""
        return PARSED_PER_SERIALIZED * self.metadata.serialized_size


PARSED_PER_SERIALIZED = 8


def _stamp(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def parse_footer(path: Path) -> ShardFooter:
    """Read and parse one shard's footer (the cost that :class:`FooterCache` pays once)."""
    stamp = _stamp(path)
    metadata = pq.read_metadata(path)
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]]).astype(np.int64)
    return ShardFooter(metadata, starts, tuple(metadata.schema.to_arrow_schema().names), stamp)


class FooterCache:
    """Parsed footers by shard path, shared by threads; ``reads[path]`` counts the parses of each shard.

    Thread-safe: two workers asking for the same new shard wait for one parse. A shard whose size or
    mtime changed since it was parsed is parsed again (and counted), never read with a stale footer.
    ``max_bytes`` bounds the estimated memory (LRU; None = no bound): parsed footers are large (~2.9 MB
    per 10k rows at 32 rows per group), and a bound that is too small is warned about once.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Path, ShardFooter] = OrderedDict()
        self._parsing: dict[Path, threading.Lock] = {}
        self._lock = threading.Lock()
        self.reads: Counter = Counter()
        self.resident_bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def footer_reads(self) -> int:
        """Footer parses since the cache was made or cleared."""
        return sum(self.reads.values())

    def get(self, path: Path) -> tuple[ShardFooter, bool]:
        """The footer of ``path`` and whether this call parsed it."""
        path = Path(path)
        stamp = _stamp(path)
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None and entry.stamp == stamp:
                self._entries.move_to_end(path)
                return entry, False
            parsing = self._parsing.setdefault(path, threading.Lock())
        with parsing:
            with self._lock:
                entry = self._entries.get(path)
            if entry is not None and entry.stamp == stamp:
                return entry, False
            if entry is not None:
                log.warning("%s changed on disk during the run; parsing its footer again", path)
            parsed = parse_footer(path)
            with self._lock:
                old = self._entries.pop(path, None)
                self.resident_bytes += parsed.resident_bytes - (old.resident_bytes if old else 0)
                self._entries[path] = parsed
                self.reads[path] += 1
                self._evict()
            return parsed, True

    def _evict(self) -> None:
        while self.max_bytes is not None and self.resident_bytes > self.max_bytes and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self.resident_bytes -= dropped.resident_bytes
            if not self.evictions:
                log.warning("footer cache full at %.0f MB (%d shards): evicted footers are parsed again on "
                            "reopen; raise data.footer_cache_mb or write larger row groups",
                            self.max_bytes / 2**20, len(self._entries))
            self.evictions += 1

    def resize(self, max_bytes: int | None) -> None:
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._parsing.clear()
            self.reads.clear()
            self.resident_bytes = 0
            self.evictions = 0


FOOTERS = FooterCache()  # the process-wide cache every RowReader uses unless told otherwise


@dataclass
class Sample:
    """One decoded row: ``image`` is ``(height, width, 3)`` uint8 RGB at the bucket size."""

    sample_id: int
    image: np.ndarray
    caption: str
    caption_column: str
    flipped: bool = False
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]


class RowReader:
    """Read rows of a :class:`BucketIndex` by global sample id."""

    def __init__(
        self,
        index: BucketIndex,
        image_column: str = "image",
        caption_columns: tuple[str, ...] | list[str] = ("caption_long", "caption_short"),
        first_caption_prob: float = 0.8,
        random_flip: bool = False,
        extra_columns: tuple[str, ...] | list[str] = (),
        seed: int = 0,
        open_files: int = 64,
        background: tuple[int, int, int] = DEFAULT_BACKGROUND,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        footers: FooterCache | None = FOOTERS,
    ) -> None:
        """``open_files``: shard handles kept open (0 closes each after its read); ``footers``: the
        footer cache to share (None parses the footer on every open)."""
        if not caption_columns:
            raise ValueError("caption_columns is empty; name at least one caption column")
        if not 0.0 <= first_caption_prob <= 1.0:
            raise ValueError(f"first_caption_prob={first_caption_prob} must be in [0, 1]")
        if open_files < 0:
            raise ValueError(f"open_files={open_files} must be >= 0 (0 keeps no shard open between reads)")
        self.index = index
        self.image_column = image_column
        self.caption_columns = list(caption_columns)
        self.first_caption_prob = first_caption_prob
        self.random_flip = random_flip
        self.extra_columns = [c for c in extra_columns if c not in (image_column, *self.caption_columns)]
        self.rng = np.random.default_rng(seed)
        self.open_files = open_files
        self.footers = footers
        self.footer_reads = 0  # footer parses this reader caused (counted whether cached or not)
        self.row_group_reads = 0  # row groups read: one per (shard, row group) per fetch, however many rows
        self.corrupt_count = 0
        self.corrupt_ids: list[int] = []
        self.corrupt_reasons: Counter = Counter()  # SkipImage reason -> count
        # min_side=1: the bucket was decided when the shard was written; the reader only decodes
        self.policy = ImagePolicy(max_pixels=max_pixels, min_side=1, background=tuple(background))
        self._files: OrderedDict[int, tuple[pq.ParquetFile, np.ndarray]] = OrderedDict()
        self._checked: set[int] = set()  # file ids whose columns were checked

    @classmethod
    def from_config(cls, index: BucketIndex, data_cfg, extra_columns=()) -> RowReader:
        """Build from a :class:`mmdit.config.DataConfig`; bounds the process-wide :data:`FOOTERS`."""
        if data_cfg.footer_cache_mb > 0:
            FOOTERS.resize(int(data_cfg.footer_cache_mb * 2**20))
        return cls(index, data_cfg.image_column, data_cfg.caption_columns, data_cfg.first_caption_prob,
                   data_cfg.random_flip, extra_columns, data_cfg.seed, open_files=data_cfg.open_files,
                   background=tuple(data_cfg.image_background), max_pixels=data_cfg.max_image_pixels,
                   footers=FOOTERS if data_cfg.footer_cache_mb > 0 else None)

    @property
    def columns(self) -> list[str]:
        return [self.image_column, *self.caption_columns, *self.extra_columns]

    def _open(self, file_id: int) -> tuple[pq.ParquetFile, np.ndarray]:
        """A handle and the row-group start rows of one shard; the footer comes from the cache."""
        entry = self._files.get(file_id)
        if entry is not None:
            self._files.move_to_end(file_id)
            return entry
        path = self.index.file_path(file_id)
        if self.footers is not None:
            footer, parsed = self.footers.get(path)
        else:
            footer, parsed = parse_footer(path), True
        self.footer_reads += parsed
        if file_id not in self._checked:
            missing = [c for c in self.columns if c not in footer.names]
            if missing:
                raise ValueError(f"{path} has no column(s) {missing}; its columns are {list(footer.names)}. "
                                 "Fix data.image_column / data.caption_columns")
            self._checked.add(file_id)
        entry = (pq.ParquetFile(path, metadata=footer.metadata), footer.starts)  # metadata=: no footer read
        if self.open_files > 0:
            self._files[file_id] = entry
            if len(self._files) > self.open_files:
                self._files.popitem(last=False)[1][0].close()
        return entry

    def fetch(self, sample_ids) -> list[dict[str, Any]]:
        """Raw column values of ``sample_ids`` in order; each row group holding some of them is read once."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        file_ids, rows = self.index.locate_many(ids)
        results: list[dict[str, Any]] = [{}] * len(ids)
        columns = self.columns
        for file_id in np.unique(file_ids):
            handle, starts = self._open(int(file_id))
            positions = np.flatnonzero(file_ids == file_id)
            groups = np.searchsorted(starts, rows[positions], side="right") - 1
            wanted = np.unique(groups)  # sorted: the concatenated table holds them in this order
            sizes = np.diff(np.append(starts, handle.metadata.num_rows))[wanted]
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            local = offsets[np.searchsorted(wanted, groups)] + rows[positions] - starts[groups]
            table = handle.read_row_groups(wanted.tolist(), columns=columns, use_threads=False)
            self.row_group_reads += len(wanted)
            taken = table.take(local)
            values = {name: taken.column(name).to_pylist() for name in columns}
            for i, pos in enumerate(positions):
                results[pos] = {name: values[name][i] for name in columns}
            if self.open_files == 0:
                handle.close()
        return results

    def choose_caption(self, values: dict[str, Any], u: float) -> tuple[str, str]:
        """Column picked by ``u``: the first with probability first_caption_prob, else one of the rest."""
        n = len(self.caption_columns)
        p = self.first_caption_prob
        if n == 1 or u < p:
            choice = 0
        else:
            choice = 1 + min(n - 2, int((u - p) / (1 - p) * (n - 1)))
        order = [choice] + [i for i in range(n) if i != choice]
        for i in order:  # an empty caption falls back to the next non-empty one
            text = values.get(self.caption_columns[i])
            if text:
                return str(text), self.caption_columns[i]
        return "", self.caption_columns[choice]

    def read(self, sample_ids, rng: np.random.Generator | None = None) -> list[Sample | None]:
        """Decode ``sample_ids`` in order; a corrupt image gives ``None`` (counted, logged), never an error.

        ``rng`` draws the caption choice and flip of each sample in the order given (default: the
        reader's own generator, seeded at construction).
        """
        rng = rng if rng is not None else self.rng
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        draws = rng.random((len(ids), 2))  # two draws per sample, whatever happens to it
        rows = self.fetch(ids)
        return [self._make_sample(int(i), values, d) for i, values, d in zip(ids, rows, draws)]

    def _make_sample(self, sample_id: int, values: dict[str, Any], draws: np.ndarray) -> Sample | None:
        height, width = self.index.bucket_of(sample_id)
        try:
            decoded = decode(values[self.image_column], self.policy, bucket=lambda w, h: (height, width))
        except SkipImage as skip:
            self.corrupt_count += 1
            self.corrupt_ids.append(sample_id)
            self.corrupt_reasons[skip.reason] += 1
            path, row = self.index.locate(sample_id)
            log.warning("corrupt image at sample id %d (%s row %d): %s", sample_id, path, row, skip)
            return None
        array = np.array(fit_to_bucket(decoded.image, height, width), dtype=np.uint8)  # writable copy
        flipped = bool(self.random_flip and draws[1] < 0.5)
        if flipped:
            array = np.ascontiguousarray(array[:, ::-1])
        caption, column = self.choose_caption(values, float(draws[0]))
        extras = {name: values[name] for name in self.extra_columns}
        return Sample(sample_id, array, caption, column, flipped, extras)

    def close(self) -> None:
        for handle, _ in self._files.values():
            handle.close()
        self._files.clear()
