"""The FLOP model (MFU / HFU) against PyTorch's FlopCounterMode, and what checkpointing adds."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmdit.conditioning import TextCondition
from mmdit.config import ModelConfig
from mmdit.model import MMDiT
from mmdit.model.flops import (
    block_flops,
    forward_flops,
    hardware_flops_per_image,
    recompute_flops,
    train_flops_per_image,
)

TEXT_DIMS = [12, 20]


def config(**kw) -> ModelConfig:
    base = dict(depth=3, hidden_size=64, num_heads=4, text_dims=TEXT_DIMS, pooled_dim=10, in_channels=16,
                latent_factor=8, max_res=256, max_res_orig=256, attention="naive")
    base.update(kw)
    return ModelConfig(**base)


def inputs(batch: int, lengths=(16, 32), height=8, width=12):
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(batch, n, d, generator=g) for n, d in zip(lengths, TEXT_DIMS)]
    masks = [torch.arange(n)[None].expand(batch, n) < n - 3 for n in lengths]  # padded: computed all the same
    cond = TextCondition(tokens, masks, torch.randn(batch, 10, generator=g))
    return torch.randn(batch, 16, height, width, generator=g), torch.rand(batch, generator=g), cond


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_forward_flops_match_flop_counter(mlp):
    """Per stream, modulation per sample, attention 4 n^2 d: within 2 % of the counted matmuls (batch 3)."""
    cfg = config(mlp_type=mlp)
    model = MMDiT(cfg)
    x, t, cond = inputs(3)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, cond)
    image_tokens = (8 // 2) * (12 // 2)
    ours = 3 * forward_flops(cfg, image_tokens, [16, 32])
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_training_flops_are_three_forwards_and_backward_is_counted_near_two():
    cfg = config()
    model = MMDiT(cfg)
    x, t, cond = inputs(2)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, t, cond).square().mean().backward()
    ours = 2 * train_flops_per_image(cfg, 64, 96, [16, 32])
    # frozen inputs (latents, text features) need no input gradient, so the counted backward is a bit under 2x
    assert 0.9 * ours <= counter.get_total_flops() <= ours


@pytest.mark.parametrize("policy,full_blocks", [("none", []), ("full", [0, 1, 2]), ("every_k:2", [0, 2])])
def test_checkpointed_blocks_are_recomputed_whole(policy, full_blocks):
    """HFU - MFU work = the forward of exactly the fully checkpointed blocks (every_k:2 -> blocks 0 and 2)."""
    cfg = config(checkpoint=policy)
    expected = sum(block_flops(cfg, 24, 48, last=i == 2).total for i in full_blocks)
    extra = hardware_flops_per_image(cfg, 64, 96, [16, 32]) - train_flops_per_image(cfg, 64, 96, [16, 32])
    assert extra == pytest.approx(expected) and recompute_flops(cfg, 24, [16, 32]) == pytest.approx(expected)
    if policy == "full":  # everything but the embedders, conditioning MLPs and output layer
        assert 0.9 * forward_flops(cfg, 24, [16, 32]) < expected < forward_flops(cfg, 24, [16, 32])


def test_attention_and_mlp_recompute_add_up_to_less_than_full():
    r = {p: recompute_flops(config(checkpoint=p), 64, [16, 32]) for p in ("attention", "mlp", "attention+mlp",
                                                                          "full")}
    assert r["attention"] + r["mlp"] == pytest.approx(r["attention+mlp"])
    assert 0 < r["attention"] < r["attention+mlp"] < r["full"]
    assert recompute_flops(config(checkpoint_attn=True, checkpoint_mlp=True), 64, [16, 32]) == r["attention+mlp"]


def test_text_lengths_must_match_the_encoders():
    with pytest.raises(ValueError, match="one length per sequence encoder"):
        forward_flops(config(), 24, [16])
    assert forward_flops(config(), 24, 48) == pytest.approx(forward_flops(config(), 24, [24, 24]))
