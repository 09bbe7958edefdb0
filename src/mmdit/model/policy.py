"""Speed policies applied to a built model: which blocks checkpoint what, and regional compilation.

Regional compilation (as torchtitan does for Flux): each JointBlock is compiled on its own with
``fullgraph=True``. Every block has the same code, so they share one compiled graph (compile time of one
block, not of the whole depth), a graph break is an error rather than a silent slowdown, and the glue around
the blocks (embedders, the once-per-forward attention plan) stays eager. ``nn.Module.compile`` compiles in
place, so parameter names, state dicts and checkpoints are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from .blocks import BLOCK_CHECKPOINTS


def block_checkpoints(policy: str, depth: int) -> list[str]:
    """Per-block checkpointing for ``model.checkpoint``: one of BLOCK_CHECKPOINTS for every block, or
    ``every_k:<k>``: blocks 0, k, 2k, ... fully checkpointed, the others not (memory between none and full)."""
    if policy.startswith("every_k:"):
        k = int(policy.partition(":")[2])
        return ["full" if i % k == 0 else "none" for i in range(depth)]
    if policy not in BLOCK_CHECKPOINTS:
        raise ValueError(f"model.checkpoint={policy!r}; choose one of {[*BLOCK_CHECKPOINTS, 'every_k:<k>']}")
    return [policy] * depth


def compile_enabled(setting: Optional[bool], device: torch.device | str) -> bool:
    """``train.compile`` / ``sample.compile``: None means on for CUDA, off on the CPU."""
    return torch.device(device).type == "cuda" if setting is None else bool(setting)


def compile_blocks(model: nn.Module, backend: str | Callable = "inductor", mode: Optional[str] = None) -> nn.Module:
    """Compile every JointBlock of ``model`` in place (fullgraph) and return the model.

    The model is told (``blocks_compiled``) so that it hands the blocks real RoPE angles: complex rotors,
    its eager choice, do not compile.
    """
    from .blocks import JointBlock

    blocks = [m for m in model.modules() if isinstance(m, JointBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no JointBlock to compile")
    for block in blocks:
        block.compile(backend=backend, mode=mode, fullgraph=True)
    model.blocks_compiled = True
    return model
