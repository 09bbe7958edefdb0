"""Batches from a precomputed cache, equal to the online :class:`~mmdit.train.batches.BatchProducer`'s.

The same schedule gives the same ids; the same generator seeded by (data seed, micro-step, model index)
draws, in the same order, the caption column and flip of each sample and the replacements of corrupt
rows; the VAE posterior is sampled as ``mean + std * noise`` with the noise of the online encoder's
generator. So a run can switch between online and cached data at a resume and train on the same samples.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from ..conditioning import TextCondition
from ..config import Config
from ..data.indices import BucketIndex
from ..data.rows import RowReader
from ..data.segments import SegmentedSchedule
from ..encoders.vae import images_to_float
from ..threads import thread_pool
from ..train.repa import repa_active
from ..train.transport import Batch
from .reader import CacheReader, check_bucket

MAX_REPLACEMENT_TRIES = 16  # as the online producer


class CachedBatchProducer:
    """Reads the micro-batch of (step, model index) from the cache; the interface of ``BatchProducer``."""

    def __init__(self, cfg: Config, schedule: SegmentedSchedule, index: BucketIndex, device: torch.device):
        self.cfg, self.schedule, self.index, self.device = cfg, schedule, index, device
        self._local = threading.local()
        # the online reader's own caption rule (first column with first_caption_prob, fallback on empty)
        self._captions = RowReader.from_config(index, cfg.data)
        self.columns = list(cfg.data.caption_columns)
        latents = self.reader.manifest["latents"]
        self.pixels = latents["kind"] == "pixels"
        self.factor = 1 if self.pixels else int(latents["latent_factor"])
        self.shift = 0.0 if self.pixels else float(latents["shift_factor"])
        self.scale = 1.0 if self.pixels else float(latents["scaling_factor"])
        self.corrupt_total = 0
        self._pool = thread_pool(max(1, cfg.data.num_workers), "cache-read")

    @property
    def reader(self) -> CacheReader:
        if not hasattr(self._local, "reader"):
            self._local.reader = CacheReader(self.cfg, self.index)
        return self._local.reader

    def _column(self, sample_id: int, u: float) -> int:
        values = {c: "x" if p else "" for c, p in zip(self.columns, self.reader.present(sample_id))}
        return self.columns.index(self._captions.choose_caption(values, u)[1])

    def read(self, step: int, model_index: int) -> tuple[int, np.ndarray, list, int]:
        """The stored samples of one micro-batch; corrupt rows replaced with the online producer's draws."""
        scheduled = self.schedule.batch_at(step)
        ids = scheduled.per_rank_ids[model_index].copy()
        rng = np.random.default_rng([self.cfg.data.seed, step, model_index])
        draws = rng.random((len(ids), 2))  # RowReader.read: two draws per sample, up front
        bucket_ids = self.index.buckets[(scheduled.height, scheduled.width)]
        reader, samples, corrupt = self.reader, [], 0
        for i in range(len(ids)):
            u, tries = draws[i], 0
            while reader.is_corrupt(int(ids[i])):
                corrupt += 1
                tries += 1
                if tries > MAX_REPLACEMENT_TRIES:
                    raise RuntimeError(f"bucket {scheduled.height}x{scheduled.width}: {tries} corrupt rows in a row "
                                       "while replacing one; check the data with data/create_phase.py")
                ids[i] = int(rng.choice(bucket_ids))
                u = rng.random((1, 2))[0]  # the online reader reads the replacement alone: two more draws
            flipped = bool(self.cfg.data.random_flip and u[1] < 0.5)
            sample = reader.sample(int(ids[i]), self._column(int(ids[i]), float(u[0])), flipped)
            check_bucket(sample, scheduled.height, scheduled.width, self.factor)
            samples.append(sample)
        return model_index, ids, samples, corrupt

    def prefetch(self, step: int, model_index: int):
        """Start reading in a worker thread; pass the future to :meth:`encode`."""
        return self._pool.submit(self.read, step, model_index)

    @torch.no_grad()
    def encode(self, step: int, read_result) -> Batch:
        model_index, ids, samples, corrupt = read_result
        self.corrupt_total += corrupt
        if self.pixels:  # PixelCodec.encode: uint8 -> [-1, 1] float32
            images = torch.stack([s.image["image"] for s in samples]).permute(0, 3, 1, 2)
            latents = images_to_float(images.to(self.device)).to(torch.float32)
        else:
            mean = torch.stack([s.image["mean"] for s in samples]).to(self.device)
            z = mean
            if "std" in samples[0].image:  # the online draw: DiagonalGaussianDistribution.sample(generator)
                std = torch.stack([s.image["std"] for s in samples]).to(self.device)
                seed = int(np.random.SeedSequence([self.cfg.data.seed, step, model_index]).generate_state(1)[0])
                generator = torch.Generator(self.device).manual_seed(seed)
                z = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            latents = (z - self.shift) * self.scale
        repa = None  # the stored REPA targets, while the term is on (as the online producer runs its teacher)
        if repa_active(self.cfg.train.repa, step, self.cfg.train.accumulation_steps):
            repa = torch.stack([s.image["repa"] for s in samples]).to(self.device)
        return Batch(step, torch.from_numpy(ids.astype(np.int64)), latents, assemble_text(samples), corrupt,
                     repa=repa)

    def make(self, step: int, model_index: int) -> Batch:
        return self.encode(step, self.read(step, model_index))


def assemble_text(samples: list) -> TextCondition:
    """Stored (mask, real tokens) per sample -> a zero-padded batch, trimmed as the online producer trims it."""
    tokens, masks = [], []
    for i in range(len(samples[0].masks)):
        mask = torch.stack([s.masks[i] for s in samples])
        first = samples[0].tokens[i]
        padded = torch.zeros((len(samples), mask.shape[1], first.shape[1]), dtype=first.dtype)
        padded[mask] = torch.cat([s.tokens[i] for s in samples])
        tokens.append(padded)
        masks.append(mask)
    pooled = None if samples[0].pooled is None else torch.stack([s.pooled for s in samples])
    return TextCondition(tokens, masks, pooled).trimmed(16)
