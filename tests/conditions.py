"""Shared test helpers: a random two-encoder text condition (padded masks, a pooled vector), random weights."""

import torch

from mmdit.conditioning import TextCondition


def random_condition(batch: int, seed: int = 0) -> TextCondition:
    """Encoders of 5 x 8 and 3 x 4 tokens, ~30 % padding (the first token always real), pooled width 7."""
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(batch, 5, 8, generator=g), torch.randn(batch, 3, 4, generator=g)]
    masks = [torch.rand(batch, 5, generator=g) > 0.3, torch.rand(batch, 3, generator=g) > 0.3]
    for m in masks:
        m[:, 0] = True
    return TextCondition(tokens, masks, pooled=torch.randn(batch, 7, generator=g))


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (a fresh MMDiT is the identity: zero-initialised gates and output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.dim() == 0 else 0.0))
