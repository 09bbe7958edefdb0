"""RowReader: random access by sample id, captions, flips, corrupt images."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from web_images import encoded, upright_mark

from mmdit.config import DataConfig
from mmdit.data.demo_dataset import make_demo_dataset
from mmdit.data.images import fit_to_bucket
from mmdit.data.indices import build_index
from mmdit.data.phase import create_phase
from mmdit.data.rows import RowReader


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    make_demo_dataset(root / "raw", num_rows=40, rows_per_shard=15, seed=5, min_side=32, max_side=64)
    create_phase(root / "raw", root / "p", max_resolution=32, step=16, row_group_size=4, progress=False)
    return build_index(root / "p")


def _reference(index, sample_id):
    path, row = index.locate(sample_id)
    return pq.read_table(path).slice(row, 1).to_pylist()[0]


def test_read_matches_the_shards_in_request_order(index):
    reader = RowReader(index, extra_columns=("id", "shape", "colour", "position"), first_caption_prob=1.0)
    ids = np.random.default_rng(0).permutation(len(index))[:17]  # spread over files and row groups
    samples = reader.read(ids)
    assert [s.sample_id for s in samples] == ids.tolist()
    for sample in samples:
        ref = _reference(index, sample.sample_id)
        expected = np.asarray(Image.open(io.BytesIO(ref["image"])).convert("RGB"))
        assert sample.image.dtype == np.uint8 and np.array_equal(sample.image, expected)
        assert (sample.height, sample.width) == index.bucket_of(sample.sample_id)
        assert sample.caption == ref["caption_long"] and sample.caption_column == "caption_long"
        assert sample.columns == {k: ref[k] for k in ("id", "shape", "colour", "position")}
        assert not sample.flipped
    assert reader.corrupt_count == 0


def test_caption_choice_follows_probability_and_rng(index):
    ids = np.arange(len(index))
    short = RowReader(index, first_caption_prob=0.0).read(ids)
    assert all(s.caption_column == "caption_short" for s in short)
    reader = RowReader(index, first_caption_prob=0.5)
    a = reader.read(ids, rng=np.random.default_rng(4))
    b = reader.read(ids, rng=np.random.default_rng(4))
    assert [s.caption for s in a] == [s.caption for s in b]
    assert {s.caption_column for s in a} == {"caption_long", "caption_short"}


def test_random_flip_mirrors_the_image(index):
    ids = np.arange(12)
    plain = RowReader(index).read(ids)
    flipped = RowReader(index, random_flip=True).read(ids, rng=np.random.default_rng(1))
    assert any(s.flipped for s in flipped) and not all(s.flipped for s in flipped)
    for p, f in zip(plain, flipped):
        assert np.array_equal(f.image, p.image[:, ::-1] if f.flipped else p.image)


def _png(width, height, colour):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_corrupt_image_gives_none_and_is_counted(tmp_path):
    images = [_png(32, 16, (255, 0, 0)), b"garbage", _png(30, 18, (0, 255, 0)), b""]
    pq.write_table(pa.table({
        "image": images,
        "caption_long": ["a", "b", "", "d"],
        "caption_short": ["A", "B", "C", "D"],
        "bucket_height": pa.array([16] * 4, pa.int32()),
        "bucket_width": pa.array([32] * 4, pa.int32()),
    }), tmp_path / "s.parquet", row_group_size=2)
    reader = RowReader(build_index(tmp_path), first_caption_prob=1.0)
    samples = reader.read([3, 2, 1, 0])
    assert samples[0] is None and samples[2] is None
    assert reader.corrupt_count == 2 and sorted(reader.corrupt_ids) == [1, 3]
    # a stored size off the bucket by rounding is resized to the bucket
    assert samples[1].image.shape == (16, 32, 3) and tuple(samples[1].image[8, 16]) == (0, 255, 0)
    assert samples[1].caption == "C"  # empty first caption falls back to the other column
    assert samples[3].caption == "a" and tuple(samples[3].image[0, 0]) == (255, 0, 0)


def test_missing_caption_column_is_a_clear_error(index):
    with pytest.raises(ValueError, match="caption_columns"):
        RowReader(index, caption_columns=["prompt"]).read([0])


def test_reader_normalises_shards_written_by_other_tools(tmp_path):
    """EXIF-rotated, 16-bit and transparent images in a bucketed shard train on the picture a viewer sees."""
    portrait = np.ascontiguousarray(np.rot90(upright_mark(), -1))  # 60 x 40 (HxW)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encoded(Image.fromarray(upright_mark()), "PNG", exif=exif.tobytes())  # viewer sees `portrait`
    grey16 = encoded(Image.fromarray(np.full((60, 40), 30000, np.uint16)), "PNG")
    clear = encoded(Image.new("RGBA", (40, 60), (0, 0, 0, 0)), "PNG")
    pq.write_table(pa.table({
        "image": [rotated, grey16, clear],
        "caption_long": ["a", "b", "c"],
        "bucket_height": pa.array([48] * 3, pa.int32()),
        "bucket_width": pa.array([32] * 3, pa.int32()),
    }), tmp_path / "s.parquet")
    index = build_index(tmp_path)
    samples = RowReader(index, caption_columns=["caption_long"], background=(0, 128, 0)).read([0, 1, 2])
    expected = np.asarray(fit_to_bucket(Image.fromarray(portrait), 48, 32)).astype(int)
    assert np.abs(samples[0].image.astype(int) - expected).mean() < 2
    assert np.all(samples[1].image == 117)
    assert np.all(samples[2].image == (0, 128, 0))
    reader = RowReader(index, caption_columns=["caption_long"], max_pixels=1000)
    assert reader.read([0]) == [None] and reader.corrupt_reasons == {"too_large": 1}


def test_reader_takes_its_policy_from_the_config(tmp_path):
    pq.write_table(pa.table({
        "image": [encoded(Image.new("LA", (32, 16), (0, 0)), "PNG")],
        "caption_long": ["a"], "caption_short": ["A"],
        "bucket_height": pa.array([16], pa.int32()), "bucket_width": pa.array([32], pa.int32()),
    }), tmp_path / "s.parquet")
    cfg = DataConfig(image_background=[10, 20, 30], max_image_pixels=10_000)
    assert np.all(RowReader.from_config(build_index(tmp_path), cfg).read([0])[0].image == (10, 20, 30))
