"""Attention over padded text: the FlexAttention block mask, backends against the reference, NaN safety,
the once-per-forward plan, and trimming text to the batch."""

import importlib.util
import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as fa
from conditions import randomize_
from torch.nn.attention.flex_attention import create_block_mask

from mmdit.conditioning import TextCondition, trimmed_length
from mmdit.config import ModelConfig
from mmdit.model import MMDiT
from mmdit.model.attention import naive_attention, plan_attention, sdpa_attention
from mmdit.model.flex import flex_attention_fn, key_padding_block_mask

TEXT_DIMS = [12, 20]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def config(**kw) -> ModelConfig:
    base = dict(depth=2, hidden_size=64, num_heads=4, text_dims=TEXT_DIMS, pooled_dim=10, in_channels=16,
                latent_factor=8, max_res=256, max_res_orig=256)
    base.update(kw)
    return ModelConfig(**base)


def padded_condition(batch: int, lengths=(21, 13), seed: int = 0) -> TextCondition:
    """Random real lengths per sample and encoder (one sample has encoder 0 empty, as if dropped)."""
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(batch, n, d, generator=g) for n, d in zip(lengths, TEXT_DIMS)]
    masks = []
    for n in lengths:
        real = torch.randint(1, n + 1, (batch,), generator=g)
        masks.append(torch.arange(n)[None] < real[:, None])
    masks[0][0] = False
    return TextCondition(tokens, masks, torch.randn(batch, 10, generator=g))


def random_key_mask(batch: int, text: int, image: int, seed: int = 0) -> torch.Tensor:
    """Text first (padded at random per sample, not as a prefix), then image keys, all real."""
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.rand(batch, text, generator=g) < torch.rand(batch, 1, generator=g)
    return torch.cat([text_mask, torch.ones(batch, image, dtype=torch.bool)], dim=1)


@pytest.mark.parametrize("text,image", [(160, 144), (40, 88), (256, 256)])
def test_key_padding_block_mask_equals_create_block_mask(text, image):
    """The O(B N) construction gives the same tiles as evaluating the mask over every (query, key) pair."""
    key_mask = random_key_mask(3, text, image)
    key_mask[1, :128] = False  # a whole empty tile in one sample
    n = text + image
    ours = key_padding_block_mask(key_mask, n)
    ref = create_block_mask(lambda b, h, q, kv: key_mask[b, kv], 3, None, n, n, device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert ours.seq_lengths == ref.seq_lengths


def test_flex_equals_naive_with_random_padding_forward_and_gradients(monkeypatch):
    """FlexAttention with our block mask = the masked reference, values and gradients (2 x 128-token tiles,
    some empty, full and partial). PyTorch's public wrapper refuses a CPU backward, so the check is lifted to
    run its dense implementation: the same mask semantics the CUDA kernel is given."""
    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    g = torch.Generator().manual_seed(1)
    key_mask = random_key_mask(3, 160, 100, seed=2)
    key_mask[2, :140] = False
    q, k, v = (torch.randn(3, 2, 260, 16, generator=g, requires_grad=True) for _ in range(3))
    block_mask = key_padding_block_mask(key_mask, 260)
    out = fa.flex_attention(q, k, v, block_mask=block_mask)
    ref = naive_attention(q, k, v, key_mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert grads[1][0, :, ~key_mask[0]].abs().max() == 0  # padded keys get no gradient


def test_flex_model_equals_naive_model_in_inference():
    """The whole model with attention=flex (CPU: dense implementation, inference) = attention=naive."""
    cond = padded_condition(3, lengths=(100, 60))
    x, t = torch.randn(3, 16, 16, 16), torch.rand(3)  # 64 image + 160 text tokens: two tiles
    outs = {}
    for name in ("flex", "naive", "auto", "sdpa"):
        model = MMDiT(config(attention=name)).eval()
        randomize_(model)
        with torch.no_grad():
            outs[name] = model(x, t, cond)
    for name in ("flex", "auto", "sdpa"):
        torch.testing.assert_close(outs[name], outs["naive"], rtol=1e-4, atol=1e-5, msg=name)


def test_flex_training_on_cpu_is_an_error_that_names_the_fix():
    q = torch.randn(1, 1, 8, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="model.attention=auto"):
        flex_attention_fn(q, q, q, None)


@pytest.mark.parametrize("attention", ["auto", "sdpa", "naive", "flex"])
@pytest.mark.parametrize("slot", ["padded", "dropped"])
def test_nan_in_a_padded_or_dropped_text_slot_changes_no_output(attention, slot):
    """fp16 encoders can leave NaN in masked slots; 0 x NaN = NaN inside P.V unless the slots are zeroed."""
    model = MMDiT(config(attention=attention)).eval()
    randomize_(model)
    cond = padded_condition(2)
    x, t = torch.randn(2, 16, 8, 8), torch.rand(2)
    keep = torch.tensor([[True, True, True], [True, False, True]])  # sample 1 drops encoder 1
    with torch.no_grad():
        clean = model(x, t, cond.keep(keep))
        poisoned = TextCondition([tok.clone() for tok in cond.tokens], cond.masks, cond.pooled)
        if slot == "padded":
            poisoned.tokens[0][1, ~cond.masks[0][1]] = float("nan")
        else:
            poisoned.tokens[1][1, 0] = float("nan")
        out = model(x, t, poisoned.keep(keep))
    assert not out.isnan().any()
    assert torch.equal(out, clean)


def test_keep_zeroes_dropped_tokens_and_pooled_even_when_nan():
    cond = padded_condition(2)
    cond.tokens[0][0] = float("nan")
    cond.pooled[0] = float("nan")
    dropped = cond.keep(torch.tensor([[False, True, False], [True, True, True]]))
    assert torch.equal(dropped.tokens[0][0], torch.zeros_like(dropped.tokens[0][0]))
    assert torch.equal(dropped.pooled[0], torch.zeros(10)) and torch.equal(dropped.pooled[1], cond.pooled[1])
    assert not dropped.masks[0][0].any()


def test_plan_is_unmasked_sdpa_without_padding_and_masked_sdpa_on_cpu_with_it():
    full = torch.ones(2, 30, dtype=torch.bool)
    assert plan_attention("auto", full) == (sdpa_attention, None)
    padded = full.clone()
    padded[0, 3] = False
    attend, mask = plan_attention("auto", padded)
    assert attend is sdpa_attention and torch.equal(mask, padded[:, None, None, :])
    attend, mask = plan_attention("flex", padded)
    assert attend is flex_attention_fn and isinstance(mask, fa.BlockMask)
    assert plan_attention("flex", full)[1] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's fused kernel and backward need CUDA")
def test_auto_on_cuda_uses_flex_and_matches_naive_forward_and_backward():
    key_mask = random_key_mask(2, 160, 256).cuda()
    attend, mask = plan_attention("auto", key_mask)
    assert attend is flex_attention_fn
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 416, 64, device="cuda", generator=g, requires_grad=True) for _ in range(3))
    out, ref = attend(q, k, v, mask), naive_attention(q, k, v, key_mask)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_trimmed_length_is_the_longest_caption_rounded_up_to_16():
    def mask(lengths, width):
        return torch.arange(width)[None] < torch.tensor(lengths)[:, None]

    assert trimmed_length(mask([3, 17, 5], 128)) == 32
    assert trimmed_length(mask([16, 2], 128)) == 16
    assert trimmed_length(mask([0, 0], 128)) == 16  # all dropped: keep one tile
    assert trimmed_length(mask([70, 3], 77)) == 77  # capped at the padded length
    assert trimmed_length(mask([3], 10)) == 10
    holes = torch.zeros(2, 64, dtype=torch.bool)
    holes[1, 40] = True  # not a prefix: the last real token counts
    assert trimmed_length(holes) == 48
    with pytest.raises(ValueError, match="multiple=0"):
        trimmed_length(holes, 0)


def test_trimming_the_condition_changes_no_output():
    cond = padded_condition(3, lengths=(128, 77))
    cond.masks[0][:, 20:] = False
    cond.masks[1][:, 40:] = False
    trimmed = cond.trimmed()
    assert [tok.shape[1] for tok in trimmed.tokens] == [32, 48] and trimmed.masks[1].shape == (3, 48)
    model = MMDiT(config())
    randomize_(model)
    x, t = torch.randn(3, 16, 8, 8), torch.rand(3)
    with torch.no_grad(), warnings.catch_warnings():
        torch.testing.assert_close(model(x, t, trimmed), model(x, t, cond), rtol=1e-5, atol=1e-6)


def test_xformers_plan_packs_the_real_keys_without_a_dense_bias():
    """xformers is not installed here: the plan (packed keys, per-sample key counts) is checked against the
    masked reference by running the block-diagonal attention it describes, sample by sample."""
    from mmdit.model.attention import PackedKeys, pack_for_varlen, xformers_attention

    key_mask = random_key_mask(3, 40, 24, seed=3)
    key_mask[1, :40] = False  # a sample with no text at all
    attend, keys = plan_attention("xformers", key_mask)
    assert attend is xformers_attention and isinstance(keys, PackedKeys)
    assert keys.q_len == 64 and keys.kv_lengths == key_mask.sum(1).tolist()
    assert [f for f in vars(keys).values() if isinstance(f, torch.Tensor)] == [keys.keep]  # O(B N), nothing else
    assert plan_attention("xformers", torch.ones(3, 64, dtype=torch.bool)) == (xformers_attention, None)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 2, 64, 8, generator=g) for _ in range(3))
    qp, kp, vp = pack_for_varlen(q, k, v, keys)
    assert qp.shape == (1, 3 * 64, 2, 8) and kp.shape == vp.shape == (1, sum(keys.kv_lengths), 2, 8)
    out, start = [], 0
    for i, n in enumerate(keys.kv_lengths):  # what BlockDiagonalMask means: block i = sample i's queries x keys
        qi = qp[:, 64 * i:64 * (i + 1)].transpose(1, 2)
        ki, vi = (x[:, start:start + n].transpose(1, 2) for x in (kp, vp))
        out.append(naive_attention(qi, ki, vi, None))
        start += n
    torch.testing.assert_close(torch.cat(out), naive_attention(q, k, v, key_mask), rtol=1e-5, atol=1e-6)
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ModuleNotFoundError, match="xformers"):
            keys.block_diagonal()
