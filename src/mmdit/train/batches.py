"""Turning scheduled sample ids into encoded batches, on a loader rank or in a model rank's background thread.

Everything random here (caption choice, flips, VAE posterior samples, replacements for corrupt images) is
seeded by (data seed, step, model index), so a batch is the same whichever rank builds it and after a resume.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config
from ..data.indices import BucketIndex
from ..data.rows import RowReader
from ..data.schedule import BucketSchedule
from ..encoders import TextEncoders, make_codec
from ..encoders.cache import CaptionCache
from .topology import Topology
from .transport import Batch, recv_batch, send_batch

log = logging.getLogger(__name__)
MAX_REPLACEMENT_TRIES = 16


def build_schedule(cfg: Config, num_model_ranks: int) -> tuple[BucketIndex, BucketSchedule]:
    index = BucketIndex.load(cfg.data.bucket_indices_path, cfg.data.parquet_folder)
    schedule = BucketSchedule(
        index, num_model_ranks=num_model_ranks, batch_size=cfg.data.batch_size, token_budget=cfg.data.token_budget,
        max_batch_size=cfg.data.max_batch_size, patch_pixels=cfg.model.pixel_step,
        small_buckets=cfg.data.small_buckets, seed=cfg.data.seed,
    )
    return index, schedule


class BatchProducer:
    """Reads, decodes, tokenizes, text-encodes and VAE-encodes the micro-batch of (step, model index)."""

    def __init__(self, cfg: Config, schedule: BucketSchedule, index: BucketIndex, device: torch.device):
        self.cfg, self.schedule, self.index, self.device = cfg, schedule, index, device
        self._local = threading.local()  # a RowReader per worker thread (readers are not thread-safe)
        self.text = CaptionCache(TextEncoders.from_config(cfg.encoders, device).encode, cfg.encoders.caption_cache)
        self.codec = make_codec(cfg.encoders, device)
        self.corrupt_total = 0
        self._pool = ThreadPoolExecutor(max_workers=max(1, cfg.data.num_workers))

    @property
    def reader(self) -> RowReader:
        if not hasattr(self._local, "reader"):
            self._local.reader = RowReader.from_config(self.index, self.cfg.data)
        return self._local.reader

    def _rng(self, step: int, model_index: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.data.seed, step, model_index])

    def read(self, step: int, model_index: int) -> tuple[int, np.ndarray, list, int]:
        """Decoded samples of one micro-batch; corrupt rows replaced by other rows of the same bucket."""
        scheduled = self.schedule.batch_at(step)
        ids = scheduled.per_rank_ids[model_index].copy()
        rng = self._rng(step, model_index)
        samples = self.reader.read(ids, rng)
        corrupt = 0
        bucket_ids = self.index.buckets[(scheduled.height, scheduled.width)]
        for i, sample in enumerate(samples):
            tries = 0
            while sample is None:
                corrupt += 1
                tries += 1
                if tries > MAX_REPLACEMENT_TRIES:
                    raise RuntimeError(f"bucket {scheduled.height}x{scheduled.width}: {tries} corrupt rows in a "
                                       "row while replacing one; check the data with data/create_phase.py")
                ids[i] = int(rng.choice(bucket_ids))
                sample = self.reader.read(ids[i:i + 1], rng)[0]
            samples[i] = sample
        return model_index, ids, samples, corrupt

    def prefetch(self, step: int, model_index: int):
        """Start reading and decoding in a worker thread; pass the future to :meth:`encode`."""
        return self._pool.submit(self.read, step, model_index)

    @torch.no_grad()
    def encode(self, step: int, read_result) -> Batch:
        model_index, ids, samples, corrupt = read_result
        self.corrupt_total += corrupt
        images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)
        seed = int(np.random.SeedSequence([self.cfg.data.seed, step, model_index]).generate_state(1)[0])
        generator = torch.Generator(self.device).manual_seed(seed)
        latents = self.codec.encode(images.to(self.device), generator=generator)
        cond = self.text.encode([s.caption for s in samples])
        return Batch(step, torch.from_numpy(ids.astype(np.int64)), latents, cond, corrupt)

    def make(self, step: int, model_index: int) -> Batch:
        return self.encode(step, self.read(step, model_index))


def run_loader(producer: BatchProducer, topology: Topology, rank: int, group, start: int, stop: int,
               should_stop) -> dict:
    """A loader rank's life: build and send every micro-batch of its model ranks, in step order."""
    models = topology.loader_to_model[rank]
    order = [(step, m) for step in range(start, stop) for m in models]
    pending: dict[int, list] = {}
    futures = {}
    depth = 2 * len(models)
    busy = idle = 0.0
    for i, (step, m) in enumerate(order):
        for j in range(i, min(i + depth, len(order))):
            if order[j] not in futures:
                futures[order[j]] = producer.prefetch(order[j][0], topology.model_index(order[j][1]))
        t0 = time.perf_counter()
        batch = producer.encode(step, futures.pop((step, m)).result())
        t1 = time.perf_counter()
        for work in pending.pop(m, []):
            work.wait()
        t2 = time.perf_counter()
        pending[m] = send_batch(batch, m, group)
        busy += t1 - t0
        idle += t2 - t1
        if should_stop():
            break
    for works in pending.values():
        for work in works:
            work.wait()
    return {"corrupt": producer.corrupt_total, "encode_s": busy, "wait_for_model_s": idle}


class BatchSource:
    """A model rank's next batches, filled by a background thread; ``get`` measures the time spent waiting."""

    def __init__(self, fill, start: int, stop: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._fill, self.start, self.stop = fill, start, stop
        self.wait_s = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True, name="batch-source")
        self._thread.start()

    def _run(self) -> None:
        try:
            for step in range(self.start, self.stop):
                self._queue.put(self._fill(step))
        except BaseException as err:  # handed to the training thread, which raises it
            self._queue.put(err)

    def get(self, step: int) -> Batch:
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise RuntimeError(f"data for step {step} could not be produced: {item}") from item
        if item.step != step:
            raise RuntimeError(f"expected the batch of step {step}, got step {item.step}: loader out of step")
        return item


def remote_source(loader: int, group, start: int, stop: int) -> BatchSource:
    """Batches streamed from a loader rank (the receive of step k+1 runs while step k computes)."""
    return BatchSource(lambda step: recv_batch(loader, group), start, stop)


def local_source(producer: BatchProducer, model_index: int, start: int, stop: int) -> BatchSource:
    """No loader ranks: this model rank builds its own batches in the background."""
    return BatchSource(lambda step: producer.make(step, model_index), start, stop)


def agree_start_step(step: int, topology: Topology, group) -> int:
    """Loader ranks learn the resume cursor from the first model rank."""
    if group is None:
        return step
    t = torch.tensor([step], dtype=torch.int64)
    dist.broadcast(t, src=topology.model_ranks[0], group=group)
    return int(t)
