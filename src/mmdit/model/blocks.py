"""The joint (two-stream) transformer block of MMDiT with adaLN-Zero modulation."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionFn
from .positions import apply_rotary


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift per sample, as one fused multiply-add over the tokens."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with the weight cast to the input's dtype: under bf16 autocast the fp32 weight would otherwise
    keep CUDA off its fused kernel (PyTorch warns "Mismatch dtype between input and weight")."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class SwiGLU(nn.Module):
    """W2(SiLU(W1 x) * W3 x), hidden width mlp_ratio x dim (three matrices: one more than GELU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class StreamLayers(nn.Module):
    """The weights one stream (image or text) owns inside a joint block.

    ``pre_only`` streams (the text stream of the last block) only contribute keys and values.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, mlp_type: str, qk_norm: bool, pre_only: bool):
        super().__init__()
        self.heads, self.pre_only = heads, pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        head_dim = dim // heads
        self.q_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.adaLN = nn.Linear(dim, (2 if pre_only else 6) * dim)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            hidden = int(dim * mlp_ratio)
            self.mlp = SwiGLU(dim, hidden) if mlp_type == "swiglu" else GeluMLP(dim, hidden)

    def qkv_heads(self, x: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Modulated pre-norm, projection to token-major [B, N, H, Dh] queries/keys/values, QK RMSNorm.

        Token-major views of the fused projection: concatenating the streams along N and transposing to
        [B, H, N, Dh] for attention then needs no copies, and neither do their gradients on the way back.
        """
        b, n, _ = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), shift, scale)).view(b, n, 3, self.heads, -1).unbind(2)
        return self.q_norm(q), self.k_norm(k), v

    def mlp_branch(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return self.mlp(modulate(self.norm2(x), shift, scale))


class JointBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly over the concatenated tokens.

    Pre-norm residuals: attention output is added to the block input, then the MLP output to that sum.
    All adaLN projections start at zero, so a fresh block is the identity. ``checkpoint`` is this block's
    activation-checkpointing policy in training: none, attention, mlp, attention+mlp or full (the whole block
    recomputed in the backward, only its inputs kept).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, mlp_type: str, qk_norm: bool, last: bool,
                 attention: Optional[AttentionFn] = None, checkpoint: str = "none"):
        super().__init__()
        if checkpoint not in BLOCK_CHECKPOINTS:
            raise ValueError(f"block checkpoint={checkpoint!r}; choose one of {BLOCK_CHECKPOINTS}")
        self.image = StreamLayers(dim, heads, mlp_ratio, mlp_type, qk_norm, pre_only=False)
        self.text = StreamLayers(dim, heads, mlp_ratio, mlp_type, qk_norm, pre_only=last)
        self.attention = attention
        self.checkpoint = checkpoint

    def _attend(self, img: Tensor, txt: Tensor, mod_img: list[Tensor], mod_txt: list[Tensor], mask: Any,
                rope: Optional[Tensor], attend: AttentionFn) -> tuple[Tensor, Tensor]:
        qi, ki, vi = self.image.qkv_heads(img, mod_img[0], mod_img[1])
        qt, kt, vt = self.text.qkv_heads(txt, mod_txt[0], mod_txt[1])
        if rope is not None:  # image tokens only; text tokens carry no position
            rope = rope.unsqueeze(-2)  # [N, 1, Dh/2]: the same rotation for every head
            qi, ki = apply_rotary(qi, rope), apply_rotary(ki, rope)
        # text first, then image: [B, H, L + N, Dh]; the key mask is laid out the same way
        q, k, v = (torch.cat(pair, 1).transpose(1, 2) for pair in ((qt, qi), (kt, ki), (vt, vi)))
        out = attend(q, k, v, mask).transpose(1, 2).flatten(2)  # [B, N, dim]
        out_txt, out_img = out.split([txt.shape[1], img.shape[1]], dim=1)
        return out_img, out_txt

    def forward(self, img: Tensor, txt: Tensor, y: Tensor, mask: Any, rope: Optional[Tensor],
                attend: Optional[AttentionFn] = None) -> tuple[Tensor, Optional[Tensor]]:
        """``mask`` is what ``attend`` takes (see attention.plan_attention); ``attend`` defaults to the block's."""
        attend = attend or self.attention
        if attend is None:
            raise ValueError("JointBlock got no attention function: pass attend= or build it with attention=")
        if self.checkpoint == "full" and self.training:
            return checkpoint(self._forward, img, txt, y, mask, rope, attend, use_reentrant=False)
        return self._forward(img, txt, y, mask, rope, attend)

    def _forward(self, img: Tensor, txt: Tensor, y: Tensor, mask: Any, rope: Optional[Tensor],
                 attend: AttentionFn) -> tuple[Tensor, Optional[Tensor]]:
        mod_img = self.image.adaLN(y).chunk(6, dim=-1)
        mod_txt = self.text.adaLN(y).chunk(2 if self.text.pre_only else 6, dim=-1)
        if self.checkpoint in ("attention", "attention+mlp") and self.training:
            attn_img, attn_txt = checkpoint(self._attend, img, txt, mod_img, mod_txt, mask, rope, attend,
                                            use_reentrant=False)
        else:
            attn_img, attn_txt = self._attend(img, txt, mod_img, mod_txt, mask, rope, attend)
        img = self._residual(self.image, img, attn_img, mod_img)
        txt = None if self.text.pre_only else self._residual(self.text, txt, attn_txt, mod_txt)
        return img, txt

    def _residual(self, stream: StreamLayers, x: Tensor, attn: Tensor, mod: list[Tensor]) -> Tensor:
        _, _, gate_attn, shift_mlp, scale_mlp, gate_mlp = mod
        x = torch.addcmul(x, gate_attn[:, None], stream.proj(attn))
        if self.checkpoint in ("mlp", "attention+mlp") and self.training:
            mlp = checkpoint(stream.mlp_branch, x, shift_mlp, scale_mlp, use_reentrant=False)
        else:
            mlp = stream.mlp_branch(x, shift_mlp, scale_mlp)
        return torch.addcmul(x, gate_mlp[:, None], mlp)


BLOCK_CHECKPOINTS = ("none", "attention", "mlp", "attention+mlp", "full")
