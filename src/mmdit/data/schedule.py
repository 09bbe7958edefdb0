"""One global, seeded schedule of bucketed batches, computable at any step.

Design (all of it a pure function of the index, the options and ``seed``):

* Every bucket has a fixed global batch: ``num_model_ranks x per-rank batch``, where the per-rank
  batch is ``batch_size``, or with a ``token_budget`` ``clamp(token_budget // tokens, 1,
  max_batch_size)`` with ``tokens = (h / patch_pixels) * (w / patch_pixels) + text_tokens`` (the text
  counts: a wide, short bucket would otherwise get a batch whose text tokens alone exceed the image
  tokens of a square one). ``max_tokens`` caps ``per-rank batch x tokens`` in either mode. So every
  step costs about the same: per-rank tokens lie in ``(token_budget - tokens, token_budget]`` for every
  bucket unless ``max_batch_size`` caps it.
* Epoch ``e`` shuffles each bucket's rows with a permutation seeded by ``(seed, e, h, w)`` and cuts
  it into full global batches; the last partial batch of a bucket is left out of that epoch (a
  different remainder each epoch, so no row is left out for good).
* The epoch's batches are then put in an order shuffled by ``(seed, e)``. Each bucket therefore
  appears in proportion to its size (sampling weighted by bucket size), every step has a single
  bucket for all model ranks, and within an epoch no row repeats.
* Every epoch has the same number of steps, so ``step -> (epoch, position)`` is one division and
  ``batch_at(step)`` needs only that epoch's order (computed once, cached). A checkpoint keeps the
  global step as its cursor; resuming at any step, with any number of loader ranks, yields exactly
  the batches an uninterrupted run would have seen.
* Small buckets (fewer rows than one global batch): ``small_buckets="drop"`` leaves them out (they are
  listed in :attr:`BucketSchedule.dropped`); ``"merge"`` keeps them with one batch per epoch, their
  rows in a fresh order, repeated to fill the batch (sampling with replacement).

A step here is one micro-batch: one forward/backward on every model rank.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from mmdit.data.buckets import bucket_tokens
from mmdit.data.indices import BucketIndex

log = logging.getLogger(__name__)

SMALL_BUCKET_POLICIES = ("drop", "merge")


@dataclass(frozen=True)
class ScheduledBatch:
    """The samples of one global step: ``per_rank_ids[r]`` are the global sample ids for model rank r."""

    step: int
    epoch: int
    height: int
    width: int
    per_rank_ids: list[np.ndarray]

    @property
    def batch_size(self) -> int:
        """Per-model-rank batch size at this step."""
        return len(self.per_rank_ids[0])

    @property
    def sample_ids(self) -> np.ndarray:
        """All sample ids of the step, model rank 0 first."""
        return np.concatenate(self.per_rank_ids)


@dataclass(frozen=True)
class _Bucket:
    height: int
    width: int
    ids: np.ndarray  # global sample ids, sorted
    per_rank_batch: int
    batches_per_epoch: int
    small: bool


class BucketSchedule:
    """The global batch order over a :class:`BucketIndex`; see the module docstring."""

    def __init__(
        self,
        index: BucketIndex | dict[tuple[int, int], np.ndarray],
        num_model_ranks: int,
        batch_size: int,
        token_budget: int = 0,
        max_batch_size: int = 0,
        patch_pixels: int = 16,
        small_buckets: str = "drop",
        seed: int = 0,
        text_tokens: int = 0,
        max_tokens: int = 0,
    ) -> None:
        if num_model_ranks <= 0:
            raise ValueError(f"num_model_ranks={num_model_ranks} must be > 0")
        if batch_size <= 0 and token_budget <= 0:
            raise ValueError(f"batch_size={batch_size} must be > 0 (or set a token_budget)")
        if small_buckets not in SMALL_BUCKET_POLICIES:
            raise ValueError(f"small_buckets={small_buckets!r}; choose one of {list(SMALL_BUCKET_POLICIES)}")
        self.num_model_ranks = num_model_ranks
        self.seed = seed
        self.small_buckets = small_buckets
        self.token_budget = token_budget
        buckets_in = index.buckets if isinstance(index, BucketIndex) else index
        self.buckets: list[_Bucket] = []
        self.dropped: dict[tuple[int, int], int] = {}
        for (height, width), ids in sorted(buckets_in.items()):
            ids = np.sort(np.asarray(ids, dtype=np.int64))
            tokens = bucket_tokens(height, width, patch_pixels) + text_tokens
            if token_budget > 0:
                cap = max_batch_size if max_batch_size > 0 else token_budget
                per_rank = int(np.clip(token_budget // tokens, 1, cap))
            else:
                per_rank = batch_size
            if max_tokens > 0:
                if tokens > max_tokens:
                    raise ValueError(f"bucket {height}x{width} has {tokens} tokens per sample (text included), more "
                                     f"than data.max_tokens={max_tokens}; raise it or re-run create_phase with a "
                                     "smaller --max_resolution")
                per_rank = min(per_rank, max_tokens // tokens)
            global_batch = per_rank * num_model_ranks
            full = len(ids) // global_batch
            if len(ids) == 0 or (full == 0 and small_buckets == "drop"):
                self.dropped[(height, width)] = len(ids)
                continue
            self.buckets.append(_Bucket(height, width, ids, per_rank, max(full, 1), full == 0))
        if self.dropped:
            log.warning(
                "dropped %d small bucket(s) with fewer rows than one global batch (HxW: rows): %s",
                len(self.dropped), ", ".join(f"{h}x{w}: {n}" for (h, w), n in self.dropped.items()),
            )
        if not self.buckets:
            raise ValueError(
                f"no bucket has enough rows for one global batch ({num_model_ranks} model ranks x per-rank batch); "
                "lower data.batch_size / data.token_budget, or set data.small_buckets=merge"
            )
        self.steps_per_epoch = sum(b.batches_per_epoch for b in self.buckets)
        self._lock = threading.Lock()
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    # --- the schedule ------------------------------------------------------------------------------

    def epoch_at(self, step: int) -> int:
        """Epoch (0-based) that global ``step`` belongs to."""
        return step // self.steps_per_epoch

    def epoch_progress(self, step: int) -> float:
        """Fractional epochs completed before ``step`` (for logging)."""
        return step / self.steps_per_epoch

    def batch_at(self, step: int) -> ScheduledBatch:
        """The batch of global ``step``: a pure function of the step (and the constructor arguments)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        epoch, position = divmod(step, self.steps_per_epoch)
        bucket_of_step, batch_in_bucket = self._epoch_order(epoch)
        b = int(bucket_of_step[position])
        k = int(batch_in_bucket[position])
        bucket = self.buckets[b]
        global_batch = bucket.per_rank_batch * self.num_model_ranks
        perm = self._permutation(epoch, b)
        if bucket.small:
            ids = np.resize(perm, global_batch)  # repeats the permutation to fill the batch
        else:
            ids = perm[k * global_batch:(k + 1) * global_batch]
        per_rank = [ids[r * bucket.per_rank_batch:(r + 1) * bucket.per_rank_batch].copy()
                    for r in range(self.num_model_ranks)]
        return ScheduledBatch(step, epoch, bucket.height, bucket.width, per_rank)

    def iter_batches(self, start_step: int = 0, stop_step: int | None = None):
        """Yield ``batch_at(step)`` from ``start_step`` (the checkpoint cursor) up to ``stop_step``."""
        step = start_step
        while stop_step is None or step < stop_step:
            yield self.batch_at(step)
            step += 1

    def summary(self) -> dict:
        """Buckets, per-rank batch sizes and epoch length, for logs."""
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "num_model_ranks": self.num_model_ranks,
            "buckets": {
                f"{b.height}x{b.width}": {"rows": len(b.ids), "per_rank_batch": b.per_rank_batch,
                                          "batches_per_epoch": b.batches_per_epoch, "small": b.small}
                for b in self.buckets
            },
            "dropped": {f"{h}x{w}": n for (h, w), n in self.dropped.items()},
        }

    def per_rank_batch(self, height: int, width: int) -> int | None:
        """Per-model-rank batch of bucket ``height x width``, or None if this schedule dropped it."""
        for bucket in self.buckets:
            if (bucket.height, bucket.width) == (height, width):
                return bucket.per_rank_batch
        return None

    def remaining_in_epoch(self, step: int) -> tuple[int, dict[tuple[int, int], np.ndarray]]:
        """The epoch of ``step`` and, per bucket, its rows that the steps ``< step`` of that epoch did not
        train on, in the epoch's order (the epoch's left-out remainder included): what a new data layout
        continues with (:mod:`mmdit.data.segments`)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        bucket_of_step, _ = self._epoch_order(epoch)
        consumed = np.bincount(bucket_of_step[:position], minlength=len(self.buckets))
        remaining = {}
        for b, bucket in enumerate(self.buckets):
            perm = self._permutation(epoch, b)
            if bucket.small:
                rest = perm if consumed[b] == 0 else perm[:0]
            else:
                rest = perm[int(consumed[b]) * bucket.per_rank_batch * self.num_model_ranks:]
            remaining[(bucket.height, bucket.width)] = rest.copy()
        return epoch, remaining

    # --- cached per-epoch pieces -------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per position in the epoch: the bucket, and which of that bucket's batches it is."""
        with self._lock:
            cached = self._epoch_cache.get(epoch)
            if cached is not None:
                return cached
            counts = np.array([b.batches_per_epoch for b in self.buckets])
            bucket_of_step = np.repeat(np.arange(len(self.buckets), dtype=np.int32), counts)
            np.random.default_rng([self.seed, epoch]).shuffle(bucket_of_step)
            # k-th occurrence of each bucket -> its k-th batch
            order = np.argsort(bucket_of_step, kind="stable")
            batch_in_bucket = np.empty(len(order), dtype=np.int64)
            batch_in_bucket[order] = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
            if len(self._epoch_cache) >= 2:
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[epoch] = (bucket_of_step, batch_in_bucket)
            return bucket_of_step, batch_in_bucket

    def _permutation(self, epoch: int, b: int) -> np.ndarray:
        """Bucket ``b``'s rows in epoch ``epoch``'s order."""
        key = (epoch, b)
        with self._lock:
            perm = self._perm_cache.get(key)
            if perm is None:
                bucket = self.buckets[b]
                rng = np.random.default_rng([self.seed, epoch, bucket.height, bucket.width])
                perm = bucket.ids[rng.permutation(len(bucket.ids))]
                stale = [k for k in self._perm_cache if k[0] < epoch - 1 or k[0] > epoch + 1]
                for k in stale:
                    del self._perm_cache[k]
                self._perm_cache[key] = perm
            return perm
