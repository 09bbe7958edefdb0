"""create_phase: bucketed output, orientation, corrupt rows, resume after an interruption."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmdit.data.demo_dataset import make_demo_dataset
from mmdit.data.phase import SUMMARY_NAME, create_phase

REPO = Path(__file__).resolve().parents[1]


def _read_all(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    make_demo_dataset(folder, num_rows=60, rows_per_shard=20, seed=3, corrupt_fraction=0.1, min_side=24, max_side=72)
    return folder


def test_output_is_bucketed(raw, tmp_path):
    summary = create_phase(raw, tmp_path / "out", max_resolution=48, step=16, progress=False)
    table = _read_all(tmp_path / "out")
    assert summary["rows_out"] == table.num_rows
    for row in table.to_pylist():
        with Image.open(io.BytesIO(row["image"])) as image:
            assert image.size == (row["bucket_width"], row["bucket_height"])
        assert (row["width"], row["height"]) == (row["bucket_width"], row["bucket_height"])
        assert row["bucket_height"] % 16 == 0 and row["bucket_width"] % 16 == 0
        assert max(row["bucket_height"], row["bucket_width"]) <= 48
        # orientation follows the source image
        if row["orig_height"] > row["orig_width"]:
            assert row["bucket_height"] >= row["bucket_width"]
        else:
            assert row["bucket_height"] <= row["bucket_width"]
        assert row["caption_long"].startswith("a ") and row["shape"] in row["caption_short"]
    counts = {}
    for h, w in zip(table["bucket_height"].to_pylist(), table["bucket_width"].to_pylist()):
        counts[f"{h}x{w}"] = counts.get(f"{h}x{w}", 0) + 1
    assert summary["buckets"] == dict(sorted(counts.items(), key=lambda kv: tuple(map(int, kv[0].split("x")))))


def test_tall_image_height_and_width_columns(tmp_path):
    image = Image.new("RGB", (100, 300), (255, 0, 0))
    image.paste((0, 0, 255), (0, 150, 100, 300))  # blue bottom half
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [7], "image": [buffer.getvalue()], "caption_long": ["tall"]}),
                   tmp_path / "in" / "a.parquet")
    create_phase(tmp_path / "in", tmp_path / "out", max_resolution=128, step=16, progress=False)
    row = pq.read_table(tmp_path / "out" / "a.parquet").to_pylist()[0]
    assert (row["bucket_height"], row["bucket_width"]) == (128, 48)
    assert (row["height"], row["width"], row["orig_height"], row["orig_width"]) == (128, 48, 300, 100)
    pixels = np.asarray(Image.open(io.BytesIO(row["image"])))
    assert pixels.shape == (128, 48, 3)
    assert tuple(pixels[5, 24]) == (255, 0, 0) and tuple(pixels[-5, 24]) == (0, 0, 255)


def test_corrupt_rows_skipped_and_counted(raw, tmp_path):
    summary = create_phase(raw, tmp_path / "out", max_resolution=32, step=16, progress=False)
    source = _read_all(raw).to_pylist()
    corrupt = sorted(r["id"] for r in source if r["image"].startswith(b"not an image"))
    assert corrupt, "the fixture should plant corrupt rows"
    assert sorted(row["id"] for row in summary["skipped_rows"]) == corrupt
    assert summary["skipped"] == len(corrupt) and summary["skipped_by_reason"] == {"undecodable": len(corrupt)}
    assert summary["rows_in"] == len(source) and summary["rows_out"] == len(source) - len(corrupt)
    kept = set(_read_all(tmp_path / "out")["id"].to_pylist())
    assert kept == {r["id"] for r in source} - set(corrupt)  # neighbours of a corrupt row survive
    on_disk = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert on_disk["skipped_rows"] == summary["skipped_rows"]


def test_interrupted_run_resumes_to_the_same_result(raw, tmp_path):
    out = tmp_path / "out"
    first = create_phase(raw, out, max_resolution=32, step=16, n_proc=2, progress=False)
    reference = {p.name: pq.read_table(p) for p in out.glob("*.parquet")}
    # simulate an interruption: one shard never finished (only its temporary file exists)
    (out / "shard_00001.parquet").unlink()
    (out / "shard_00001.parquet.tmp").write_bytes(b"half-written")
    second = create_phase(raw, out, max_resolution=32, step=16, n_proc=1, progress=False)
    assert second["shards_converted_this_run"] == 1 and second["shards_resumed"] == 2
    assert not list(out.glob("*.tmp"))
    assert {p.name for p in out.glob("*.parquet")} == set(reference)
    for name, table in reference.items():
        assert pq.read_table(out / name).equals(table)
    for key in ("rows_in", "rows_out", "skipped_rows", "buckets"):
        assert second[key] == first[key]
    third = create_phase(raw, out, max_resolution=32, step=16, progress=False)
    assert third["shards_converted_this_run"] == 0
    with pytest.raises(ValueError, match="different settings"):
        create_phase(raw, out, max_resolution=48, step=16, progress=False)


def test_entry_scripts_run_without_install(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, check=True, capture_output=True,
                              text=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})

    run(REPO / "data" / "make_demo_dataset.py", "--output_dir", "raw", "--num_rows", "12", "--rows_per_shard", "6",
        "--min_side", "32", "--max_side", "48")
    done = run(REPO / "data" / "create_phase.py", "--input_dir", "raw", "--output_dir", "p32",
               "--max_resolution", "32", "--patch_size", "16")
    assert json.loads(done.stdout)["rows_out"] == 12
    done = run(REPO / "src" / "create_indices.py", "--data_parquet_folder", "p32", "--bucket_indices_path",
               "idx.npy", "--n_proc", "2")
    assert "12 rows in 2 shards" in done.stdout and (tmp_path / "idx.npy").exists()
