"""Token routing (TREAD): the route's draw, the model with routed tokens against exact answers, the config
checks, and a routed run that resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from mmdit.conditioning import TextCondition
from mmdit.config import ConfigError, ModelConfig
from mmdit.model import MMDiT
from mmdit.model.routing import kept_tokens, route_generator, route_indices, route_span


def small(**extra) -> ModelConfig:
    values = dict(depth=4, hidden_size=64, num_heads=2, patch_size=2, in_channels=4, text_dims=[24], pooled_dim=8,
                  latent_factor=1, max_res=32, max_res_orig=32, route=0.5, route_start=1, route_end=3)
    return ModelConfig(**{**values, **extra})


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 12, generator=g)  # 8 x 6 = 48 image tokens
    t = torch.rand(batch, generator=g)
    masks = [torch.tensor([[True] * 5 + [False] * 3, [True] * 8])[:batch]]
    cond = TextCondition([torch.randn(batch, 8, 24, generator=g)], masks, torch.randn(batch, 8, generator=g))
    return x, t, cond


def live(model: MMDiT) -> MMDiT:
    """Non-zero adaLN and output layers (they start at zero, which would hide every difference)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_route_draw_is_static_sorted_and_seeded():
    g = route_generator(seed=3, micro=7, device=torch.device("cpu"))
    idx = route_indices(4, 48, 0.5, g)
    assert idx.shape == (4, kept_tokens(48, 0.5)) == (4, 24)
    assert all(torch.equal(row, row.unique()) for row in idx)  # ascending, no token twice
    again = route_indices(4, 48, 0.5, route_generator(3, 7, torch.device("cpu")))
    other = route_indices(4, 48, 0.5, route_generator(3, 8, torch.device("cpu")))
    assert torch.equal(idx, again) and not torch.equal(idx, other)
    assert kept_tokens(10, 0.99) == 1


def test_routing_every_token_in_any_order_changes_nothing():
    """A route that keeps all tokens, shuffled, must equal no route: positions travel with their tokens."""
    model = live(MMDiT(small()))
    x, t, cond = inputs()
    ref = model(x, t, cond)
    shuffled = torch.stack([torch.randperm(48, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    torch.testing.assert_close(model(x, t, cond, route=shuffled), ref, rtol=1e-5, atol=1e-5)


def test_skipped_tokens_do_not_see_the_routed_blocks():
    """With the span running to the last block, a skipped token's output is independent of the span's
    weights, and a routed token's is not."""
    model = live(MMDiT(small(route_start=1, route_end=4)))
    x, t, cond = inputs()
    route = route_indices(2, 48, 0.5, route_generator(0, 0, torch.device("cpu")))
    out = model(x, t, cond, route=route)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.blocks[2].parameters():
            p.add_(1.0)
    out2 = other(x, t, cond, route=route)
    per_token = (out - out2).abs().unflatten(2, (8, 2)).unflatten(-1, (6, 2)).sum(dim=(1, 3, 5)).flatten(1)
    routed = torch.zeros(2, 48, dtype=torch.bool).scatter(1, route, True)
    assert per_token[~routed].max() == 0  # bit-exact: skipped tokens never met block 2
    assert per_token[routed].min() > 0


def test_route_config_is_checked():
    with pytest.raises(ConfigError, match="model.route=1.0"):
        small(route=1.0)
    with pytest.raises(ConfigError, match="select no block"):
        small(depth=4, route_start=2, route_end=-2)
    assert list(route_span(small())) == [1, 2]
    small(route=0.0, route_start=2, route_end=-2)  # off: the span is not checked


def test_routed_training_resumes_exactly(tiny_models, demo_data, tmp_path):
    from test_trainer import train_once  # the single-process trainer helper

    from mmdit.train.checkpoint import latest_checkpoint

    common = [f"encoders.text.0.name={tiny_models['gemma2']}", f"encoders.text.1.name={tiny_models['modernbert']}",
              f"encoders.text.2.name={tiny_models['clip']}", f"encoders.vae={tiny_models['vae']}",
              f"data.parquet_folder={demo_data['phase']}", f"data.bucket_indices_path={demo_data['index']}",
              "data.batch_size=2", "train.precision=fp32", "train.save_every=2", "train.warmup_steps=0",
              "train.lr_schedule=constant",
              "model.depth=4", "model.route=0.5", "model.route_start=1", "model.route_end=-1"]
    train_once([*common, f"train.save_dir={tmp_path / 'straight'}", "train.total_steps=4"])
    train_once([*common, f"train.save_dir={tmp_path / 'chain'}", "train.total_steps=2"])
    train_once([*common, f"train.save_dir={tmp_path / 'chain'}", "train.total_steps=4", "train.resume=auto"])
    from safetensors.torch import load_file

    a = load_file(latest_checkpoint(tmp_path / "straight" / "tiny_latent") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "chain" / "tiny_latent") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
