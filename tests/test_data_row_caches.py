"""RowReader caches: footers parsed once per run, open-file LRU, row groups read once per call."""

import io
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmdit.config import ConfigError, DataConfig
from mmdit.data.demo_dataset import make_demo_dataset
from mmdit.data.indices import build_index
from mmdit.data.phase import create_phase
from mmdit.data.rows import FOOTERS, FooterCache, RowReader

EXTRA = ("id", "shape", "colour")


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    make_demo_dataset(root / "raw", num_rows=48, rows_per_shard=12, seed=3, min_side=32, max_side=64)
    create_phase(root / "raw", root / "p", max_resolution=32, step=16, row_group_size=4, progress=False)
    index = build_index(root / "p")
    assert len(index.files) == 4 and len(index) == 48
    return index


def _batches(n, seed=0):
    """Random batches with repeats, several rows of one row group in scrambled order, and every id once."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(n)[:13], np.array([5, 4, 7, 5, 6, 4]), rng.integers(n, size=20), np.arange(n)[::-1]]


def _same(a, b):
    assert [s.sample_id for s in a] == [s.sample_id for s in b]
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and x.caption == y.caption and x.columns == y.columns


def test_rows_are_identical_with_and_without_caches(index):
    cached = RowReader(index, extra_columns=EXTRA, footers=FooterCache(), first_caption_prob=0.5)
    bare = RowReader(index, extra_columns=EXTRA, footers=None, open_files=0, first_caption_prob=0.5)
    thrash = RowReader(index, extra_columns=EXTRA, footers=FooterCache(), open_files=1, first_caption_prob=0.5)
    for batch in _batches(len(index)):
        raw = cached.fetch(batch)
        assert raw == bare.fetch(batch) == thrash.fetch(batch)
        assert [row["id"] for row in raw] == [pq.read_table(p).column("id")[r].as_py()
                                              for p, r in map(index.locate, batch.tolist())]
        reads = [r.read(batch, rng=np.random.default_rng(7)) for r in (cached, bare, thrash)]
        _same(reads[0], reads[1])
        _same(reads[0], reads[2])
    assert not bare._files and len(thrash._files) == 1


def test_each_footer_is_parsed_once_per_run_across_worker_threads(index):
    footers = FooterCache()
    readers = [RowReader(index, footers=footers, open_files=1) for _ in range(3)]  # open_files=1: many reopens
    errors = []

    def work(reader, seed):
        try:
            for batch in _batches(len(index), seed):
                reader.read(batch)
        except Exception as error:  # noqa: BLE001 - surfaced by the assert below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(r, i)) for i, r in enumerate(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    shards = {index.file_path(i) for i in range(len(index.files))}
    assert footers.reads == {path: 1 for path in shards}
    assert sum(r.footer_reads for r in readers) == footers.footer_reads == len(shards) == len(footers)
    # the same work without the cache parses a footer on every (re)open
    bare = RowReader(index, footers=None, open_files=1)
    for batch in _batches(len(index)):
        bare.read(batch)
    assert bare.footer_reads > 2 * len(shards)


def test_default_readers_share_the_process_cache(index):
    cfg = DataConfig(open_files=2)
    a, b = RowReader.from_config(index, cfg), RowReader.from_config(index, cfg)
    assert a.footers is FOOTERS and a.open_files == 2
    a.read(np.arange(len(index)))
    b.read(np.arange(len(index)))
    assert b.footer_reads == 0 and all(FOOTERS.reads[index.file_path(i)] == 1 for i in range(len(index.files)))
    assert FOOTERS.max_bytes == 4096 * 2**20
    assert RowReader.from_config(index, DataConfig(footer_cache_mb=0)).footers is None
    with pytest.raises(ConfigError, match="data.open_files=-1"):
        DataConfig(open_files=-1)
    with pytest.raises(ValueError, match="open_files=-1"):
        RowReader(index, open_files=-1)


def test_a_bounded_footer_cache_evicts_and_parses_again(index, caplog):
    one = FooterCache().get(index.file_path(0))[0].resident_bytes
    footers = FooterCache(max_bytes=int(2.5 * one))  # room for two of the four shards
    reader = RowReader(index, footers=footers, open_files=0)
    for _ in range(2):
        rows = reader.fetch(np.arange(len(index)))
    assert rows == RowReader(index, footers=None).fetch(np.arange(len(index)))
    assert len(footers) == 2 and footers.resident_bytes <= footers.max_bytes and footers.evictions == 6
    assert footers.footer_reads == 8 and "raise data.footer_cache_mb" in caplog.text
    footers.resize(None)
    reader.fetch(np.arange(len(index)))
    reader.fetch(np.arange(len(index)))
    assert footers.footer_reads == 8 + 2 and len(footers) == 4


def test_rows_of_one_row_group_are_read_once_per_call(index):
    reader = RowReader(index, footers=FooterCache())
    path, row = index.locate(0)
    group_ids = [i for i in range(len(index)) if index.locate(i)[0] == path and index.locate(i)[1] // 4 == row // 4]
    assert len(group_ids) == 4
    reader.fetch(group_ids[::-1] + group_ids)
    assert reader.row_group_reads == 1
    reader.fetch(np.arange(len(index)))
    assert reader.row_group_reads == 1 + 12  # 48 rows in groups of 4


class _CountingFile(io.RawIOBase):
    """A file that records the offset of every read (pyarrow reads through it as through any file)."""

    def __init__(self, path):
        self.file, self.offsets = open(path, "rb"), []

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.file.seek(offset, whence)

    def tell(self):
        return self.file.tell()

    def readinto(self, buffer):
        self.offsets.append(self.file.tell())
        return self.file.readinto(buffer)

    def close(self):
        self.file.close()
        super().close()


def test_a_handle_given_cached_metadata_reads_no_footer(tmp_path):
    """The guarantee the footer cache relies on: pyarrow then reads only the row group's pages."""
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"a": list(range(400)), "b": [b"x" * 50] * 400}), path, row_group_size=10)
    footer_start = os.path.getsize(path) - 8 - pq.read_metadata(path).serialized_size
    offsets = {}
    for name, metadata in (("parsed", None), ("cached", pq.read_metadata(path))):
        source = _CountingFile(path)
        pq.ParquetFile(pa.PythonFile(source, mode="r"), metadata=metadata).read_row_group(3, columns=["b"])
        offsets[name] = source.offsets
    assert any(o + 65536 > footer_start for o in offsets["parsed"])  # without: the tail is read
    assert offsets["cached"] and all(o < footer_start for o in offsets["cached"])


def test_a_shard_rewritten_during_the_run_is_parsed_again(tmp_path):
    def write(captions):
        pq.write_table(pa.table({
            "image": [b"x"] * len(captions), "caption_long": captions,
            "bucket_height": pa.array([16] * len(captions), pa.int32()),
            "bucket_width": pa.array([16] * len(captions), pa.int32()),
        }), tmp_path / "s.parquet", row_group_size=2)

    write(["a", "b", "c"])
    index = build_index(tmp_path)
    footers = FooterCache()
    reader = RowReader(index, caption_columns=["caption_long"], footers=footers, open_files=0)
    assert [r["caption_long"] for r in reader.fetch([2, 0])] == ["c", "a"]
    write(["dd", "ee", "ff"])
    stat = os.stat(tmp_path / "s.parquet")
    os.utime(tmp_path / "s.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert [r["caption_long"] for r in reader.fetch([2, 0])] == ["ff", "dd"]
    assert footers.footer_reads == 2
