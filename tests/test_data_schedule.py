"""The global bucketed schedule: pure in the step, resumable from a cursor, independent of loader count."""

import numpy as np
import pytest

from mmdit.data.indices import BucketIndex, ShardInfo
from mmdit.data.schedule import BucketSchedule

# bucket (h, w) -> number of rows; ids are laid out bucket after bucket
SIZES = {(16, 16): 100, (16, 32): 37, (32, 16): 5, (32, 32): 24}


def _buckets(sizes=SIZES):
    out, start = {}, 0
    for bucket, n in sizes.items():
        out[bucket] = np.arange(start, start + n)
        start += n
    return out


def _all(schedule, start, stop):
    return [schedule.batch_at(s) for s in range(start, stop)]


def _same(a, b):
    return (a.step, a.epoch, a.height, a.width) == (b.step, b.epoch, b.height, b.width) and all(
        np.array_equal(x, y) for x, y in zip(a.per_rank_ids, b.per_rank_ids))


def test_one_epoch_covers_buckets_without_repeats():
    buckets = _buckets()
    schedule = BucketSchedule(buckets, num_model_ranks=2, batch_size=3, seed=1)  # global batch 6
    assert schedule.dropped == {(32, 16): 5}
    assert schedule.steps_per_epoch == 100 // 6 + 37 // 6 + 24 // 6 == 26
    seen, per_bucket = [], {}
    for batch in _all(schedule, 0, schedule.steps_per_epoch):
        assert batch.epoch == 0 and batch.batch_size == 3 and len(batch.per_rank_ids) == 2
        ids = batch.sample_ids
        assert set(ids) <= set(buckets[(batch.height, batch.width)].tolist())  # one bucket per step
        seen.extend(ids.tolist())
        per_bucket[(batch.height, batch.width)] = per_bucket.get((batch.height, batch.width), 0) + 1
    assert len(seen) == len(set(seen)) == 26 * 6  # without replacement within an epoch
    assert per_bucket == {(16, 16): 16, (16, 32): 6, (32, 32): 4}  # weighted by bucket size
    assert schedule.batch_at(schedule.steps_per_epoch).epoch == 1
    assert schedule.epoch_at(3 * schedule.steps_per_epoch + 2) == 3


def test_cursor_resume_equals_uninterrupted_run():
    kwargs = dict(num_model_ranks=3, batch_size=2, seed=7)
    full = _all(BucketSchedule(_buckets(), **kwargs), 0, 90)  # crosses several epochs
    for cursor in (0, 1, 17, 26, 40, 89):
        resumed = BucketSchedule(_buckets(), **kwargs)  # a fresh process after a restart
        tail = list(resumed.iter_batches(cursor, 90))
        assert all(_same(a, b) for a, b in zip(tail, full[cursor:])) and len(tail) == 90 - cursor
    backwards = BucketSchedule(_buckets(), **kwargs)
    assert all(_same(backwards.batch_at(s), full[s]) for s in reversed(range(90)))


@pytest.mark.parametrize("num_loaders", [1, 2, 3])
def test_any_number_of_loaders_gives_the_same_global_batches(num_loaders):
    num_model_ranks, steps = 6, 40
    reference = _all(BucketSchedule(_buckets(), num_model_ranks, 2, seed=3), 0, steps)
    loaders = [BucketSchedule(_buckets(), num_model_ranks, 2, seed=3) for _ in range(num_loaders)]
    for step in range(steps):
        assembled = [None] * num_model_ranks
        for rank in range(num_model_ranks):
            loader = loaders[rank % num_loaders]  # each loader serves some model ranks
            batch = loader.batch_at(step)
            assembled[rank] = batch.per_rank_ids[rank]
        assert all(np.array_equal(a, b) for a, b in zip(assembled, reference[step].per_rank_ids))


def test_seed_changes_the_order():
    a = _all(BucketSchedule(_buckets(), 1, 4, seed=0), 0, 10)
    b = _all(BucketSchedule(_buckets(), 1, 4, seed=1), 0, 10)
    assert not all(_same(x, y) for x, y in zip(a, b))


def test_token_budget_sets_per_bucket_batch():
    buckets = _buckets({(16, 16): 200, (16, 32): 200, (32, 32): 200})
    schedule = BucketSchedule(buckets, num_model_ranks=2, batch_size=1, token_budget=32, max_batch_size=6,
                              patch_pixels=8)
    per_rank = {(b.height, b.width): b.per_rank_batch for b in schedule.buckets}
    assert per_rank == {(16, 16): 6, (16, 32): 4, (32, 32): 2}  # 4, 8, 16 tokens; 32 // 4 capped at 6
    for batch in _all(schedule, 0, 30):
        assert batch.batch_size == per_rank[(batch.height, batch.width)]
    big = BucketSchedule(buckets, 1, 1, token_budget=8, patch_pixels=8)
    assert {(b.height, b.width): b.per_rank_batch for b in big.buckets}[(32, 32)] == 1  # never below 1


def _sd3_like_buckets() -> dict:
    """Every bucket create_phase makes at 256 px (16 px steps, aspect up to 1:4), 300 rows each."""
    from mmdit.data.buckets import bucket_size

    sizes = {bucket_size(w, h, step=16, max_resolution=256) for w in range(64, 1025, 16) for h in range(64, 1025, 16)
             if max(w, h) <= 4 * min(w, h)}
    return _buckets({s: 300 for s in sorted(sizes)})


def test_token_budget_counts_text_and_keeps_every_bucket_in_band():
    """sd3_256's rule: 71680 tokens per model rank = 140 x (256 image + 256 text) at 256x256."""
    from mmdit.data.buckets import bucket_tokens

    budget, text = 71680, 256
    schedule = BucketSchedule(_sd3_like_buckets(), num_model_ranks=1, batch_size=140, token_budget=budget,
                              max_batch_size=280, patch_pixels=16, text_tokens=text)
    assert len(schedule.buckets) > 20
    for b in schedule.buckets:
        per_sample = bucket_tokens(b.height, b.width, 16) + text
        step_tokens = b.per_rank_batch * per_sample
        # the stated band: within one sample of the budget, unless max_batch_size caps the batch
        assert budget - per_sample < step_tokens <= budget or b.per_rank_batch == 280, (b.height, b.width)
        assert step_tokens >= 0.9 * budget or b.per_rank_batch == 280
    per_rank = {(b.height, b.width): b.per_rank_batch for b in schedule.buckets}
    assert per_rank[(256, 256)] == 140
    assert per_rank[(128, 256)] == 186  # image tokens alone would give 280: 1.5x the tokens of a square step
    old = BucketSchedule(_sd3_like_buckets(), 1, 140, token_budget=35840, max_batch_size=280, patch_pixels=16)
    assert {(b.height, b.width): b.per_rank_batch for b in old.buckets}[(128, 256)] == 280


def test_max_tokens_caps_the_micro_batch_in_either_mode():
    buckets = _buckets({(16, 16): 200, (32, 32): 200})
    fixed = BucketSchedule(buckets, 1, batch_size=10, patch_pixels=8, text_tokens=4, max_tokens=64)
    per_rank = {(b.height, b.width): b.per_rank_batch for b in fixed.buckets}
    assert per_rank == {(16, 16): 8, (32, 32): 3}  # 64 // (4 + 4), 64 // (16 + 4)
    with pytest.raises(ValueError, match="data.max_tokens=16"):
        BucketSchedule(buckets, 1, batch_size=10, patch_pixels=8, text_tokens=4, max_tokens=16)


def test_small_bucket_merge_repeats_its_rows():
    buckets = _buckets()
    schedule = BucketSchedule(buckets, num_model_ranks=2, batch_size=3, small_buckets="merge", seed=2)
    assert schedule.dropped == {} and schedule.steps_per_epoch == 27
    small = [b for b in _all(schedule, 0, 27) if (b.height, b.width) == (32, 16)]
    assert len(small) == 1  # one batch per epoch
    ids = small[0].sample_ids
    assert len(ids) == 6 and set(ids.tolist()) == set(buckets[(32, 16)].tolist())


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(ValueError, match="small_buckets=merge"):
        BucketSchedule(_buckets({(16, 16): 3}), num_model_ranks=2, batch_size=4)
    with pytest.raises(ValueError, match="small_buckets"):
        BucketSchedule(_buckets(), 1, 1, small_buckets="pad")


def test_works_from_a_bucket_index():
    heights = np.array([16, 32, 16, 16, 32, 16])
    widths = np.array([16, 16, 16, 16, 16, 16])
    index = BucketIndex("/nowhere", [ShardInfo("a.parquet", 1, 1, 6)], np.zeros(6), np.arange(6), heights, widths)
    schedule = BucketSchedule(index, num_model_ranks=1, batch_size=2)
    assert {(b.height, b.width): b.ids.tolist() for b in schedule.buckets} == {(16, 16): [0, 2, 3, 5],
                                                                             (32, 16): [1, 4]}
    summary = schedule.summary()
    assert summary["steps_per_epoch"] == 3 and summary["buckets"]["16x16"]["batches_per_epoch"] == 2


# --- segments: the order across a data-layout change (mmdit.data.segments) ---------------------------

def _layout(**kw):
    base = dict(model_ranks=2, batch_size=3, token_budget=0, max_batch_size=0, small_buckets="drop", data_seed=1,
                patch_pixels=16, text_tokens=0, max_tokens=0)
    return {**base, **kw}


def test_one_segment_is_the_plain_schedule():
    from mmdit.data.segments import SegmentedSchedule

    plain = BucketSchedule(_buckets(), num_model_ranks=2, batch_size=3, seed=1)
    seg = SegmentedSchedule(_buckets(), [{"start": 0, "layout": _layout()}])
    assert all(_same(seg.batch_at(s), plain.batch_at(s)) for s in range(60))


@pytest.mark.parametrize("cursor", [0, 1, 11, 25, 26, 30])
@pytest.mark.parametrize("new", [dict(model_ranks=3), dict(model_ranks=1, batch_size=5), dict(data_seed=9)])
def test_layout_change_continues_the_epoch_without_repeats_or_skips(cursor, new):
    from mmdit.data.segments import SegmentedSchedule

    old, changed = _layout(), _layout(**new)
    seg = SegmentedSchedule(_buckets(), [{"start": 0, "layout": old}, {"start": cursor, "layout": changed}])
    plain = BucketSchedule(_buckets(), num_model_ranks=2, batch_size=3, seed=1)
    assert all(_same(seg.batch_at(s), plain.batch_at(s)) for s in range(cursor))  # the past is unchanged
    epoch = plain.epoch_at(cursor)
    epoch_start = epoch * plain.steps_per_epoch
    before = [plain.batch_at(s) for s in range(epoch_start, cursor)]
    new_global = changed["batch_size"] * changed["model_ranks"]
    after, s = [], cursor
    while seg.batch_at(s).epoch == epoch:
        after.append(seg.batch_at(s))
        s += 1
    for b in after:  # the new layout's batch, one bucket per step
        assert len(b.per_rank_ids) == changed["model_ranks"] and b.batch_size == changed["batch_size"]
        assert set(b.sample_ids) <= set(_buckets()[(b.height, b.width)].tolist())
    trained = [i for b in before + after for i in b.sample_ids.tolist()]
    assert len(trained) == len(set(trained))  # no row twice in the epoch
    for bucket, ids in _buckets().items():
        if bucket in plain.dropped:
            continue
        missed = set(ids.tolist()) - set(trained)
        assert len(missed) < new_global, (bucket, len(missed))  # only a remainder waits for the next epoch
    nxt = seg.batch_at(s)  # then the new layout's own epochs
    assert nxt.epoch == epoch + 1 and nxt.batch_size == changed["batch_size"]


def test_two_layout_changes_in_one_epoch_and_rebuilding_gives_the_same_order():
    from mmdit.data.segments import SegmentedSchedule

    segments = [{"start": 0, "layout": _layout()}, {"start": 5, "layout": _layout(model_ranks=3)},
                {"start": 8, "layout": _layout(model_ranks=1, batch_size=2)}]
    seg = SegmentedSchedule(_buckets(), segments)
    again = SegmentedSchedule(_buckets(), segments)  # a later resume rebuilds the same chain
    assert all(_same(seg.batch_at(s), again.batch_at(s)) for s in range(80))
    trained, s = [], 0
    while seg.batch_at(s).epoch == 0:
        trained += seg.batch_at(s).sample_ids.tolist()
        s += 1
    assert len(trained) == len(set(trained)) and len(trained) > 0.9 * (100 + 37 + 24)
