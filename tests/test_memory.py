"""The memory estimate (``python -m mmdit memory``) and the scaling-ladder presets."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdit.config import load_config
from mmdit.memory import _saved_bytes, estimate, measured_activations, unit_params
from mmdit.model import MMDiT, count_parameters

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset, depth, low, high", [("sd3_2b", 24, 2.3e9, 2.6e9), ("sd3_4b", 30, 4.6e9, 5.0e9)])
def test_ladder_presets(preset, depth, low, high):
    cfg = load_config(preset)
    assert cfg.model.depth == depth and cfg.model.dim == 64 * depth and cfg.model.max_res == 256
    assert cfg.train.parallel == "fsdp" and cfg.model.checkpoint_policy == "full"
    assert low < count_parameters(cfg.model) < high
    assert "FLUX.1-schnell" in cfg.encoders.vae  # ungated default


def test_scaled_measurement_matches_a_direct_one():
    """Activations measured narrow and scaled to the real width agree with measuring at the real width."""
    cfg = load_config("tiny_latent", ["model.depth=4", "model.hidden_size=192", "model.num_heads=3"])
    batch = 3
    total, per_block = measured_activations(cfg, batch, dtype=torch.float32)
    m = cfg.model
    torch.manual_seed(0)
    model = MMDiT(m).train()
    from mmdit.conditioning import TextCondition

    lengths = [e.max_length for e in cfg.encoders.text if e.kind == "sequence"]
    side = m.max_res // m.latent_factor
    cond = TextCondition(tokens=[torch.randn(batch, n, d) for n, d in zip(lengths, m.text_dims)],
                         masks=[torch.ones(batch, n, dtype=torch.bool) for n in lengths],
                         pooled=torch.randn(batch, m.pooled_dim))
    direct = _saved_bytes(model, torch.randn(batch, m.in_channels, side, side), torch.rand(batch), cond,
                          torch.float32)
    assert direct == pytest.approx(total, rel=0.15)
    assert 0 < per_block < total


def test_estimate_components():
    cfg = load_config("sd3_2b")
    acts = (100.0 * 2**30, 4.0 * 2**30)  # given: the parts under test are the state and its sharding
    ddp, fsdp = estimate(cfg, 8, "ddp", acts), estimate(cfg, 8, "fsdp", acts)
    block, root = unit_params(cfg.model)
    n = cfg.model.depth * block + root
    assert n == count_parameters(cfg.model) == ddp.params
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.ema) == (4 * n, 4 * n, 8 * n, 4 * n)
    assert fsdp.optimizer == pytest.approx(8 * n / 8) and fsdp.ema == pytest.approx(4 * n / 8)
    assert estimate(cfg, 1, "ddp", acts).total(True) == ddp.total(True)  # DDP: every GPU holds everything
    assert fsdp.total(True) < ddp.total(True) < ddp.total(False)
    with pytest.raises(ValueError, match="parallel='zero'"):
        estimate(cfg, 8, "zero", acts)


def test_full_checkpointing_keeps_less_than_none():
    cfg = load_config("tiny_latent")
    e = estimate(cfg, 2, "fsdp")
    assert 0 < e.activations_checkpointed < e.activations
    wider = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=2 * cfg.data.batch_size))
    assert estimate(wider, 2, "fsdp").activations == pytest.approx(2 * e.activations)


def test_memory_cli():
    out = subprocess.run([sys.executable, "-m", "mmdit", "memory", "--config", "tiny_latent", "--gpus", "2", "4"],
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["ddp"], ["fsdp"])]
    assert [r[:2] for r in rows] == [["ddp", "any"], ["fsdp", "2"], ["fsdp", "4"]]
