"""Positional encodings as pure functions: rotary angles (2-D axial and 1-D raster) and 2-D sin-cos tables.

Positions are in patch units. When a model is fine-tuned above the resolution it started at, positions are
multiplied by ``max_res_orig / max_res`` so the largest grid spans the same angles as before.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROPE_THETA = 10_000.0


def _inverse_frequencies(num: int, device: torch.device) -> Tensor:
    """``num`` frequencies 1, theta^(-1/num), ..., theta^(-(num-1)/num)."""
    return ROPE_THETA ** (-torch.arange(num, device=device, dtype=torch.float64) / num)


def grid_positions(height: int, width: int, scale: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Row and column index of each token of an (height x width) patch grid in raster order, times ``scale``."""
    rows = torch.arange(height, device=device, dtype=torch.float64).repeat_interleave(width)
    cols = torch.arange(width, device=device, dtype=torch.float64).repeat(height)
    return rows * scale, cols * scale


def rope_angles_2d(height: int, width: int, head_dim: int, scale: float = 1.0, device=None) -> Tensor:
    """Axial RoPE: the first half of each head rotates with the row, the second half with the column.

    Returns angles [height * width, head_dim // 2], one per rotated pair of channels.
    """
    rows, cols = grid_positions(height, width, scale, device)
    freqs = _inverse_frequencies(head_dim // 4, device)
    return torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)


def rope_angles_1d(height: int, width: int, head_dim: int, scale: float = 1.0, device=None) -> Tensor:
    """Plain RoPE over the raster index row * width + col. Returns angles [height * width, head_dim // 2]."""
    rows, cols = grid_positions(height, width, scale, device)
    index = rows * width + cols
    return index[:, None] * _inverse_frequencies(head_dim // 2, device)


def apply_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate consecutive channel pairs (x[2i], x[2i+1]) of x [..., N, D] by angles [N, D/2]."""
    cos, sin = angles.cos().to(torch.float32), angles.sin().to(torch.float32)
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def sincos_2d(height: int, width: int, dim: int, scale: float = 1.0, device=None) -> Tensor:
    """Fixed 2-D sin-cos absolute embedding [height * width, dim] (half rows, half columns)."""
    rows, cols = grid_positions(height, width, scale, device)
    freqs = _inverse_frequencies(dim // 4, device)
    parts = []
    for pos in (rows, cols):
        angle = pos[:, None] * freqs
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=-1).float()
