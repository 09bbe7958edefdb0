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


def rope_rotors(angles: Tensor) -> Tensor:
    """Unit complex numbers exp(i * angle) [N, D/2] (complex64): :func:`apply_rotary` then does one multiply."""
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate consecutive channel pairs (x[2i], x[2i+1]) of x [..., N, D] by angles [N, D/2].

    The angles broadcast against x's pairs [..., D/2]: for token-major x [B, N, H, D] pass [N, 1, D/2].

    ``angles`` are the complex rotors of :func:`rope_rotors` (what the model passes in eager mode, built once
    per grid): each pair is one complex number, so the rotation is a single complex multiply forward and
    backward. Or they are real angles (what the model passes under ``torch.compile``, which does not fuse
    complex arithmetic): then pairs rotate by cos / sin, which the compiler fuses into one kernel. Both give
    the same result. float32/float64 inputs rotate in their own precision; half-precision ones in float32.
    """
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if not angles.is_complex():
        cos, sin = angles.cos().to(work.dtype), angles.sin().to(work.dtype)
        even, odd = work.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)
    rotors = angles
    if work.stride(-1) != 1 or work.storage_offset() % 2 or any(s % 2 for s in work.stride()[:-1]):
        work = work.contiguous()  # view_as_complex needs (real, imag) adjacent and complex-aligned strides
    pairs = torch.view_as_complex(work.unflatten(-1, (-1, 2)))
    rotated = torch.view_as_real(pairs * rotors.to(pairs.dtype)).flatten(-2)
    return rotated.to(x.dtype)


def sincos_2d(height: int, width: int, dim: int, scale: float = 1.0, device=None) -> Tensor:
    """Fixed 2-D sin-cos absolute embedding [height * width, dim] (half rows, half columns)."""
    rows, cols = grid_positions(height, width, scale, device)
    freqs = _inverse_frequencies(dim // 4, device)
    parts = []
    for pos in (rows, cols):
        angle = pos[:, None] * freqs
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=-1).float()
