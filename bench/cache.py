"""Precompute or stream? CPU tiny_latent: training step time from the cache vs online encoding in background
workers (no loader ranks), batch build time alone, and the cache's bytes per image vs the bucketed shards'.

    PYTHONPATH=src python bench/cache.py [--steps 20] [--batch_size 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    from mmdit.cache.reader import CacheReader, load_cache_index
    from mmdit.cache.writer import precompute
    from mmdit.config import load_config
    from mmdit.data.demo_dataset import make_demo_dataset
    from mmdit.data.indices import create_indices
    from mmdit.data.phase import create_phase
    from mmdit.encoders.tiny import build_tiny_models
    from mmdit.train.batches import build_schedule, make_producer
    from mmdit.train.resume import plan_resume
    from mmdit.train.runtime import Runtime
    from mmdit.train.topology import build_topology
    from mmdit.train.trainer import train

    root = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    make_demo_dataset(root / "raw", num_rows=480, rows_per_shard=160, seed=0)
    create_phase(root / "raw", root / "phase", max_resolution=64, progress=False)
    create_indices(root / "phase", root / "index.npz")
    tiny = build_tiny_models(root / "tiny")
    base = [f"encoders.text.0.name={tiny['gemma2']}", f"encoders.text.1.name={tiny['modernbert']}",
            f"encoders.text.2.name={tiny['clip']}", f"encoders.vae={tiny['vae']}",
            f"data.parquet_folder={root / 'phase'}", f"data.bucket_indices_path={root / 'index.npz'}",
            f"data.batch_size={args.batch_size}", "encoders.caption_cache=0", "train.precision=fp32",
            "train.log_every=1000", "train.save_every=100000", f"train.total_steps={args.steps}"]
    cached = ["data.source=cache", f"data.cache_dir={root / 'cache'}"]
    t0 = time.perf_counter()
    stats = precompute(load_config("tiny_latent", base), root / "cache", batch_size=32)
    precompute_s = time.perf_counter() - t0
    results = {"precompute_images_per_s": stats["rows"] / precompute_s}
    for name, extra in (("online", []), ("cache", cached)):
        cfg = load_config("tiny_latent", base + extra + [f"train.save_dir={root / name}"])
        index, schedule = build_schedule(cfg, plan_resume(cfg, root / "none", 1).segments)
        producer = make_producer(cfg, schedule, index, torch.device("cpu"))
        producer.make(0, 0)
        t0 = time.perf_counter()
        for step in range(1, 11):
            producer.make(step, 0)
        results[f"{name}_batch_build_ms"] = (time.perf_counter() - t0) / 10 * 1e3
        t0 = time.perf_counter()
        summary = train(cfg, Runtime(0, 1, 0, torch.device("cpu"), build_topology(cfg.topology, 1, 1)))
        elapsed = time.perf_counter() - t0
        results[f"{name}_train_s_per_step"] = elapsed / args.steps
        results[f"{name}_data_wait_frac"] = summary["data_wait_s"] / elapsed
    shards = sum(p.stat().st_size for p in (root / "phase").rglob("*.parquet"))
    cfg = load_config("tiny_latent", base + cached)
    reader = CacheReader(cfg, load_cache_index(cfg))
    results["cache_bytes_per_image"] = reader.bytes_per_image()
    results["shard_bytes_per_image"] = shards / len(reader.index)
    print(json.dumps({k: round(v, 4) for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
