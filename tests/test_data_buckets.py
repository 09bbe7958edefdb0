"""Bucket arithmetic: sides are multiples of the step, the aspect ratio is kept, caps hold."""

import itertools

import numpy as np
import pytest

from mmdit.data.buckets import bucket_size, bucket_tokens


def test_tall_image_stays_tall():
    # 100 wide x 300 high: height is the long side
    assert bucket_size(100, 300, step=16, max_resolution=256) == (256, 80)
    assert bucket_size(300, 100, step=16, max_resolution=256) == (80, 256)


def test_no_upscale_by_default():
    assert bucket_size(100, 300, step=16, max_resolution=512) == (288, 96)
    assert bucket_size(100, 300, step=16, max_resolution=512, allow_upscale=True) == (512, 176)
    assert bucket_size(5, 5, step=16, max_resolution=256) == (16, 16)  # never below one step


def test_max_area_caps_the_area():
    assert bucket_size(1000, 1000, step=16, max_resolution=1024, max_area=256 * 256) == (256, 256)
    h, w = bucket_size(2000, 1000, step=16, max_resolution=1024, max_area=256 * 256)
    assert h * w <= 256 * 256 and (h, w) == (176, 352)


@pytest.mark.parametrize("step,max_res,max_area,upscale", [
    (16, 256, None, False), (16, 512, None, True), (8, 64, None, False), (32, 1024, 512 * 512, False),
    (16, 256, 128 * 128, True),
])
def test_invariants_over_many_sizes(step, max_res, max_area, upscale):
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 3000, size=(400, 2))]
    sizes += list(itertools.product([1, 15, 16, 17, 100, 256, 257, 1000], repeat=2))
    for width, height in sizes:
        bh, bw = bucket_size(width, height, step, max_res, max_area, upscale)
        assert bh % step == 0 and bw % step == 0 and bh >= step and bw >= step
        assert max(bh, bw) <= max_res
        if max_area is not None:
            assert bh * bw <= max_area
        if not upscale:
            assert max(bh, bw) <= max(step, max(width, height))
        # orientation kept, and the short side is the nearest step to the exact aspect (unless at the floor)
        long_b, short_b = max(bh, bw), min(bh, bw)
        if width != height:
            assert (bh >= bw) == (height >= width) or bh == bw
        exact_short = long_b * min(width, height) / max(width, height)
        assert abs(short_b - exact_short) <= step / 2 + 1e-9 or short_b == step or short_b == long_b


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        bucket_size(0, 10)
    with pytest.raises(ValueError, match="max_area"):
        bucket_size(10, 10, step=16, max_area=100)


def test_bucket_tokens():
    assert bucket_tokens(256, 128, 16) == 16 * 8
    with pytest.raises(ValueError, match="patch_pixels"):
        bucket_tokens(40, 32, 16)
