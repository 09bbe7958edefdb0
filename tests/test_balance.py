"""Balance of loaders and model ranks: the monitor's rule, and the warning in real runs (slowed loader or not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmdit.train.balance import BalanceMonitor, RankBalance, advice, balance_metrics

ROOT = Path(__file__).resolve().parents[1]


def interval(wait: float, busy: float = 1.0) -> list[RankBalance]:
    return [RankBalance(1, wait, 1.0, 0, busy), RankBalance(2, wait / 2, 1.0, 0, busy)]


def test_monitor_warns_once_after_warmup_when_waiting_over_five_percent():
    monitor = BalanceMonitor(num_loaders=1, num_models=3, window_steps=20, warmup_until=10)
    assert monitor.update(10, 10, interval(0.9)) is None  # start-up waits do not count
    assert monitor.update(20, 10, interval(0.5)) is None  # half a window
    message = monitor.update(30, 10, interval(0.5))
    assert message and "waited for data 50%" in message and "Try about 2 loader ranks, one per 1.5" in message
    assert monitor.update(40, 10, interval(0.9)) is None and monitor.update(50, 10, interval(0.9)) is None  # once


def test_monitor_is_quiet_below_the_threshold_and_names_the_transfer_when_loaders_idle():
    monitor = BalanceMonitor(num_loaders=2, num_models=6, window_steps=10, warmup_until=0)
    assert monitor.update(10, 10, interval(0.04)) is None
    assert "the transfer, not encoding" in advice(0.3, 0.4, 2, 6, 100)
    assert "data.num_workers" in advice(0.3, None, 0, 1, 100)


def test_metrics_name_every_model_rank_and_loader():
    values = balance_metrics([RankBalance(1, 0.25, 1.0, 0, 0.9), RankBalance(3, 0.0, 2.0, 2, 0.5)])
    assert values == {"data_wait_frac/rank1": 0.25, "data_wait_frac/rank3": 0.0, "loader_busy_frac/rank0": 0.9,
                      "loader_busy_frac/rank2": 0.5}


def test_a_wait_hidden_behind_queued_device_work_is_not_counted():
    from mmdit.train.batches import BatchSource

    def slow(step: int):
        time.sleep(0.2)
        return SimpleNamespace(step=step, ready=None)

    source = BatchSource(slow, 0, 3, streamed=False, depth=1)
    source.get(0, hidden=lambda: True)  # the device was still busy: nobody waited
    assert source.wait_s == 0.0
    source.get(1, hidden=lambda: False)
    assert source.wait_s >= 0.1
    source.close()


def _run(tiny_models: dict, demo_data: dict, save_dir: Path, extra: list[str]) -> tuple[str, list[dict]]:
    values = {
        "encoders.text.0.name": tiny_models["gemma2"], "encoders.text.1.name": tiny_models["modernbert"],
        "encoders.text.2.name": tiny_models["clip"], "encoders.vae": tiny_models["vae"],
        "data.parquet_folder": demo_data["phase"], "data.bucket_indices_path": demo_data["index"],
        "data.batch_size": 8, "train.save_dir": save_dir, "train.total_steps": 40, "train.log_every": 5,
        "train.save_every": 1000, "train.precision": "fp32", "train.balance_window": 10,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
           str(ROOT / "src" / "train.py"), "--config", "tiny_latent", *[f"{k}={v}" for k, v in values.items()],
           "topology.loader_to_model={0: [1, 2]}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    metrics = [json.loads(line) for line in (save_dir / "tiny_latent" / "metrics.jsonl").read_text().splitlines()]
    return out.stdout + out.stderr, metrics


@pytest.mark.slow
def test_warning_fires_when_the_loader_is_slowed_and_not_otherwise(tiny_models, demo_data, tmp_path):
    # slowed on purpose: one read worker, no caption cache, and a model so small that it outruns its loader
    slowed, m_slow = _run(tiny_models, demo_data, tmp_path / "slow",
                          ["data.num_workers=1", "encoders.caption_cache=0", "model.depth=1",
                           "model.hidden_size=32", "model.num_heads=2"])
    assert "model ranks waited for data" in slowed and "loaders busy" in slowed, slowed[-3000:]
    assert max(m["loader_busy_frac/rank0"] for m in m_slow[2:]) > 0.9
    # the same loader feeding a model that takes longer than the loader does, with accumulation 2 (micro-steps
    # after the first are not synchronised with the host: a wait hidden behind queued work is no wait)
    balanced, m_ok = _run(tiny_models, demo_data, tmp_path / "ok", ["model.hidden_size=192",
                                                                      "train.accumulation_steps=2"])
    assert "model ranks waited for data" not in balanced
    assert all(f"data_wait_frac/rank{r}" in m_ok[-1] for r in (1, 2)) and "loader_busy_frac/rank0" in m_ok[-1]
