"""The sample order across data-layout changes: one :class:`BucketSchedule` per segment of micro-steps.

A run trains on one schedule as long as its *data layout* (model ranks, per-rank batch, token budget,
small-bucket policy, data seed: ``SCHEDULE_KEYS``) stays the same. A resume that changes the layout
(``train.allow_layout_change=true``) starts a new segment at the recorded micro-step cursor. The new
segment first re-batches, under the new layout, the rows of the current epoch that the run had not yet
reached (the *transition*, in an order seeded by the new data seed and the epoch), then continues with
the new layout's own epochs from the next epoch on.

So across a layout change no row is trained twice within an epoch, and no row the run had not reached
is skipped, except fewer than one new global batch per bucket, which waits for the next epoch as every
epoch's remainder does. The segments are stored in ``trainer_state.json``, so later resumes rebuild the
same order, however many changes came before.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from mmdit.data.indices import BucketIndex
from mmdit.data.schedule import BucketSchedule, ScheduledBatch

# the keys of a layout that decide which samples each micro-step trains on
SCHEDULE_KEYS = ("model_ranks", "batch_size", "token_budget", "max_batch_size", "small_buckets", "data_seed",
                 "patch_pixels", "text_tokens", "max_tokens")
_TRANSITION_SALT = 0x5345474D  # "SEGM": keeps the transition's order apart from the epoch orders


def _schedule(index: BucketIndex | dict, layout: dict) -> BucketSchedule:
    return BucketSchedule(
        index, num_model_ranks=layout["model_ranks"], batch_size=layout["batch_size"],
        token_budget=layout["token_budget"], max_batch_size=layout["max_batch_size"],
        patch_pixels=layout["patch_pixels"], small_buckets=layout["small_buckets"], seed=layout["data_seed"],
        text_tokens=layout["text_tokens"], max_tokens=layout["max_tokens"],
    )


@dataclass
class _Part:
    """One segment: ``transition`` batches first, then ``schedule`` from epoch ``first_epoch`` on."""

    start: int
    schedule: BucketSchedule
    first_epoch: int = 0
    transition_epoch: int = 0
    transition: list[tuple[int, int, np.ndarray]] = field(default_factory=list)  # (h, w, global batch ids)
    deferred: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # rows left for the next epoch

    def _schedule_step(self, micro: int) -> int:
        return self.first_epoch * self.schedule.steps_per_epoch + micro - self.start - len(self.transition)

    def batch_at(self, micro: int) -> ScheduledBatch:
        k = micro - self.start
        if k < len(self.transition):
            height, width, ids = self.transition[k]
            n = self.schedule.num_model_ranks
            per_rank = len(ids) // n
            return ScheduledBatch(micro, self.transition_epoch, height, width,
                                  [ids[r * per_rank:(r + 1) * per_rank].copy() for r in range(n)])
        return replace(self.schedule.batch_at(self._schedule_step(micro)), step=micro)

    def remaining_at(self, micro: int) -> tuple[int, dict[tuple[int, int], np.ndarray]]:
        """The epoch at ``micro`` and, per bucket, the rows of it not trained on before ``micro``."""
        k = micro - self.start
        if k >= len(self.transition):
            return self.schedule.remaining_in_epoch(self._schedule_step(micro))
        rest: dict[tuple[int, int], list[np.ndarray]] = {}
        for height, width, ids in self.transition[k:]:
            rest.setdefault((height, width), []).append(ids)
        for bucket, ids in self.deferred.items():
            rest.setdefault(bucket, []).append(ids)
        return self.transition_epoch, {b: np.concatenate(v) for b, v in rest.items()}


def _rebatch(remaining: dict[tuple[int, int], np.ndarray], schedule: BucketSchedule, epoch: int, seed: int):
    """Cut each bucket's remaining rows into the new layout's global batches, in a seeded order."""
    batches, deferred = [], {}
    for (height, width), ids in sorted(remaining.items()):
        per_rank = schedule.per_rank_batch(height, width)
        if per_rank is None:  # the new layout drops this bucket
            deferred[(height, width)] = ids
            continue
        size = per_rank * schedule.num_model_ranks
        full = len(ids) // size
        batches += [(height, width, ids[j * size:(j + 1) * size]) for j in range(full)]
        deferred[(height, width)] = ids[full * size:]
    order = np.random.default_rng([seed, epoch, _TRANSITION_SALT]).permutation(len(batches))
    return [batches[i] for i in order], deferred


class SegmentedSchedule:
    """``batch_at(micro)`` over a list of segments ``[{"start": micro, "layout": {...}}, ...]``.

    The first segment starts at 0; with one segment this is exactly its :class:`BucketSchedule`.
    """

    def __init__(self, index: BucketIndex | dict, segments: list[dict]):
        if not segments or segments[0]["start"] != 0:
            raise ValueError(f"the first data segment must start at micro-step 0, got {segments[:1]}")
        self.segments = [dict(s) for s in segments]
        self.parts: list[_Part] = []
        for seg in segments:
            schedule = _schedule(index, seg["layout"])
            if not self.parts:
                self.parts.append(_Part(0, schedule))
                continue
            if seg["start"] < self.parts[-1].start:
                raise ValueError(f"data segments must start in order, got {[s['start'] for s in segments]}")
            epoch, remaining = self.parts[-1].remaining_at(seg["start"])
            transition, deferred = _rebatch(remaining, schedule, epoch, seg["layout"]["data_seed"])
            self.parts.append(_Part(seg["start"], schedule, epoch + 1, epoch, transition, deferred))

    @property
    def current(self) -> BucketSchedule:
        """The schedule of the last segment (for logs)."""
        return self.parts[-1].schedule

    def batch_at(self, micro: int) -> ScheduledBatch:
        for part in reversed(self.parts):
            if micro >= part.start:
                return part.batch_at(micro)
        raise ValueError(f"micro-step {micro} must be >= 0")
