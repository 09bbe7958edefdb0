"""Inputs to the transformer: patches, the timestep (learnable time scale), and the text encoders' outputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conditioning import TextCondition


def patchify(x: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p] in raster order of patches."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: Tensor, patch: int, channels: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`patchify` for a latent of size height x width."""
    b = tokens.shape[0]
    x = tokens.reshape(b, height // patch, width // patch, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, height, width)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of (already scaled) times, frequencies 1 down to 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] times a learnable scale (init 1000), sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, dim: int, time_scale_init: float = 1000.0, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_scale = nn.Parameter(torch.tensor(float(time_scale_init)))
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t * self.time_scale, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class TextInput(nn.Module):
    """One sequence encoder's own RMSNorm, learnable scalar and projection to the model width.

    Encoders' hidden-state statistics differ by orders of magnitude, so each is normalised on its own.
    """

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.norm = nn.RMSNorm(in_dim, eps=1e-6)
        self.scale = nn.Parameter(torch.ones(()))
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        """proj(RMSNorm(tokens) * scale), with the norm's weight and the scale folded into the projection.

        proj((n * w) * s) = n @ (W * (w s))^T + b for the normalised tokens n: the same map, but the backward
        needs no gradient with respect to the [B, L, in_dim] tokens (frozen encoder features) to train w and
        s, only the weight gradient that the projection needs anyway.
        """
        # encoders' dtype (bf16 on CUDA) may differ from the weights' (fp32, or bf16 under FSDP)
        normed = F.rms_norm(tokens.to(self.proj.weight.dtype), self.norm.normalized_shape, None, self.norm.eps)
        return F.linear(normed, self.proj.weight * (self.norm.weight * self.scale), self.proj.bias)


class ConditionEmbedder(nn.Module):
    """Builds the text token sequence [B, sum L_i, dim] with its mask, and the conditioning vector y [B, dim].

    y = SiLU(time_mlp(t) + pooled_mlp(pooled)), applied once here rather than in every block.
    """

    def __init__(self, dim: int, text_dims: list[int], pooled_dim: int, time_scale_init: float):
        super().__init__()
        self.time = TimestepEmbedder(dim, time_scale_init)
        self.text = nn.ModuleList(TextInput(d, dim) for d in text_dims)
        self.pooled = (
            nn.Sequential(nn.Linear(pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if pooled_dim else None
        )

    def forward(self, t: Tensor, cond: TextCondition) -> tuple[Tensor, Tensor, Tensor]:
        if len(cond.tokens) != len(self.text):
            raise ValueError(f"model expects {len(self.text)} text encoders, got {len(cond.tokens)}")
        # padded / dropped slots zeroed first: a NaN there (fp16 encoders) would survive masking as 0 x NaN in P.V
        context = torch.cat([embed(torch.where(mask[..., None], tok, torch.zeros((), dtype=tok.dtype,
                                                                               device=tok.device)))
                             for embed, tok, mask in zip(self.text, cond.tokens, cond.masks)], dim=1)
        mask = torch.cat(cond.masks, dim=1)
        y = self.time(t)
        if self.pooled is not None:
            if cond.pooled is None:
                raise ValueError("model has a pooled text input (model.pooled_dim > 0) but the condition has none")
            y = y + self.pooled(cond.pooled.to(y.dtype))
        return context, mask, nn.functional.silu(y)
