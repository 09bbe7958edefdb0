"""create_phase on images as the web serves them, and on folders as dataset clones leave them."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from web_images import (
    BLUE,
    RED,
    WHITE,
    dds_with_unknown_pixel_format,
    encoded,
    half_transparent_rgba,
    oriented_jpeg,
    png_header_only,
    upright_mark,
)

from mmdit.data.images import fit_to_bucket
from mmdit.data.phase import SUMMARY_NAME, UnreadableInputError, create_phase
from mmdit.data.phase_workers import run_tasks

REPO = Path(__file__).resolve().parents[1]
LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")


def good_rows() -> dict:
    """id -> (encoded image, expected upright picture as an RGB array at source size)."""
    upright = upright_mark()
    portrait = np.ascontiguousarray(np.rot90(upright, -1))  # 60 x 40 (HxW): what the viewer of orientation 8 sees
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(portrait, 1)))
    rgba = half_transparent_rgba().resize((60, 20), Image.Resampling.NEAREST)
    flat_rgba = np.asarray(rgba.convert("RGB")).copy()
    flat_rgba[:, 40:] = WHITE
    flat_rgba[:, 20:40] = (127, 127, 255)
    palette = Image.new("P", (48, 32), 0)
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    palette.paste(1, (0, 0, 24, 32))
    flat_palette = np.full((32, 48, 3), 255, np.uint8)
    flat_palette[:, :24] = RED
    frames = [Image.new("RGB", (40, 40), colour) for colour in (BLUE, RED)]
    return {
        1: (encoded(stored, "JPEG", exif=exif.tobytes(), quality=95), portrait),
        2: (oriented_jpeg(3), upright),
        3: (encoded(Image.fromarray(np.full((32, 48), 30000, np.uint16)), "PNG"), np.full((32, 48, 3), 117, np.uint8)),
        4: (encoded(rgba, "PNG"), flat_rgba),
        5: (encoded(palette, "GIF", transparency=0), flat_palette),
        6: (encoded(Image.fromarray(upright).convert("CMYK"), "JPEG", quality=95), upright),
        7: (encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]), np.full((40, 40, 3), BLUE, np.uint8)),
    }


def bad_rows() -> dict:
    """id -> (image value, expected skip reason)."""
    jpeg = encoded(Image.fromarray(upright_mark()), "JPEG")
    return {
        10: (None, "null_image"),
        11: (b"", "null_image"),
        12: (b"<html><body>403 Forbidden</body></html>", "undecodable"),
        13: (jpeg[: len(jpeg) // 2], "truncated"),
        14: (png_header_only(11_000, 10_000), "too_large"),
        15: (encoded(Image.new("RGB", (1, 1)), "GIF"), "too_small"),
        16: (dds_with_unknown_pixel_format(), "decoder_error"),
    }


@pytest.fixture(scope="module")
def web_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("web")
    good, bad = good_rows(), bad_rows()
    mixed = sorted([(i, data) for i, (data, _) in good.items()] + [(i, data) for i, (data, _) in bad.items()])
    pq.write_table(pa.table({"id": [i for i, _ in mixed], "image": pa.array([d for _, d in mixed], pa.binary()),
                             "caption_long": [f"row {i}" for i, _ in mixed]}), root / "a.parquet", row_group_size=5)
    (root / "sub").mkdir()
    pq.write_table(pa.table({"id": [20], "image": [oriented_jpeg(1)], "caption_long": ["plain"]}),
                   root / "sub" / "b.parquet")
    (root / "c.parquet").write_bytes(LFS_POINTER)  # a hub clone without git lfs pull
    (root / "d.parquet").write_bytes((root / "a.parquet").read_bytes()[:3000])  # half-downloaded
    (root / "README.parquet").write_text("# My dataset\n")  # renamed by a glob
    (root / ".git").mkdir()
    (root / ".git" / "e.parquet").write_bytes(LFS_POINTER)  # inside a hidden folder: not an input
    (root / "README.md").write_text("not a shard")
    return root


def test_web_images_come_out_as_seen_and_bad_rows_are_explained(web_folder, tmp_path):
    summary = create_phase(web_folder, tmp_path / "out", max_resolution=48, step=16, progress=False)
    good, bad = good_rows(), bad_rows()
    table = pa.concat_tables([pq.read_table(tmp_path / "out" / "a.parquet"), pq.read_table(tmp_path / "out" / "sub"
                                                                                             / "b.parquet")])
    rows = {row["id"]: row for row in table.to_pylist()}
    assert set(rows) == set(good) | {20}
    for row_id, (_, picture) in good.items():
        row = rows[row_id]
        height, width = picture.shape[:2]
        assert (row["orig_width"], row["orig_height"]) == (width, height), row_id
        assert (row["bucket_height"] >= row["bucket_width"]) == (height >= width), row_id  # portrait stays portrait
        got = np.asarray(Image.open(io.BytesIO(row["image"]))).astype(int)
        expected = np.asarray(fit_to_bucket(Image.fromarray(picture), row["bucket_height"], row["bucket_width"]))
        assert got.shape == expected.shape and np.abs(got - expected).mean() < 6, row_id
    assert rows[1]["bucket_height"] > rows[1]["bucket_width"]  # the rotated phone photo is a portrait
    skipped = {row["id"]: row for row in summary["skipped_rows"]}
    assert {i: row["reason"] for i, row in skipped.items()} == {i: reason for i, (_, reason) in bad.items()}
    assert all(row["shard"] == "a.parquet" and row["detail"] for row in skipped.values())
    assert summary["skipped_by_reason"] == {"null_image": 2, "undecodable": 1, "truncated": 1, "too_large": 1,
                                            "too_small": 1, "decoder_error": 1}
    unreadable = {item["path"]: item["reason"] for item in summary["unreadable_files"]}
    assert unreadable["c.parquet"] == "git-lfs pointer: run git lfs pull"
    assert "truncated parquet" in unreadable["d.parquet"] and "PAR1" in unreadable["README.parquet"]
    assert set(unreadable) == {"c.parquet", "d.parquet", "README.parquet"}
    assert summary["failed_shards"] == [] and summary["rows_out"] == len(good) + 1
    assert json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())["skipped_rows"] == summary["skipped_rows"]


def test_strict_refuses_before_any_work(web_folder, tmp_path):
    with pytest.raises(UnreadableInputError, match=r"c\.parquet \(git-lfs pointer: run git lfs pull\)"):
        create_phase(web_folder, tmp_path / "out", max_resolution=48, progress=False, strict=True)
    assert not (tmp_path / "out").exists()


def _cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "data" / "create_phase.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_cli_exit_status_and_messages(web_folder, tmp_path):
    done = _cli("--input_dir", web_folder, "--output_dir", tmp_path / "out", "--max_resolution", "48", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows_out"] == 8
    last = done.stderr.strip().splitlines()[-1]
    assert "kept 8 of 15 rows; skipped 7 (null_image 2," in last and "3 input file(s) not readable parquet" in last
    refused = _cli("--input_dir", web_folder, "--output_dir", tmp_path / "strict", "--strict", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == "" and "Traceback" not in refused.stderr
    assert refused.stderr.count("\n") == 1 and "git-lfs pointer: run git lfs pull" in refused.stderr
    assert not (tmp_path / "strict").exists()


def _convert_or_die(task: int) -> int:
    if task == 2:
        os._exit(3)  # what the OOM killer or a segfaulting codec does to a worker
    if task == 4:
        raise ValueError("a corrupt row group")
    return task * 10


def test_a_dying_worker_costs_one_shard_not_the_run():
    results = {}
    failures = run_tasks(_convert_or_die, [0, 1, 2, 3, 4, 5, 6], 2, lambda i, r: results.__setitem__(i, r))
    assert results == {0: 0, 1: 10, 3: 30, 5: 50, 6: 60}
    assert set(failures) == {2, 4}
    assert "worker process died (exit code 3)" in failures[2] and "a corrupt row group" in failures[4]
