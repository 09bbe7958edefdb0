"""Recaptioning on the tiny random-weight LLaVA: both columns for every row, the retry-then-flag path, a resume
after a kill, and input shards left untouched."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmdit.data.recaption import RecaptionConfig, recaption_folder
from mmdit.encoders.tiny import build_tiny_vlm

ROOT = Path(__file__).resolve().parents[1]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.parquet"))}


def test_recaption_writes_both_columns_resumes_after_a_kill_and_leaves_the_input(demo_data, tmp_path):
    vlm = build_tiny_vlm(tmp_path / "vlm")
    phase, out = Path(demo_data["phase"]), tmp_path / "recaptioned"
    before = digests(phase)
    # budgets so small that random weights never reach the end token: every caption is cut off, retried with
    # twice the budget, still cut off, and flagged (the flag path, deterministically)
    flags = ["--max_new_tokens", "3", "--max_new_tokens_short", "2", "--batch_size", "40"]
    cmd = [sys.executable, str(ROOT / "data" / "recaption.py"), "--input_dir", str(phase), "--output_dir", str(out),
           "--model", vlm, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / sorted(before)[0]
    deadline = time.time() + 180
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "recaption wrote no shard in 180 s"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = digests(out)
    assert 1 <= len(done) < len(before), f"the kill came too late to test a resume: {sorted(done)}"
    cfg = RecaptionConfig(model=vlm, max_new_tokens=3, max_new_tokens_short=2, batch_size=40)
    stats = recaption_folder(cfg, phase, out)
    assert stats["skipped"] == len(done) and stats["rows"] == 80 * (len(before) - len(done))
    after = digests(out)
    assert sorted(after) == sorted(before) and all(after[name] == digest for name, digest in done.items())
    assert digests(phase) == before  # the input shards are untouched
    for name in before:
        source, table = pq.read_table(phase / name), pq.read_table(out / name)
        assert table.num_rows == source.num_rows and table.select(source.column_names).equals(source)
        longs, shorts = table.column("recaption").to_pylist(), table.column("recaption_short").to_pylist()
        assert all(longs) and all(shorts)
        assert set(table.column("recaption_flag").to_pylist()) == {"long:cut_off,short:cut_off"}
    with pytest.raises(ValueError, match="never the input"):
        recaption_folder(cfg, phase, phase)
