"""create_indices: equals a brute-force scan, reads only metadata columns, detects a changed shard set."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmdit.data import indices
from mmdit.data.indices import BucketIndex, build_index, create_indices

SIDES = [16, 32, 48]


def _write_shard(path, first_id, rows, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "id": pa.array(np.arange(first_id, first_id + rows), pa.int64()),
        "image": pa.array([b"x" * 8] * rows, pa.binary()),
        "bucket_height": pa.array(rng.choice(SIDES, rows), pa.int32()),
        "bucket_width": pa.array(rng.choice(SIDES, rows), pa.int32()),
    })
    pq.write_table(table, path, row_group_size=7)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    next_id = 0
    for name, rows in [("b.parquet", 23), ("a.parquet", 40), ("sub/c.parquet", 1), ("sub/d.parquet", 0),
                       ("e.parquet", 31)]:
        _write_shard(root / name, next_id, rows, rng)
        next_id += rows
    (root / "notes.json").write_text("{}")  # not a shard
    return root


def _brute_force(root):
    file_id, row, heights, widths, ids, paths = [], [], [], [], [], []
    for f, path in enumerate(sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))):
        paths.append(path)
        for r, record in enumerate(pq.read_table(root / path).to_pylist()):
            file_id.append(f)
            row.append(r)
            heights.append(record["bucket_height"])
            widths.append(record["bucket_width"])
            ids.append(record["id"])
    return paths, file_id, row, heights, widths, ids


@pytest.mark.parametrize("n_proc", [1, 3])
def test_index_equals_brute_force_scan(folder, tmp_path, n_proc):
    index = create_indices(folder, tmp_path / "idx.npz", n_proc=n_proc)
    paths, file_id, row, heights, widths, ids = _brute_force(folder)
    assert [f.path for f in index.files] == paths
    assert index.file_id.tolist() == file_id and index.row.tolist() == row
    assert index.bucket_height.tolist() == heights and index.bucket_width.tolist() == widths
    expected = {}
    for sample_id, bucket in enumerate(zip(heights, widths)):
        expected.setdefault(bucket, []).append(sample_id)
    assert {k: v.tolist() for k, v in index.buckets.items()} == expected
    assert index.bucket_counts() == {k: len(v) for k, v in expected.items()}
    for sample_id in [0, 22, 23, 62, 63, len(ids) - 1]:
        path, r = index.locate(sample_id)
        assert pq.read_table(path)["id"][r].as_py() == ids[sample_id]
        assert index.bucket_of(sample_id) == (heights[sample_id], widths[sample_id])

    loaded = BucketIndex.load(tmp_path / "idx.npz", folder)
    assert loaded.files == index.files
    for name in ("file_id", "row", "bucket_height", "bucket_width"):
        assert np.array_equal(getattr(loaded, name), getattr(index, name))
    # the archive holds plain arrays only
    with np.load(tmp_path / "idx.npz", allow_pickle=False) as archive:
        assert sorted(archive.files) == ["bucket_height", "bucket_width", "file_id", "meta", "row"]


def test_reads_only_bucket_columns(folder, monkeypatch):
    seen = []
    original = pq.ParquetFile.read

    def spy(self, columns=None, **kwargs):
        seen.append(columns)
        return original(self, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read", spy)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read_table must not be used"))
    build_index(folder, n_proc=1)
    assert seen and all(columns == ["bucket_height", "bucket_width"] for columns in seen)


def test_changed_shard_set_is_detected(folder, tmp_path):
    path = tmp_path / "idx.npy"  # any suffix works; it is an npz archive
    create_indices(folder, path)
    BucketIndex.load(path, folder, verify="footer")

    _write_shard(folder / "z_new.parquet", 1000, 5, np.random.default_rng(1))
    with pytest.raises(ValueError, match=r"1 added: z_new\.parquet.*create_indices"):
        BucketIndex.load(path, folder)
    (folder / "z_new.parquet").unlink()

    (folder / "sub" / "c.parquet").rename(tmp_path / "moved.parquet")
    with pytest.raises(ValueError, match=r"1 removed: sub/c\.parquet"):
        BucketIndex.load(path)
    (tmp_path / "moved.parquet").rename(folder / "sub" / "c.parquet")

    _write_shard(folder / "a.parquet", 23, 41, np.random.default_rng(2))  # one more row
    with pytest.raises(ValueError, match=r"1 changed: a\.parquet"):
        BucketIndex.load(path, folder)
    BucketIndex.load(path, folder, verify="none")  # explicitly unchecked


def _rewrite_same_size(path, value: bytes, keep_mtime: bool) -> None:
    """Write ``path`` again with other footer metadata of the same length (so the same size)."""
    before = path.stat()
    table = pq.read_table(path).replace_schema_metadata({b"note": value})
    pq.write_table(table, path, row_group_size=7)
    assert path.stat().st_size == before.st_size
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif path.stat().st_mtime_ns == before.st_mtime_ns:  # a file system with coarse timestamps
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def test_shard_rewritten_with_the_same_size_is_named(folder, tmp_path):
    shard = folder / "b.parquet"
    pq.write_table(pq.read_table(shard).replace_schema_metadata({b"note": b"first"}), shard, row_group_size=7)
    path = tmp_path / "idx.npz"
    create_indices(folder, path)
    _rewrite_same_size(folder / "b.parquet", b"again", keep_mtime=False)
    with pytest.raises(ValueError, match=r"1 changed: b\.parquet \(modified after indexing.*src/create_indices\.py"):
        BucketIndex.load(path, folder)
    create_indices(folder, path)
    # same size and the old mtime (a tool that restores times): only the footer hash sees it
    _rewrite_same_size(folder / "b.parquet", b"third", keep_mtime=True)
    BucketIndex.load(path, folder)  # stat cannot tell
    with pytest.raises(ValueError, match=r"1 changed: b\.parquet \(rewritten after indexing: footer hash"):
        BucketIndex.load(path, folder, verify="footer")


def test_copied_folder_passes_the_footer_check(folder, tmp_path):
    path = tmp_path / "idx.npz"
    create_indices(folder, path)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copyfile)  # new mtimes, same bytes
    for shard in copy.rglob("*.parquet"):
        os.utime(shard, ns=(0, shard.stat().st_mtime_ns + 5_000_000_000))
    with pytest.raises(ValueError, match="verify='footer'"):
        BucketIndex.load(path, copy)
    assert len(BucketIndex.load(path, copy, verify="footer")) == 95


def test_unbucketed_folder_is_refused(tmp_path):
    (tmp_path / "raw").mkdir()
    pq.write_table(pa.table({"image": [b"x"], "width": [3], "height": [4]}), tmp_path / "raw" / "a.parquet")
    with pytest.raises(ValueError, match="create_phase"):
        build_index(tmp_path / "raw")
    with pytest.raises(FileNotFoundError):
        build_index(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="create_indices"):
        BucketIndex.load(tmp_path / "missing.npz")


def test_describe_mentions_buckets(folder):
    text = indices.describe(build_index(folder))
    assert text.startswith("95 rows in 5 shards")
