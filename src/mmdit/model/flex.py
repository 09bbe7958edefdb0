"""FlexAttention over padded text: a key-padding block mask built once per forward, and the kernel call.

The mask depends only on the key: key j of sample b is attended iff ``key_mask[b, j]``. Its block structure
(which 128 x 128 tiles are empty, full or partial) is therefore computed from per-(sample, key block) counts
in O(B x N), with no host sync, instead of evaluating the mask over all B x N x N pairs as
``create_block_mask`` does; a test checks both give the same BlockMask.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # FlexAttention's default tile; its kernels are tuned for it


def key_padding_block_mask(key_mask: Tensor, q_len: int, block: int = BLOCK) -> BlockMask:
    """BlockMask for queries of length ``q_len`` attending to keys where ``key_mask`` [B, N] is True."""
    b, n = key_mask.shape
    n_kv, n_q = -(-n // block), -(-q_len // block)
    counts = F.pad(key_mask, (0, n_kv * block - n)).view(b, n_kv, block).sum(-1, dtype=torch.int32)
    # tiles that run past the sequence end hold padding, so they are partial, never full (as create_block_mask)
    q_rows_whole = torch.ones(n_q, dtype=torch.bool, device=key_mask.device)
    q_rows_whole[-1] = q_len % block == 0
    full = (counts == block)[:, None, :] & q_rows_whole[None, :, None]  # [B, n_q, n_kv]
    partial = (counts > 0)[:, None, :] & ~full

    def ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
        dense = dense.to(torch.int32)[:, None]  # [B, 1, n_q, n_kv]: one head-independent mask
        indices = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
        return dense.sum(-1, dtype=torch.int32), indices

    def mask_mod(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return key_mask[batch, kv_idx]

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(q_len, n))


_COMPILED: dict[str, object] = {}


def _compiled_flex():
    """flex_attention compiled once on its own: uncompiled it falls back to a slow dense implementation."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def flex_attention_fn(q: Tensor, k: Tensor, v: Tensor, block_mask: Optional[BlockMask]) -> Tensor:
    """FlexAttention with the forward's block mask (None = nothing padded).

    Inside a compiled region (``train.compile``) the call is fused into that graph; in eager mode on CUDA it
    goes through a separately compiled flex_attention. PyTorch has no FlexAttention backward on the CPU, so
    training there is an error that names the fix (CPU inference runs the dense implementation).
    """
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError(
            "model.attention=flex cannot train on the CPU: PyTorch has no FlexAttention backward there; "
            "use model.attention=auto (masked SDPA on the CPU) or sdpa"
        )
    if torch.compiler.is_compiling() or q.device.type == "cpu":
        return flex_attention(q, k, v, block_mask=block_mask)
    return _compiled_flex()(q, k, v, block_mask=block_mask)
