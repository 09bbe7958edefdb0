"""Regional compilation and activation-checkpointing policies: same numbers, no graph breaks, one graph
shared by the blocks."""

import pytest
import torch
from conditions import randomize_
from torch._dynamo.testing import CompileCounter

from mmdit.conditioning import TextCondition
from mmdit.config import ConfigError, ModelConfig
from mmdit.model import MMDiT
from mmdit.model.attention import plan_attention
from mmdit.model.policy import block_checkpoints, compile_blocks, compile_enabled

TEXT_DIMS = [12, 20]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def config(**kw) -> ModelConfig:
    base = dict(depth=3, hidden_size=32, num_heads=2, text_dims=TEXT_DIMS, pooled_dim=10, in_channels=16,
                latent_factor=8, max_res=256, max_res_orig=256)
    base.update(kw)
    return ModelConfig(**base)


def padded_inputs(batch: int = 2, seed: int = 0, real=(3, 9)):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(batch, 16, d, generator=g) for d in TEXT_DIMS]
    masks = [torch.arange(16)[None] < torch.tensor(real[: batch])[:, None] for _ in TEXT_DIMS]
    cond = TextCondition(tokens, masks, torch.randn(batch, 10, generator=g))
    return torch.randn(batch, 16, 8, 8, generator=g), torch.rand(batch, generator=g), cond


def gradients(model: torch.nn.Module, inputs) -> dict[str, torch.Tensor]:
    model.train().zero_grad()
    out = model(*inputs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_checkpoint_policy_expands_per_block():
    assert block_checkpoints("every_k:2", 5) == ["full", "none", "full", "none", "full"]
    assert block_checkpoints("mlp", 2) == ["mlp", "mlp"]
    assert [b.checkpoint for b in MMDiT(config(checkpoint_attn=True)).blocks] == ["attention"] * 3
    assert [b.checkpoint for b in MMDiT(config(checkpoint_attn=True, checkpoint_mlp=True)).blocks] == [
        "attention+mlp"] * 3
    with pytest.raises(ConfigError, match="every_k needs a whole number"):
        config(checkpoint="every_k:0")
    with pytest.raises(ConfigError, match="model.checkpoint='most'"):
        config(checkpoint="most")
    with pytest.raises(ConfigError, match="older aliases"):
        config(checkpoint="full", checkpoint_mlp=True)


@pytest.mark.parametrize("policy", ["attention", "mlp", "attention+mlp", "full", "every_k:2"])
def test_each_checkpoint_policy_gives_the_gradients_of_none(policy):
    inputs = padded_inputs()
    plain = MMDiT(config())
    randomize_(plain)
    ckpt = MMDiT(config(checkpoint=policy))
    ckpt.load_state_dict(plain.state_dict())
    ref, got = gradients(plain, inputs), gradients(ckpt, inputs)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_compile_defaults_to_cuda_only():
    assert compile_enabled(None, "cuda") and not compile_enabled(None, "cpu")
    assert compile_enabled(True, "cpu") and not compile_enabled(False, "cuda")


def test_blocks_share_one_graph_and_new_masks_do_not_recompile():
    """Regional compile: the identical blocks compile once (the last, keys-only block once more), and a
    forward with other padding of the same shapes reuses the graphs."""
    torch._dynamo.reset()
    counter = CompileCounter()
    model = compile_blocks(MMDiT(config(depth=4)), backend=counter)
    randomize_(model)
    with torch.no_grad():
        model(*padded_inputs(seed=0))
        model(*padded_inputs(seed=1, real=(5, 1)))
    assert counter.frame_count == 2, counter.frame_count


@pytest.mark.parametrize("policy", ["none", "full", "attention+mlp"])
def test_regionally_compiled_model_with_checkpointing_matches_eager(policy):
    """aot_eager traces forward and backward as inductor does (no C++ compile): checkpointing composes."""
    torch._dynamo.reset()
    inputs = padded_inputs()
    eager = MMDiT(config(checkpoint=policy))
    randomize_(eager)
    compiled = MMDiT(config(checkpoint=policy))
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, backend="aot_eager")
    ref, got = gradients(eager, inputs), gradients(compiled, inputs)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_block_traces_without_graph_break_with_padding(attention):
    """The block with padding present, for both kernels auto picks (flex: the CUDA path, traced on CPU)."""
    torch._dynamo.reset()
    model = MMDiT(config(attention=attention)).eval()
    x, t, cond = padded_inputs()
    key_mask = torch.cat([torch.cat(cond.masks, 1), torch.ones(2, 16, dtype=torch.bool)], 1)
    attend, mask = plan_attention(attention, key_mask)
    assert mask is not None
    img, txt, y = torch.randn(2, 16, 32), torch.randn(2, 32, 32), torch.randn(2, 32)
    rope = model.rope_angles(4, 4, torch.device("cpu"))
    with torch.no_grad():
        explained = torch._dynamo.explain(model.blocks[0])(img, txt, y, mask, rope, attend)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_inductor_compiled_blocks_match_eager_with_padding():
    """Real inductor (C++ on the CPU) on a one-block model: forward and gradients as eager, with padding."""
    torch._dynamo.reset()
    inputs = padded_inputs()
    eager = MMDiT(config(depth=1, hidden_size=32, num_heads=2))
    randomize_(eager)
    compiled = MMDiT(config(depth=1, hidden_size=32, num_heads=2))
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), eager(*inputs), rtol=1e-4, atol=1e-5)
    ref, got = gradients(eager, inputs), gradients(compiled, inputs)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
