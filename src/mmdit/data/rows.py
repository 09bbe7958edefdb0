"""Random access to bucketed rows: sample ids -> decoded RGB arrays and captions.

Reads are grouped by shard and by row group; only the row groups holding requested rows are read,
and only the image and caption columns (plus any ``extra_columns``). Open shard handles are kept in a
small LRU cache. A row group is the smallest unit parquet can read, so create_phase writes small ones.
Images go through the same :func:`mmdit.data.images.decode` as create_phase, so a shard written by an
older create_phase or another tool (EXIF-rotated, 16-bit, transparent, CMYK) still gives the picture a
viewer sees.
A :class:`RowReader` is not thread-safe: give each worker its own.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mmdit.data.images import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, ImagePolicy, SkipImage, decode, fit_to_bucket
from mmdit.data.indices import BucketIndex

log = logging.getLogger(__name__)


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
        max_open_files: int = 64,
        background: tuple[int, int, int] = DEFAULT_BACKGROUND,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if not caption_columns:
            raise ValueError("caption_columns is empty; name at least one caption column")
        if not 0.0 <= first_caption_prob <= 1.0:
            raise ValueError(f"first_caption_prob={first_caption_prob} must be in [0, 1]")
        self.index = index
        self.image_column = image_column
        self.caption_columns = list(caption_columns)
        self.first_caption_prob = first_caption_prob
        self.random_flip = random_flip
        self.extra_columns = [c for c in extra_columns if c not in (image_column, *self.caption_columns)]
        self.rng = np.random.default_rng(seed)
        self.max_open_files = max_open_files
        self.corrupt_count = 0
        self.corrupt_ids: list[int] = []
        self.corrupt_reasons: Counter = Counter()  # SkipImage reason -> count
        # min_side=1: the bucket was decided when the shard was written; the reader only decodes
        self.policy = ImagePolicy(max_pixels=max_pixels, min_side=1, background=tuple(background))
        self._files: OrderedDict[int, tuple[pq.ParquetFile, np.ndarray]] = OrderedDict()

    @classmethod
    def from_config(cls, index: BucketIndex, data_cfg, extra_columns=()) -> RowReader:
        """Build from a :class:`mmdit.config.DataConfig`."""
        return cls(index, data_cfg.image_column, data_cfg.caption_columns, data_cfg.first_caption_prob,
                   data_cfg.random_flip, extra_columns, data_cfg.seed, background=tuple(data_cfg.image_background),
                   max_pixels=data_cfg.max_image_pixels)

    def _open(self, file_id: int) -> tuple[pq.ParquetFile, np.ndarray]:
        """Cached handle and row-group start rows of one shard."""
        entry = self._files.get(file_id)
        if entry is not None:
            self._files.move_to_end(file_id)
            return entry
        path = self.index.file_path(file_id)
        handle = pq.ParquetFile(path)
        names = handle.schema_arrow.names
        missing = [c for c in (self.image_column, *self.caption_columns, *self.extra_columns) if c not in names]
        if missing:
            raise ValueError(f"{path} has no column(s) {missing}; its columns are {names}. "
                             "Fix data.image_column / data.caption_columns")
        sizes = [handle.metadata.row_group(i).num_rows for i in range(handle.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._files[file_id] = (handle, starts)
        if len(self._files) > self.max_open_files:
            old_handle, _ = self._files.popitem(last=False)[1]
            old_handle.close()
        return handle, starts

    def _choose_caption(self, values: dict[str, Any], u: float) -> tuple[str, str]:
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
        file_ids, rows = self.index.locate_many(ids)
        results: list[Sample | None] = [None] * len(ids)
        columns = [self.image_column, *self.caption_columns, *self.extra_columns]
        for file_id in np.unique(file_ids):
            handle, starts = self._open(int(file_id))
            positions = np.flatnonzero(file_ids == file_id)
            groups = np.searchsorted(starts, rows[positions], side="right") - 1
            for group in np.unique(groups):
                table = handle.read_row_group(int(group), columns=columns, use_threads=False)
                data = {name: table.column(name) for name in columns}
                for pos in positions[groups == group]:
                    local = int(rows[pos] - starts[group])
                    values = {name: data[name][local].as_py() for name in columns}
                    results[pos] = self._make_sample(int(ids[pos]), values, draws[pos])
        return results

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
        caption, column = self._choose_caption(values, float(draws[0]))
        extras = {name: values[name] for name in self.extra_columns}
        return Sample(sample_id, array, caption, column, flipped, extras)

    def close(self) -> None:
        for handle, _ in self._files.values():
            handle.close()
        self._files.clear()
