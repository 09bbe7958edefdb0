"""Precomputed cache: cached batches equal online ones, training from it equals online training (and a run
may switch at a resume), a killed precompute restarts to the same bytes, a mismatched cache is refused."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdit.cache.writer import precompute, quantize_int8
from mmdit.config import ConfigError, load_config
from mmdit.train.batches import build_schedule, make_producer
from mmdit.train.checkpoint import latest_checkpoint
from mmdit.train.resume import plan_resume
from mmdit.train.runtime import Runtime
from mmdit.train.topology import build_topology
from mmdit.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def overrides(tiny_models: dict, data: dict, **extra) -> list[str]:
    values = {
        "encoders.text.0.name": tiny_models["gemma2"], "encoders.text.1.name": tiny_models["modernbert"],
        "encoders.text.2.name": tiny_models["clip"], "encoders.vae": tiny_models["vae"],
        "data.parquet_folder": data["phase"], "data.bucket_indices_path": data["index"], "data.batch_size": 4,
        "data.random_flip": True, "data.first_caption_prob": 0.5, "data.num_workers": 1,
        "train.precision": "fp32", "train.log_every": 1, "train.save_every": 2, "train.warmup_steps": 0,
        "train.lr_schedule": "constant", "train.log_samples": True, "train.lr": 1e-3,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache(tiny_models, demo_data, tmp_path_factory) -> Path:
    """One uninterrupted precompute of the demo data (3 shards, posterior, both caption columns, flips)."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    stats = precompute(load_config("tiny_latent", overrides(tiny_models, demo_data)), out, batch_size=16)
    assert stats["written"] == 3 and stats["rows"] == 240
    return out


def test_cached_batches_equal_online_batches(tiny_models, demo_data, cache):
    online_cfg = load_config("tiny_latent", overrides(tiny_models, demo_data))
    cached_cfg = load_config("tiny_latent", overrides(tiny_models, demo_data, **{"data.source": "cache",
                                                                                 "data.cache_dir": cache}))
    segments = plan_resume(online_cfg, cache / "no-run", 2).segments
    producers = []
    for cfg in (online_cfg, cached_cfg):
        index, schedule = build_schedule(cfg, segments)
        producers.append(make_producer(cfg, schedule, index, torch.device("cpu")))
    assert [type(p).__name__ for p in producers] == ["BatchProducer", "CachedBatchProducer"]
    columns = set()
    for step in range(8):
        for model_index in range(2):
            a, b = (p.make(step, model_index) for p in producers)
            assert torch.equal(a.sample_ids, b.sample_ids)
            # same posterior draw; the VAE forward differs only by batch composition (~1e-4 on 2 CPU threads),
            # another draw would differ by about the latents' own spread (~1)
            assert a.latents.shape == b.latents.shape
            assert (a.latents - b.latents).abs().max() < 1e-3 < 0.5 < a.latents.std()
            for ta, tb, ma, mb in zip(a.cond.tokens, b.cond.tokens, a.cond.masks, b.cond.masks):
                assert torch.equal(ma, mb) and ta.shape == tb.shape
                assert torch.allclose(ta * ma[..., None], tb, atol=1e-5)  # cached padding is zeros
            assert torch.allclose(a.cond.pooled, b.cond.pooled, atol=1e-5)
            columns.add(tuple(a.cond.masks[0].sum(1).tolist()))
    assert len(columns) > 1


def run_training(cfg_overrides: list[str]) -> dict:
    cfg = load_config("tiny_latent", cfg_overrides)
    return train(cfg, Runtime(0, 1, 0, torch.device("cpu"), build_topology(cfg.topology, 1, 1)))


def test_training_from_cache_equals_online_and_switches_at_resume(tiny_models, demo_data, cache, tmp_path):
    """4 online steps == 2 cached steps, then resumed online to 4 (same ids, loss within float tolerance)."""
    online, mixed = tmp_path / "online", tmp_path / "mixed"
    run_training(overrides(tiny_models, demo_data, **{"train.save_dir": online, "train.total_steps": 4}))
    cached = {"data.source": "cache", "data.cache_dir": cache, "train.save_dir": mixed}
    # the cached run reads no shard (no parquet folder) and runs no encoder
    run_training(overrides(tiny_models, demo_data, **cached, **{"train.total_steps": 2, "data.parquet_folder": ""}))
    run_training(overrides(tiny_models, demo_data, **{"train.save_dir": mixed, "train.total_steps": 4}))
    a, b = online / "tiny_latent", mixed / "tiny_latent"
    ids = [[json.loads(line)["ids"] for line in (d / "samples_rank0.jsonl").read_text().splitlines()] for d in (a, b)]
    assert ids[0] == ids[1] and len(ids[0]) == 4
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    wa, wb = (load_file(latest_checkpoint(d) / "model.safetensors") for d in (a, b))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_killed_precompute_restarts_to_the_same_bytes(tiny_models, demo_data, cache, tmp_path):
    out = tmp_path / "cache"
    args = overrides(tiny_models, demo_data)
    cmd = [sys.executable, "-m", "mmdit", "precompute", "--config", "tiny_latent", "--output_dir", str(out),
           "--batch_size", "16", *args]
    # the same arguments and thread count as the fixture's run (conftest: 2 threads): the same floats
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "shards" / "00000.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "precompute wrote no shard in 120 s"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = sorted(p.name for p in (out / "shards").glob("*.safetensors"))
    assert len(done) < 3, f"the kill came too late to test a restart: {done}"
    partial = args + ["data.source=cache", f"data.cache_dir={out}"]
    with pytest.raises(ConfigError, match="incomplete"):
        build_schedule(load_config("tiny_latent", partial), [])
    stats = precompute(load_config("tiny_latent", args), out, batch_size=16)
    assert stats["skipped"] == len(done) and stats["written"] == 3 - len(done)
    for tmp in (out / "shards").glob(".*"):
        tmp.unlink()  # the killed run's half-written shard: never picked up, overwritten by name on a restart
    assert checksums(out) == checksums(cache)


@pytest.mark.parametrize("change,message", [
    ({"encoders.text.0.max_length": 8}, "text_encoders"),
    ({"data.caption_columns": "[caption_short]"}, "caption_columns"),
    ({"data.random_flip": False}, "random_flip"),
])
def test_a_cache_of_another_config_is_refused(tiny_models, demo_data, cache, change, message):
    cfg = load_config("tiny_latent", overrides(tiny_models, demo_data, **{"data.source": "cache",
                                                                          "data.cache_dir": cache, **change}))
    with pytest.raises(ConfigError, match=f"built with another config.*{message}"):
        build_schedule(cfg, [])
    with pytest.raises(ConfigError, match="holds a cache made with another config"):
        precompute(cfg, cache)


def test_a_cache_of_other_data_is_refused(tiny_models, demo_data, cache, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["index_identity"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config("tiny_latent", overrides(tiny_models, demo_data, **{"data.source": "cache",
                                                                          "data.cache_dir": other}))
    with pytest.raises(ConfigError, match="not the index the cache was built from"):
        build_schedule(cfg, [])


def test_a_cache_of_other_encoder_weights_is_refused(tiny_models, demo_data, cache, tmp_path):
    """Same encoder name, other weights: the revision recorded in the manifest no longer matches."""
    other = tmp_path / "other"
    shutil.copytree(cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    assert manifest["encoders"][0]["revision"].startswith("sha256:")  # a local folder: its config.json's hash
    manifest["encoders"][0]["revision"] = "sha256:0000000000000000"
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config("tiny_latent", overrides(tiny_models, demo_data, **{"data.source": "cache",
                                                                          "data.cache_dir": other}))
    with pytest.raises(ConfigError, match="cache built from revision sha256:0000000000000000"):
        build_schedule(cfg, [])


def test_int8_text_error_is_small():
    x = torch.randn(500, 64) * torch.logspace(-2, 2, 500)[:, None]
    q, scale = quantize_int8(x)
    error = (q.float() * scale[:, None] - x).norm(dim=1) / x.norm(dim=1)
    assert q.dtype == torch.int8 and error.max() < 0.02
