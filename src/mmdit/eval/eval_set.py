"""The held-out eval set: rows of its own parquet folder + bucket index, cut into fixed chunks.

A chunk is up to ``eval.batch_size`` rows of one bucket, taken in sample-id order; chunk c belongs to model
index c mod num_model_ranks. Every chunk is computed the same way (same rows, same batch, same seeds)
whatever the number of ranks, and results are summed in chunk order, so the numbers do not depend on how
the work was split. Rows are read with the training data classes (``BucketIndex``, ``RowReader``) and
always with the first caption column, no flips.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data.indices import BucketIndex
from ..data.rows import RowReader

log = logging.getLogger(__name__)
INDEX_NAME = "bucket_indices.npz"


@dataclass
class Chunk:
    """Rows ``ids`` of bucket ``height`` x ``width`` (pixels); ``number`` is its place in the eval set."""

    number: int
    ids: np.ndarray
    height: int
    width: int


def index_path(cfg: Config) -> Path:
    """``eval.index``, or ``<eval.parquet_folder>/bucket_indices.npz``."""
    if not cfg.eval.parquet_folder:
        raise ConfigError("eval.parquet_folder is empty; set it to a held-out parquet folder (never trained on)")
    return Path(cfg.eval.index) if cfg.eval.index else Path(cfg.eval.parquet_folder) / INDEX_NAME


def make_chunks(index: BucketIndex, num_rows: int, batch_size: int) -> list[Chunk]:
    """The first ``num_rows`` sample ids (0 = all), grouped by bucket (in bucket order), cut into chunks."""
    n = len(index) if num_rows <= 0 else min(num_rows, len(index))
    chunks: list[Chunk] = []
    for (height, width), ids in index.buckets.items():
        ids = np.sort(ids[ids < n])
        for start in range(0, len(ids), batch_size):
            chunks.append(Chunk(len(chunks), ids[start:start + batch_size], height, width))
    return chunks


class EvalSet:
    """Index and reader of the eval set; :meth:`read` gives the images and captions of a chunk."""

    def __init__(self, cfg: Config):
        path = index_path(cfg)
        if not path.is_file():
            raise FileNotFoundError(
                f"eval set index {path} not found; build it with python src/create_indices.py "
                f"--data_parquet_folder {cfg.eval.parquet_folder} --bucket_indices_path {path}"
            )
        self.cfg, self.path = cfg, path
        self.index = BucketIndex.load(path, cfg.eval.parquet_folder)
        data = dataclasses.replace(cfg.data, first_caption_prob=1.0, random_flip=False)
        self.reader = RowReader.from_config(self.index, data)

    def chunks(self, num_rows: int) -> list[Chunk]:
        return make_chunks(self.index, num_rows, self.cfg.eval.batch_size)

    def read(self, chunk: Chunk) -> tuple[np.ndarray, torch.Tensor, list[str]]:
        """(ids kept, uint8 images [B, 3, H, W], captions) of a chunk; corrupt rows are left out (logged)."""
        samples = self.reader.read(chunk.ids, np.random.default_rng(0))
        kept = [s for s in samples if s is not None]
        if len(kept) < len(samples):
            log.warning("eval set: %d corrupt rows left out of chunk %d", len(samples) - len(kept), chunk.number)
        if not kept:
            return np.zeros(0, np.int64), torch.zeros(0, 3, chunk.height, chunk.width, dtype=torch.uint8), []
        images = torch.from_numpy(np.stack([s.image for s in kept])).permute(0, 3, 1, 2).contiguous()
        return np.array([s.sample_id for s in kept], np.int64), images, [s.caption for s in kept]


def mine(chunks: list[Chunk], model_index: int, num_model_ranks: int) -> list[Chunk]:
    """The chunks this model rank computes."""
    return [c for c in chunks if c.number % num_model_ranks == model_index]


def gather_by_chunk(local: dict[int, object], group, num_model_ranks: int) -> dict[int, object]:
    """Every rank's ``{chunk number: result}`` merged on every model rank (all_gather_object)."""
    if num_model_ranks <= 1:
        return dict(local)
    parts: list = [None] * num_model_ranks
    torch.distributed.all_gather_object(parts, local, group=group)
    merged: dict[int, object] = {}
    for part in parts:
        merged.update(part)
    return merged
