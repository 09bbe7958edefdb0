"""Attention backends over q, k, v [B, H, N, D] with a key mask [B, N] (True = attend to this token).

``sdpa`` goes through ``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN / memory-efficient
kernels on CUDA); ``naive`` is the readable reference; ``flash_attn`` and ``xformers`` use those packages
when installed; ``cosine`` is linear attention with L2-normalised queries and keys.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]

_PACKAGE = {"flash_attn": "flash_attn", "xformers": "xformers"}


def naive_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """softmax(q k^T / sqrt(d)) v in float32, masked keys get zero weight."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """PyTorch's fused attention. With no padding the mask is dropped so flash kernels stay eligible (in eager
    mode: under torch.compile that check would break the graph, so the mask is kept)."""
    if key_mask is not None and not torch.compiler.is_compiling() and bool(key_mask.all()):
        key_mask = None
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def cosine_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """Linear attention: out_i = sum_j cos(q_i, k_j) v_j / n_valid, computed as q (k^T v) in O(N)."""
    q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
    vf = v.float()
    if key_mask is None:
        count = torch.full((q.shape[0], 1, 1, 1), k.shape[2], device=q.device, dtype=torch.float32)
    else:
        weight = key_mask[:, None, :, None].float()
        k, vf = k * weight, vf * weight
        count = weight.sum(dim=2, keepdim=True)
    return ((q @ (k.transpose(-1, -2) @ vf)) / count).to(v.dtype)


def cosine_attention_reference(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """Quadratic form of :func:`cosine_attention`, for tests."""
    scores = F.normalize(q.float(), dim=-1) @ F.normalize(k.float(), dim=-1).transpose(-1, -2)
    if key_mask is None:
        key_mask = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device=q.device)
    scores = scores * key_mask[:, None, None, :]
    return (scores @ v.float() / key_mask.sum(-1)[:, None, None, None]).to(v.dtype)


def flash_attn_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """flash-attn 2: dense kernel without padding, varlen kernel over the unpadded keys otherwise."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    b, h, n, d = q.shape
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, N, H, D]
    if key_mask is None or bool(key_mask.all()):
        return flash_attn_func(qt, kt, vt).transpose(1, 2)
    lengths = key_mask.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * n, n, device=q.device, dtype=torch.int32)
    keep = key_mask.flatten()
    out = flash_attn_varlen_func(
        qt.reshape(b * n, h, d), kt.reshape(b * n, h, d)[keep], vt.reshape(b * n, h, d)[keep],
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=n, max_seqlen_k=int(lengths.max()),
    )
    return out.reshape(b, n, h, d).transpose(1, 2)


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """xformers memory-efficient attention with an additive bias for masked keys."""
    import xformers.ops as xops

    bias = None
    if key_mask is not None and not bool(key_mask.all()):
        b, h, n, _ = q.shape
        # xformers wants the bias's last dim padded to a multiple of 8, then sliced back
        padded = (key_mask.shape[1] + 7) // 8 * 8
        full = torch.zeros(b, h, n, padded, device=q.device, dtype=q.dtype)
        full[..., : key_mask.shape[1]] = torch.zeros_like(key_mask, dtype=q.dtype).masked_fill(
            ~key_mask, float("-inf")
        )[:, None, None, :]
        bias = full[..., : key_mask.shape[1]]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "naive": naive_attention,
    "cosine": cosine_attention,
    "flash_attn": flash_attn_attention,
    "xformers": xformers_attention,
}


def available_backends() -> list[str]:
    """Backends whose packages are importable on this machine (flash_attn also needs CUDA)."""
    names = ["sdpa", "naive", "cosine"]
    for name, package in _PACKAGE.items():
        if importlib.util.find_spec(package) is not None and (name != "flash_attn" or torch.cuda.is_available()):
            names.append(name)
    return names


def get_attention(name: str) -> AttentionFn:
    """Look up a backend; a missing optional package is an error that names it, never a silent fallback."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    package = _PACKAGE.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ImportError(
            f"model.attention={name!r} needs the package '{package}', which is not installed; "
            f"`pip install {package.replace('_', '-')}` on a CUDA machine, or use model.attention=sdpa"
        )
    return BACKENDS[name]
