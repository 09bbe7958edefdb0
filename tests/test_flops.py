"""The FLOP model (MFU / HFU) against PyTorch's FlopCounterMode, and what checkpointing adds."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmdit.conditioning import TextCondition
from mmdit.config import ModelConfig
from mmdit.model import MMDiT
from mmdit.model.flops import (
    PEAK_BF16_FLOPS,
    batch_train_flops,
    block_flops,
    device_peak_flops,
    forward_flops,
    hardware_flops_per_image,
    peak_flops_for,
    recompute_flops,
    skips_padded_keys,
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


@pytest.mark.parametrize("attention", ["naive", "cosine"])
def test_training_flops_match_flop_counter(attention):
    """3 x forward, less the input gradients the input layers never compute (frozen latents and text)."""
    cfg = config(attention=attention)
    model = MMDiT(cfg)
    x, t, cond = inputs(2)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, t, cond).square().mean().backward()
    ours = 2 * train_flops_per_image(cfg, 64, 96, [16, 32])
    assert ours == pytest.approx(counter.get_total_flops(), rel=1e-3)  # 3 x forward would be 0.4 % over here
    assert ours < 3 * 2 * forward_flops(cfg, 24, [16, 32])


def test_cosine_attention_is_counted_linear():
    cfg = config(attention="cosine")
    model = MMDiT(cfg)
    x, t, cond = inputs(3)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, cond)
    assert 3 * forward_flops(cfg, 24, [16, 32]) == pytest.approx(counter.get_total_flops(), rel=0.02)
    n, d = 24 + 48, cfg.dim
    softmax = forward_flops(config(), 24, [16, 32])
    assert softmax - forward_flops(cfg, 24, [16, 32]) == pytest.approx(cfg.depth * (4 * n * n * d - 4 * n * d * 16))


def test_skipped_padded_keys_are_not_counted():
    """Where the kernel skips padded keys (FlexAttention, flash-attn varlen), attention runs over the image and
    the real text tokens only: 4 n_q n_k d, n_q = all tokens, n_k = image + real text."""
    cfg = config(attention="flex")
    n_q, d = 24 + 48, cfg.dim
    full, half = forward_flops(cfg, 24, [16, 32]), forward_flops(cfg, 24, [16, 32], attended_text=24)
    assert forward_flops(cfg, 24, [16, 32], attended_text=48) == full
    assert full - half == pytest.approx(cfg.depth * 4 * n_q * 24 * d)
    # a batch: the per-sample counts summed, on the masks' device (no host sync)
    masks = [torch.arange(16)[None] < torch.tensor([[16], [4], [10]]), torch.arange(32)[None] < torch.tensor(
        [[1], [32], [20]])]
    flops, hw = batch_train_flops(cfg, 64, 96, masks, skip_padded=True)
    assert isinstance(flops, torch.Tensor)
    per_sample = [train_flops_per_image(cfg, 64, 96, [16, 32], attended_text=k) for k in (17, 36, 30)]
    assert float(flops) == pytest.approx(sum(per_sample), rel=1e-6)
    assert float(hw) == pytest.approx(sum(hardware_flops_per_image(cfg, 64, 96, [16, 32], attended_text=k)
                                          for k in (17, 36, 30)), rel=1e-6)
    dense, _ = batch_train_flops(cfg, 64, 96, masks, skip_padded=False)
    assert dense == pytest.approx(3 * train_flops_per_image(cfg, 64, 96, [16, 32])) and dense > float(flops)
    assert skips_padded_keys("flex", "cpu") and skips_padded_keys("auto", "cuda")
    assert not skips_padded_keys("auto", "cpu") and not skips_padded_keys("sdpa", "cuda")
    assert not skips_padded_keys("cosine", "cuda")


@pytest.mark.parametrize("name", sorted(PEAK_BF16_FLOPS))
def test_every_named_device_has_its_own_peak(name):
    assert peak_flops_for(name) == PEAK_BF16_FLOPS[name] > 50e12


def test_peaks_by_exact_name_not_by_substring(caplog):
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12 and peak_flops_for("NVIDIA H100 NVL") == 835e12
    assert peak_flops_for("NVIDIA H200 NVL") == 835e12 and peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA L4") != peak_flops_for("NVIDIA L40S")
    with caplog.at_level("WARNING"):
        assert peak_flops_for("NVIDIA Imaginary X1") == 0.0
        assert peak_flops_for("NVIDIA Imaginary X1") == 0.0
    logged = [r.getMessage() for r in caplog.records if "Imaginary" in r.getMessage()]
    assert len(logged) == 1 and "train.peak_flops" in logged[0]  # once, naming the fix
    if not torch.cuda.is_available():
        assert device_peak_flops() == 0.0


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


def test_routed_blocks_count_the_tokens_they_compute():
    """model.route: the span's blocks run on the kept image tokens; FlopCounterMode on a routed step agrees."""
    from mmdit.model.routing import route_generator, route_indices

    cfg = config(depth=4, route=0.5, route_start=1, route_end=3)
    model = MMDiT(cfg)
    x, t, cond = inputs(2, height=16, width=16)  # 64 image tokens, 32 through blocks 1 and 2
    route = route_indices(2, 64, cfg.route, route_generator(0, 0, torch.device("cpu")))
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, t, cond, route=route).square().mean().backward()
    ours = 2 * train_flops_per_image(cfg, 128, 128, [16, 32])
    assert ours == pytest.approx(counter.get_total_flops(), rel=1e-3)
    assert ours < 2 * train_flops_per_image(config(depth=4), 128, 128, [16, 32])
