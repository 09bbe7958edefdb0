"""MMDiT behaviour: shapes, positions, masking, checkpointing, identity init, backends, overfitting."""

import math

import pytest
import torch

from mmdit.conditioning import TextCondition
from mmdit.config import ConfigError, ModelConfig, load_config
from mmdit.model import MMDiT, count_parameters
from mmdit.model.attention import (
    available_backends,
    cosine_attention,
    cosine_attention_reference,
    get_attention,
    naive_attention,
)
from mmdit.model.blocks import JointBlock
from mmdit.model.positions import apply_rotary, rope_angles_1d, rope_angles_2d

TEXT_DIMS = [12, 20]
POOLED = 10


def small_config(**kw) -> ModelConfig:
    base = dict(depth=2, hidden_size=64, num_heads=4, text_dims=TEXT_DIMS, pooled_dim=POOLED, in_channels=16,
                latent_factor=8, max_res=256, max_res_orig=256)
    base.update(kw)
    return ModelConfig(**base)


def make_condition(batch: int, lengths=(5, 7), valid=(3, 7), seed: int = 0) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(batch, n, d, generator=g) for n, d in zip(lengths, TEXT_DIMS)]
    masks = [torch.arange(n)[None].expand(batch, n) < v for n, v in zip(lengths, valid)]
    return TextCondition(tokens, masks, torch.randn(batch, POOLED, generator=g))


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give zero-initialised layers random weights so a test sees a non-trivial network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.dim() == 0 else 0.0))


@pytest.mark.parametrize("channels,factor", [(16, 8), (3, 1)])
@pytest.mark.parametrize("height,width", [(16, 16), (8, 24), (32, 12), (6, 10)])
def test_output_shape_matches_input(channels, factor, height, width):
    model = MMDiT(small_config(in_channels=channels, latent_factor=factor, max_res=256))
    x = torch.randn(2, channels, height, width)
    assert model(x, torch.rand(2), make_condition(2)).shape == x.shape


def test_odd_size_is_a_clear_error():
    model = MMDiT(small_config())
    with pytest.raises(ValueError, match="divisible by model.patch_size=2"):
        model(torch.randn(1, 16, 9, 8), torch.rand(1), make_condition(1))


def test_depth19_preset_has_about_1_2_billion_parameters():
    n = count_parameters(load_config("sd3_256").model)
    assert 1.2e9 <= n <= 1.3e9


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="model.pos_encoding"):
        load_config(None, ["model.pos_encoding=RoPE3d"])
    with pytest.raises(ConfigError, match="model.dept.*Did you mean: 'depth'"):
        load_config(None, ["model.dept=4"])


@pytest.mark.parametrize("fn", [rope_angles_2d, rope_angles_1d])
def test_rope_score_depends_only_on_offset(fn):
    """q.k between two image tokens is a function of their grid offset, not their absolute place."""
    grid_h, grid_w, dim = 6, 7, 16
    angles = fn(grid_h, grid_w, dim)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    qs = apply_rotary(q.expand(grid_h * grid_w, dim).contiguous(), angles)
    ks = apply_rotary(k.expand(grid_h * grid_w, dim).contiguous(), angles)

    def score(a, b):
        return float(qs[a[0] * grid_w + a[1]] @ ks[b[0] * grid_w + b[1]])

    for offset in [(1, 2), (0, 3), (2, -1)]:
        ref = score((0, 1), (offset[0], 1 + offset[1]))
        for start in [(1, 2), (3, 3), (2, 1)]:
            assert math.isclose(score(start, (start[0] + offset[0], start[1] + offset[1])), ref, rel_tol=1e-5)


def test_rotary_by_angles_equals_rotary_by_complex_rotors():
    """The cos / sin form (used under torch.compile) and the complex multiply (eager) rotate identically."""
    from mmdit.model.positions import rope_rotors

    angles = rope_angles_2d(4, 5, 16)[:, None]  # [N, 1, D/2] against token-major [B, N, H, D]
    x = torch.randn(3, 20, 2, 16, generator=torch.Generator().manual_seed(0))
    by_angles, by_rotors = apply_rotary(x, angles), apply_rotary(x, rope_rotors(angles))
    assert by_angles.dtype == by_rotors.dtype == torch.float32
    torch.testing.assert_close(by_angles, by_rotors, rtol=1e-5, atol=1e-6)
    half = apply_rotary(x.bfloat16(), angles)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), by_rotors, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("valid", [(5, 7), (3, 7)], ids=["no padding", "padding"])
def test_model_compiles_in_one_graph_and_matches_eager(valid):
    """torch.compile sees no graph break (no host syncs, no complex arithmetic) and computes the same thing.

    The aot_eager backend traces forward and backward like inductor does but runs them with eager kernels,
    so this needs no C++ compiler; the speed of the compiled model is measured on GPUs (BENCHMARKS.md).
    """
    torch._dynamo.reset()
    model = MMDiT(small_config())
    randomize_(model, 1)
    x, t = torch.randn(2, 16, 8, 12), torch.rand(2)
    cond = make_condition(2, valid=valid)
    explained = torch._dynamo.explain(model)(x, t, cond)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x, t, cond)
    torch.testing.assert_close(out, model(x, t, cond), rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_rope2d_rows_and_columns_use_separate_halves():
    angles = rope_angles_2d(4, 5, 16)
    same_row = angles[[0, 1]]  # (0,0) and (0,1): only the column half differs
    assert torch.equal(same_row[0, :4], same_row[1, :4]) and not torch.equal(same_row[0, 4:], same_row[1, 4:])


def test_rope_interpolation_changes_positions():
    base = MMDiT(small_config(max_res=256, max_res_orig=256))
    finetune = MMDiT(small_config(max_res=512, max_res_orig=256))
    assert finetune.position_scale == 0.5
    a, b = base.rope_angles(8, 8, torch.device("cpu")), finetune.rope_angles(8, 8, torch.device("cpu"))
    assert not torch.allclose(a, b)
    assert torch.allclose(b, a * 0.5)
    # the 512 px grid at half scale spans the angles the 256 px grid had
    big = finetune.rope_angles(16, 16, torch.device("cpu"))
    assert torch.allclose(big.max(), a.max() * 15 / 7 * 0.5)


def test_padded_text_tokens_change_nothing():
    model = MMDiT(small_config())
    randomize_(model)
    cond = make_condition(2, valid=(3, 4))
    x, t = torch.randn(2, 16, 8, 8), torch.rand(2)
    out = model(x, t, cond)
    garbage = TextCondition([tok.clone() for tok in cond.tokens], cond.masks, cond.pooled)
    for tok, mask in zip(garbage.tokens, garbage.masks):
        tok[~mask] = torch.randn_like(tok[~mask]) * 100
    assert torch.allclose(model(x, t, garbage), out, atol=1e-5)
    # and the real tokens do matter
    changed = TextCondition([tok + 1 for tok in cond.tokens], cond.masks, cond.pooled)
    assert not torch.allclose(model(x, t, changed), out, atol=1e-3)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = MMDiT(small_config())
    randomize_(plain)
    ckpt = MMDiT(small_config(checkpoint_attn=True, checkpoint_mlp=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, cond = torch.randn(2, 16, 8, 8), torch.rand(2), make_condition(2)
    for m in (plain, ckpt):
        m.train()
        m(x, t, cond).square().mean().backward()
    for (name, p1), p2 in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-6, rtol=1e-5), name


def test_fresh_block_is_identity():
    block = JointBlock(64, 4, 4.0, "swiglu", True, last=False, attention=naive_attention)
    for stream in (block.image, block.text):
        torch.nn.init.zeros_(stream.adaLN.weight)
        torch.nn.init.zeros_(stream.adaLN.bias)
    img, txt, y = torch.randn(2, 16, 64), torch.randn(2, 5, 64), torch.randn(2, 64)
    out_img, out_txt = block(img, txt, y, torch.ones(2, 21, dtype=torch.bool), rope_angles_2d(4, 4, 16))
    assert torch.equal(out_img, img) and torch.equal(out_txt, txt)


def test_fresh_model_predicts_zero_and_every_block_is_identity():
    model = MMDiT(small_config(depth=3))
    assert torch.count_nonzero(model(torch.randn(1, 16, 8, 8), torch.rand(1), make_condition(1))) == 0
    for block in model.blocks:
        for stream in (block.image, block.text):
            assert torch.count_nonzero(stream.adaLN.weight) == 0


@pytest.mark.parametrize("backend", [b for b in available_backends() if b not in ("auto", "naive", "cosine")])
def test_backends_agree_with_naive(backend):
    """Each backend's kernel with the mask argument its ``prepare`` builds equals the masked reference."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :4] = False
    fn = get_attention(backend)
    assert torch.allclose(fn.attend(q, k, v, fn.prepare(mask, 11)), naive_attention(q, k, v, mask), atol=1e-5)
    assert torch.allclose(fn.attend(q, k, v, None), naive_attention(q, k, v, None), atol=1e-5)


def test_cosine_attention_matches_its_quadratic_form():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    for m in (mask, None):
        assert torch.allclose(cosine_attention(q, k, v, m), cosine_attention_reference(q, k, v, m), atol=1e-5)


@pytest.mark.parametrize("backend,package", [("flash_attn", "flash_attn"), ("xformers", "xformers")])
def test_missing_backend_names_the_package(backend, package):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(ImportError, match=f"needs the package '{package}'"):
        MMDiT(small_config(attention=backend))


@pytest.mark.parametrize("pos", ["RoPE2d", "RoPE", "absolute", "NoPE"])
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_every_option_runs_forward_and_backward(pos, mlp):
    model = MMDiT(small_config(pos_encoding=pos, mlp_type=mlp, attention="cosine" if pos == "NoPE" else "sdpa"))
    randomize_(model)
    model(torch.randn(2, 16, 8, 12), torch.rand(2), make_condition(2)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_time_scale_is_learnable_and_starts_at_1000():
    model = MMDiT(small_config())
    assert model.condition.time.time_scale.item() == 1000.0 and model.condition.time.time_scale.requires_grad


def test_overfits_a_fixed_toy_batch():
    """A tiny model regresses the velocity of a fixed batch: the loss falls by 10x."""
    torch.manual_seed(0)
    cfg = small_config(depth=2, hidden_size=64, num_heads=4, in_channels=3, latent_factor=1)
    model = MMDiT(cfg)
    x0 = torch.randn(4, 3, 8, 8)
    eps = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    cond = make_condition(4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        loss = (model(xt, t, cond) - (eps - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
