"""The emoji data set maker on a few real emoji: the npm package fetched once into the cache (skipped when npm or
the registry cannot be reached), raw shards with RGBA bytes and captions, held-out names, create_phase at 64 px."""

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmdit.data.emoji import EmojiSourceError, captions, fetch_package, make_emoji_dataset, tone_words


@pytest.fixture(scope="module")
def package():
    try:
        return fetch_package()
    except EmojiSourceError as err:
        pytest.skip(f"the emoji package could not be fetched: {err}")


def test_captions_spell_name_short_names_category_and_tone():
    entry = {"name": "RUNNER", "short_names": ["runner", "running"], "category": "People & Body",
             "subcategory": "person-activity"}
    assert captions(entry) == ("an emoji of runner, also running; person activity, people & body",
                               "an emoji of runner")
    assert captions(entry, tone_words("1F3FD"))[1] == "an emoji of runner, medium skin tone"
    assert tone_words("1F3FB-1F3FF") == "light and dark skin tones"
    assert captions({"name": None, "short_names": ["flag-us"], "category": "Flags", "subcategory": "country-flag"})[1] \
        == "an emoji of flag us"


def test_emoji_shards_keep_alpha_captions_and_hold_out_names(package, tmp_path):
    info = make_emoji_dataset(tmp_path / "raw", package, held_out=4, seed=0, limit=40, rows_per_shard=16)
    assert info["emoji"] == 40 and len(info["held_out"]) == 4 and info["images"]["held_out"] >= 4
    train = pq.read_table(tmp_path / "raw" / "train")
    held = pq.read_table(tmp_path / "raw" / "held_out")
    assert train.num_rows == info["images"]["train"] and len(list((tmp_path / "raw" / "train").glob("*.parquet"))) > 1
    for column in ("id", "image", "caption_long", "caption_short", "width", "height", "aspect_ratio", "name",
                   "category", "subcategory", "short_names", "skin_tone", "unified"):
        assert column in train.column_names
    ids = train.column("id").to_pylist() + held.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    image = Image.open(io.BytesIO(train.column("image")[0].as_py()))
    assert image.mode == "RGBA" and image.size == (64, 64)  # the file's own bytes: alpha kept
    assert np.asarray(image)[0, 0, 3] == 0  # a transparent corner
    assert set(held.column("name").to_pylist()) == set(info["held_out"])
    assert not set(held.column("caption_long").to_pylist()) & set(train.column("caption_long").to_pylist())
    assert not set(held.column("caption_short").to_pylist()) & set(train.column("caption_short").to_pylist())
    assert all(c.startswith("an emoji of ") for c in train.column("caption_short").to_pylist())

    from mmdit.data.phase import create_phase

    create_phase(tmp_path / "raw" / "train", tmp_path / "phase", max_resolution=64, n_proc=1, progress=False)
    phased = pq.ParquetDataset(sorted(str(p) for p in (tmp_path / "phase").glob("*.parquet"))).read()
    assert phased.num_rows == train.num_rows
    rgb = np.asarray(Image.open(io.BytesIO(phased.column("image")[0].as_py())))
    assert rgb.shape == (64, 64, 3) and (rgb[0, 0] == 255).all()  # alpha composited over white


def test_without_npm_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on it
    with pytest.raises(EmojiSourceError, match="install Node.js and npm"):
        fetch_package(tmp_path / "cache")
    assert os.environ["PATH"] == str(tmp_path)
