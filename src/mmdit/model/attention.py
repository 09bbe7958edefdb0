"""Attention backends over q, k, v [B, H, N, D] with a key mask [B, N] (True = attend to this token).

Each backend turns the key mask into its own mask argument once per forward (``prepare``: a broadcast SDPA
mask, a FlexAttention BlockMask, flash-attn's cumulative lengths, xformers' packed keys with a block-diagonal
mask), so no block builds masks or syncs with the host, and none builds a dense [B, H, N, N] bias. ``auto``
(the default) decides once per forward in :func:`plan_attention`: SDPA without a mask when no text is padded
(flash kernels), FlexAttention when it is on CUDA, masked SDPA on the CPU (which has no FlexAttention
backward). ``flex`` forces FlexAttention. ``sdpa`` goes through
``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN / memory-efficient kernels on CUDA, but
not flash with a mask); ``naive`` is the readable reference; ``flash_attn`` and ``xformers`` use those packages
when installed; ``cosine`` is linear attention with L2-normalised queries and keys.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .flex import flex_attention_fn, key_padding_block_mask

AttentionFn = Callable[[Tensor, Tensor, Tensor, Any], Tensor]

_PACKAGE = {"flash_attn": "flash_attn", "xformers": "xformers"}


def naive_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """softmax(q k^T / sqrt(d)) v in float32, masked keys get zero weight."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """PyTorch's fused attention; ``mask`` is the [B, 1, 1, N] broadcast key mask or None (flash kernels)."""
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


@dataclass
class VarlenKeys:
    """flash-attn varlen arguments for the padded keys, computed once per forward (one host sync)."""

    cu_k: Tensor
    max_k: int
    keep: Tensor  # flat indices of the real keys in [B * N]


def flash_attn_prepare(key_mask: Tensor, q_len: int) -> VarlenKeys:
    lengths = key_mask.sum(dim=1, dtype=torch.int32)
    return VarlenKeys(F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)), int(lengths.max()),
                      key_mask.flatten().nonzero().squeeze(1))


def flash_attn_attention(q: Tensor, k: Tensor, v: Tensor, keys: Optional[VarlenKeys]) -> Tensor:
    """flash-attn 2: dense kernel without padding, varlen kernel over the unpadded keys otherwise."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    b, h, n, d = q.shape
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, N, H, D]
    if keys is None:
        return flash_attn_func(qt, kt, vt).transpose(1, 2)
    cu_q = torch.arange(0, (b + 1) * n, n, device=q.device, dtype=torch.int32)
    out = flash_attn_varlen_func(
        qt.reshape(b * n, h, d), kt.reshape(b * n, h, d)[keys.keep], vt.reshape(b * n, h, d)[keys.keep],
        cu_seqlens_q=cu_q, cu_seqlens_k=keys.cu_k, max_seqlen_q=n, max_seqlen_k=keys.max_k,
    )
    return out.reshape(b, n, h, d).transpose(1, 2)


@dataclass
class PackedKeys:
    """xformers' varlen form of the padded keys, computed once per forward (one host sync): the batch is
    packed into one sequence, the queries of every sample kept ([B * N]) and only the real keys gathered
    (``keep``: flat indices into [B * N]); sample i's queries attend to its ``kv_lengths[i]`` keys through a
    ``BlockDiagonalMask``, never a dense [B, H, N, N] bias."""

    q_len: int
    kv_lengths: list[int]
    keep: Tensor
    _bias: Any = None

    def block_diagonal(self) -> Any:
        """xformers' BlockDiagonalMask over the packed batch, built on first use (shared by every block)."""
        if self._bias is None:
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask

            self._bias = BlockDiagonalMask.from_seqlens([self.q_len] * len(self.kv_lengths), self.kv_lengths)
        return self._bias


def xformers_prepare(key_mask: Tensor, q_len: int) -> PackedKeys:
    return PackedKeys(q_len, key_mask.sum(dim=1).tolist(), key_mask.flatten().nonzero().squeeze(1))


def pack_for_varlen(q: Tensor, k: Tensor, v: Tensor, keys: PackedKeys) -> tuple[Tensor, Tensor, Tensor]:
    """[B, H, N, D] -> [1, B * N, H, D] queries and [1, sum kv_lengths, H, D] real keys / values."""
    b, h, n, d = q.shape
    qt, kt, vt = (x.transpose(1, 2).reshape(1, b * n, h, d) for x in (q, k, v))
    return qt, kt[:, keys.keep], vt[:, keys.keep]


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, keys: Optional[PackedKeys]) -> Tensor:
    """xformers memory-efficient attention: dense without padding, else over the packed real keys with a
    block-diagonal mask (memory O(B N), as the kernel intends)."""
    import xformers.ops as xops

    b, h, n, d = q.shape
    if keys is None:
        return xops.memory_efficient_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    out = xops.memory_efficient_attention(*pack_for_varlen(q, k, v, keys), attn_bias=keys.block_diagonal())
    return out.reshape(b, n, h, d).transpose(1, 2)


@dataclass(frozen=True)
class Backend:
    """An attention kernel and ``prepare``, which turns the key mask [B, N] (padding present) and the query
    length into the kernel's mask argument, once per forward. Without padding the kernel gets None."""

    name: str
    attend: AttentionFn
    prepare: Callable[[Tensor, int], Any]


def _same(key_mask: Tensor, q_len: int) -> Tensor:
    return key_mask


def _broadcast(key_mask: Tensor, q_len: int) -> Tensor:
    return key_mask[:, None, None, :]


BACKENDS: dict[str, Backend] = {
    "sdpa": Backend("sdpa", sdpa_attention, _broadcast),
    "flex": Backend("flex", flex_attention_fn, key_padding_block_mask),
    "naive": Backend("naive", naive_attention, _same),
    "cosine": Backend("cosine", cosine_attention, _same),
    "flash_attn": Backend("flash_attn", flash_attn_attention, flash_attn_prepare),
    "xformers": Backend("xformers", xformers_attention, xformers_prepare),
}


def plan_attention(name: str, key_mask: Tensor) -> tuple[AttentionFn, Any]:
    """The kernel and its mask argument for one forward over joint tokens with ``key_mask`` [B, N].

    Taken once per forward, outside the blocks: in eager mode one host sync tells whether anything is padded;
    under torch.compile (the whole model traced) that check would break the graph, so padding is assumed.
    """
    padded = torch.compiler.is_compiling() or not bool(key_mask.all())
    if name == "auto":
        if not padded:
            return sdpa_attention, None
        name = "flex" if key_mask.is_cuda else "sdpa"
    backend = BACKENDS[name]
    return backend.attend, backend.prepare(key_mask, key_mask.shape[1]) if padded else None


def available_backends() -> list[str]:
    """Backends whose packages are importable on this machine (flash_attn also needs CUDA)."""
    names = ["auto", "sdpa", "flex", "naive", "cosine"]
    for name, package in _PACKAGE.items():
        if importlib.util.find_spec(package) is not None and (name != "flash_attn" or torch.cuda.is_available()):
            names.append(name)
    return names


def check_backend(name: str) -> None:
    """A missing optional package is an error that names it, never a silent fallback."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {['auto', *sorted(BACKENDS)]}")
    package = _PACKAGE.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ImportError(
            f"model.attention={name!r} needs the package '{package}', which is not installed; "
            f"`pip install {package.replace('_', '-')}` on a CUDA machine, or use model.attention=auto"
        )


def get_attention(name: str) -> Backend:
    """Look up a named backend (not ``auto``, which :func:`plan_attention` resolves per forward)."""
    check_backend(name)
    if name == "auto":
        raise ValueError("model.attention=auto is resolved per forward by plan_attention, not looked up")
    return BACKENDS[name]
