"""Training with real ranks: torchrun + gloo, 1 loader rank streaming to 2 model ranks, tiny encoders + VAE.

These start real processes, so they are the slow part of the suite (a few seconds to a minute each).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from mmdit.data.indices import create_indices
from mmdit.train.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "src" / "train.py"
pytestmark = pytest.mark.slow


def torchrun(nproc: int, overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           str(TRAIN), "--config", "tiny_latent", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def base_overrides(tiny_models: dict, data: dict, save_dir: Path, steps: int, **extra) -> list[str]:
    values = {
        "encoders.text.0.name": tiny_models["gemma2"], "encoders.text.1.name": tiny_models["modernbert"],
        "encoders.text.2.name": tiny_models["clip"], "encoders.vae": tiny_models["vae"],
        "data.parquet_folder": data["phase"], "data.bucket_indices_path": data["index"],
        "data.batch_size": 4, "train.save_dir": save_dir, "train.total_steps": steps, "train.log_every": 1,
        "train.weights_digest": True,
        "train.save_every": 1000, "train.warmup_steps": 0, "train.lr_schedule": "constant", "train.precision": "fp32",
        "train.log_samples": True,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_ok(nproc: int, overrides: list[str]) -> subprocess.CompletedProcess:
    result = torchrun(nproc, overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def summaries(run_dir: Path) -> dict[int, dict]:
    return {int(p.stem.split("rank")[1]): json.loads(p.read_text()) for p in run_dir.glob("summary_rank*.json")}


def sample_log(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


LOADER = "topology.loader_to_model={0: [1, 2]}"


def test_loader_rank_feeds_two_model_ranks(tiny_models, demo_data, tmp_path):
    run_ok(3, [*base_overrides(tiny_models, demo_data, tmp_path, 30, **{"train.lr": 3e-3}), LOADER])
    run_dir = tmp_path / "tiny_latent"
    s = summaries(run_dir)
    assert sorted(s) == [1, 2] and all(v["step"] == 30 for v in s.values())
    # DDP kept both model ranks' weights identical
    assert s[1]["weights_sha256"] == s[2]["weights_sha256"]
    curve = losses(run_dir)
    assert sum(curve[-5:]) / 5 < 0.9 * sum(curve[:5]) / 5, curve
    # both model ranks trained on the same bucket at every step, on different samples
    a, b = sample_log(run_dir, 1), sample_log(run_dir, 2)
    assert [r["bucket"] for r in a] == [r["bucket"] for r in b]
    assert all(set(x["ids"]).isdisjoint(y["ids"]) for x, y in zip(a, b))
    assert latest_checkpoint(run_dir).name == "step_00000030"


def test_zero_and_one_loader_ranks_train_identically(tiny_models, demo_data, tmp_path):
    with_loader, without = tmp_path / "loader", tmp_path / "local"
    run_ok(3, [*base_overrides(tiny_models, demo_data, with_loader, 4), LOADER])
    run_ok(2, base_overrides(tiny_models, demo_data, without, 4))
    a, b = with_loader / "tiny_latent", without / "tiny_latent"
    # model rank i is global rank i+1 with a loader, rank i without
    assert sample_log(a, 1) == sample_log(b, 0) and sample_log(a, 2) == sample_log(b, 1)
    wa = load_file(latest_checkpoint(a) / "model.safetensors")
    wb = load_file(latest_checkpoint(b) / "model.safetensors")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5, rtol=1e-4), name


def test_resume_is_bit_exact(tiny_models, demo_data, tmp_path):
    """2N steps straight == N steps, stop, resume N more (constant LR: a cosine one depends on total_steps)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = {"train.ema_update_every": 1, "train.accumulation_steps": 2}
    run_ok(3, [*base_overrides(tiny_models, demo_data, straight, 6, **extra), LOADER])
    run_ok(3, [*base_overrides(tiny_models, demo_data, resumed, 3, **extra), LOADER])
    # resume with a different topology: no loader rank this time
    run_ok(2, [*base_overrides(tiny_models, demo_data, resumed, 6, **extra), "train.resume=auto"])
    a, b = latest_checkpoint(straight / "tiny_latent"), latest_checkpoint(resumed / "tiny_latent")
    assert a.name == b.name == "step_00000006"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa = torch.load(a / "optimizer.pt", weights_only=True)
    ob = torch.load(b / "optimizer.pt", weights_only=True)
    for key, state in oa["state"].items():
        for field, value in state.items():
            assert torch.equal(value, ob["state"][key][field]), (key, field)
    ids_straight = [r["ids"] for r in sample_log(straight / "tiny_latent", 1)]
    # model index 0 was global rank 1 before the resume (3 micro-steps x 2 accumulation) and rank 0 after
    ids_resumed = [r["ids"] for r in sample_log(resumed / "tiny_latent", 1)[:6]] + [
        r["ids"] for r in sample_log(resumed / "tiny_latent", 0)]
    assert ids_resumed == ids_straight


def test_corrupt_images_are_skipped_and_counted(tiny_models, demo_data, tmp_path):
    """Garbage image bytes in a bucketed shard: training goes on, the replacements are counted."""
    phase = tmp_path / "phase"
    phase.mkdir()
    for shard in sorted(Path(demo_data["phase"]).glob("*.parquet")):
        table = pq.read_table(shard)
        images = table.column("image").to_pylist()
        for i in range(0, len(images), 3):
            images[i] = b"not an image" if isinstance(images[i], bytes) else {**images[i], "bytes": b"junk"}
        col = table.schema.get_field_index("image")
        import pyarrow as pa

        table = table.set_column(col, table.schema.field(col), pa.array(images, type=table.schema.field(col).type))
        pq.write_table(table, phase / shard.name, row_group_size=32)
    create_indices(phase, tmp_path / "index.npz")
    data = {"phase": str(phase), "index": str(tmp_path / "index.npz")}
    run_ok(3, [*base_overrides(tiny_models, data, tmp_path / "runs", 5), LOADER])
    s = summaries(tmp_path / "runs" / "tiny_latent")
    assert s[1]["step"] == 5 and s[1]["corrupt"] + s[2]["corrupt"] > 0


def test_failing_loader_ends_the_job_quickly(tiny_models, demo_data, tmp_path):
    """A shard damaged on disk after indexing: the loader's read raises, every rank exits non-zero fast."""
    phase = tmp_path / "phase"
    phase.mkdir()
    for shard in sorted(Path(demo_data["phase"]).glob("*.parquet")):
        data = bytearray(shard.read_bytes())
        middle = len(data) // 2
        data[middle - 2000: middle + 2000] = bytes(4000)  # same size: the index still matches
        (phase / shard.name).write_bytes(bytes(data))
    import shutil

    shutil.copy(demo_data["index"], tmp_path / "index.npz")
    data = {"phase": str(phase), "index": str(tmp_path / "index.npz")}
    t0 = time.monotonic()
    result = torchrun(3, [*base_overrides(tiny_models, data, tmp_path / "runs", 50), LOADER], timeout=120)
    elapsed = time.monotonic() - t0
    assert result.returncode != 0
    assert "training failed" in result.stderr
    assert elapsed < 60, elapsed


def test_inconsistent_topology_is_one_clear_message(tiny_models, demo_data, tmp_path):
    result = torchrun(3, [*base_overrides(tiny_models, demo_data, tmp_path, 2), "topology.loader_to_model={0: [1]}"],
                      timeout=120)
    assert result.returncode != 0
    assert "ranks [2] are neither loaders nor fed by one" in result.stderr
