"""Turning scheduled sample ids into encoded batches, on a loader rank or in a model rank's background thread.

Everything random here (caption choice, flips, VAE posterior samples, replacements for corrupt images) is
seeded by (data seed, step, model index), so a batch is the same whichever rank builds it and after a resume.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time

import numpy as np
import torch

from ..config import Config
from ..data.indices import BucketIndex
from ..data.rows import RowReader
from ..data.segments import SegmentedSchedule
from ..encoders import TextEncoders, make_codec
from ..encoders.cache import CaptionCache
from ..encoders.vision import load_teacher, token_grid
from ..threads import start_thread, thread_pool
from .repa import repa_active
from .stopping import EndListener, StopRequest
from .topology import Topology
from .transport import Batch, recv_batch, send_batch, send_end

log = logging.getLogger(__name__)
MAX_REPLACEMENT_TRIES = 16


def build_schedule(cfg: Config, segments: list[dict]) -> tuple[BucketIndex, SegmentedSchedule]:
    """The index and the global sample order over the run's schedule segments (:mod:`mmdit.data.segments`).

    With ``data.source=cache`` the index is the cache's copy (checked against the config's manifest), so
    the cached run follows the same schedule as an online one over the same data.
    """
    if cfg.data.source == "cache":
        from ..cache.reader import load_cache_index

        index = load_cache_index(cfg)
    else:
        index = BucketIndex.load(cfg.data.bucket_indices_path, cfg.data.parquet_folder)
    return index, SegmentedSchedule(index, segments)


def make_producer(cfg: Config, schedule: SegmentedSchedule, index: BucketIndex, device: torch.device):
    """The producer ``data.source`` names: online encoding (:class:`BatchProducer`) or the precomputed cache
    (:class:`mmdit.cache.producer.CachedBatchProducer`); both build the same batch for a (step, model index)."""
    if cfg.data.source == "cache":
        from ..cache.producer import CachedBatchProducer

        return CachedBatchProducer(cfg, schedule, index, device)
    return BatchProducer(cfg, schedule, index, device)


class BatchProducer:
    """Reads, decodes, tokenizes, text-encodes and VAE-encodes the micro-batch of (step, model index); with
    ``train.repa`` the teacher encodes the same pixels into the targets of the image tokens."""

    def __init__(self, cfg: Config, schedule: SegmentedSchedule, index: BucketIndex, device: torch.device):
        self.cfg, self.schedule, self.index, self.device = cfg, schedule, index, device
        self._local = threading.local()  # a RowReader per worker thread (readers are not thread-safe)
        self.text = CaptionCache(TextEncoders.from_config(cfg.encoders, device).encode, cfg.encoders.caption_cache)
        self.codec = make_codec(cfg.encoders, device)
        self.teacher = load_teacher(cfg.train.repa, device, cfg.encoders.dtype) if cfg.train.repa.enabled else None
        self.corrupt_total = 0
        self._pool = thread_pool(max(1, cfg.data.num_workers), "batch-read")

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
        # text cut to the batch's longest caption (rounded up to 16): fewer bytes on the wire, fewer FLOPs
        cond = self.text.encode([s.caption for s in samples]).trimmed(16)
        repa = None
        if self.teacher is not None and repa_active(self.cfg.train.repa, step, self.cfg.train.accumulation_steps):
            repa = self.teacher.features(images, token_grid(self.cfg.model, *images.shape[2:]))
        return Batch(step, torch.from_numpy(ids.astype(np.int64)), latents, cond, corrupt, repa=repa)

    def make(self, step: int, model_index: int) -> Batch:
        return self.encode(step, self.read(step, model_index))


def run_loader(producer: BatchProducer, topology: Topology, rank: int, group, start: int, stop: int,
               stop_request: StopRequest) -> dict:
    """A loader rank's life: build and send every micro-batch of its model ranks, in step order, until the
    model ranks name the micro-step to end at (the stop protocol of :mod:`mmdit.train.stopping`)."""
    models = topology.loader_to_model[rank]
    listener = EndListener(models, group)
    order = [(step, m) for step in range(start, stop) for m in models]
    pending: dict[int, list] = {}
    futures = {}
    depth = 2 * len(models)
    busy = idle = 0.0
    recent: collections.deque = collections.deque(maxlen=16 * len(models))  # (busy, idle) of recent batches
    sent = 0
    for i, (step, m) in enumerate(order):
        if listener.end is not None and step >= listener.end:
            break
        for j in range(i, min(i + depth, len(order))):
            if order[j] not in futures and (listener.end is None or order[j][0] < listener.end):
                futures[order[j]] = producer.prefetch(order[j][0], topology.model_index(order[j][1]))
        t0 = time.perf_counter()
        batch = producer.encode(step, futures.pop((step, m)).result())
        t1 = time.perf_counter()
        _wait_sends(pending.pop(m, []), m)
        t2 = time.perf_counter()
        recent.append((t1 - t0, t2 - t1))
        recent_busy = sum(b for b, _ in recent) / max(1e-9, sum(b + i for b, i in recent))
        pending[m] = send_batch(batch, m, group, stop_requested=stop_request.requested, loader_busy=recent_busy)
        sent += 1
        busy += t1 - t0
        idle += t2 - t1
    for future in futures.values():
        future.cancel()
    for m, works in pending.items():
        _wait_sends(works, m)
    last = order[sent - 1][0] + 1 if sent else start
    for m in models:
        _wait_sends([send_end(last, m, group)], m)
    end = listener.wait()
    return {"corrupt": producer.corrupt_total, "encode_s": busy, "wait_for_model_s": idle, "end_micro": end,
            "sent": sent}


def _wait_sends(works: list, model_rank: int) -> None:
    try:
        for work in works:
            work.wait()
    except RuntimeError as err:
        raise RuntimeError(f"lost the connection to model rank {model_rank} (did it die?): {err}") from err


_END = object()  # the stream is over (a loader's end message, or the local producer's last step)


class BatchSource:
    """A model rank's next batches, filled by a background thread; ``get`` measures the time spent waiting.

    ``fill(step)`` returns the batch of ``step``, or None at the end of a loader's stream. A streamed source
    receives until its loader's end message (the loader decides where the stream ends, see
    :mod:`mmdit.train.stopping`); a local one builds the steps ``start..stop-1``. :meth:`close` drains the
    stream to its end and stops the thread.
    """

    def __init__(self, fill, start: int, stop: int, streamed: bool, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._fill, self.start, self.stop, self.streamed = fill, start, stop, streamed
        self._closing = threading.Event()
        self.wait_s = 0.0
        self._thread = start_thread(self._run, "batch-source")

    def _run(self) -> None:
        try:
            step = self.start
            while self.streamed or (step < self.stop and not self._closing.is_set()):
                item = self._fill(step)
                if item is None:
                    break
                self._queue.put(item)
                step += 1
        except BaseException as err:  # handed to the training thread, which raises it
            self._queue.put(err)
            return
        self._queue.put(_END)

    def get(self, step: int, hidden=None) -> Batch:
        """The batch of ``step``. The time spent waiting counts in ``wait_s`` unless ``hidden()`` says the
        device was busy with queued work all along (then nobody waited)."""
        t0 = time.perf_counter()
        item = self._queue.get()
        if hidden is None or not hidden():
            self.wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise RuntimeError(f"data for step {step} could not be produced: {item}") from item
        if item is _END:
            raise RuntimeError(f"the data stream ended before step {step}: loader out of step")
        if item.step != step:
            raise RuntimeError(f"expected the batch of step {step}, got step {item.step}: loader out of step")
        if item.ready is not None:  # copied on the receive thread's stream: order this stream after it
            stream = torch.cuda.current_stream(item.latents.device)
            stream.wait_event(item.ready)
            for t in item.device_tensors():
                t.record_stream(stream)  # the allocator must not reuse them while this stream reads
        return item

    def close(self) -> int:
        """Drain the stream to its end and stop the thread; the number of batches dropped on the way."""
        self._closing.set()
        dropped = 0
        while True:
            item = self._queue.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise RuntimeError(f"the data stream failed while closing: {item}") from item
            dropped += 1
        self._thread.join()
        return dropped


class DeviceCopy:
    """Copies received batches to a CUDA device on a side stream, in the receive thread: the training thread
    gets tensors already on the device, ordered after the copy by the batch's ``ready`` event."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def __call__(self, batch: Batch) -> Batch:
        with torch.cuda.stream(self.stream):
            out = batch.to(self.device)
            out.ready = torch.cuda.Event()
            out.ready.record(self.stream)
        return out


def remote_source(loader: int, group, start: int, stop: int, device: torch.device) -> BatchSource:
    """Batches streamed from a loader rank (the receive of step k+1 runs while step k computes). On CUDA
    they arrive in pinned buffers and are copied to ``device`` on a side stream; on the CPU they stay."""
    copy = DeviceCopy(device) if device.type == "cuda" else None

    def receive(step: int) -> Batch | None:
        try:
            batch = recv_batch(loader, group)
        except RuntimeError as err:
            raise RuntimeError(f"lost the data stream from loader rank {loader} (did it die?): {err}") from err
        return copy(batch) if copy is not None and batch is not None else batch

    return BatchSource(receive, start, stop, streamed=True)


def local_source(producer: BatchProducer, model_index: int, start: int, stop: int) -> BatchSource:
    """No loader ranks: this model rank builds its own batches in the background."""
    return BatchSource(lambda step: producer.make(step, model_index), start, stop, streamed=False)
