"""Realistic caption lengths for benchmarks: padded text as a trainer sees it, not all-real tokens.

Token counts of web-scale long captions are roughly log-normal; here the median is 40 tokens with a long tail
(sigma 0.6: ~10 % over 85 tokens), clipped to [4, max_length]. A batch is then trimmed, as the loader does, to
its longest caption rounded up to 16 (``TextCondition.trimmed``).
"""

from __future__ import annotations

import math

import torch

from mmdit.conditioning import TextCondition


def caption_lengths(batch: int, max_length: int, generator: torch.Generator, median: float = 40.0,
                    sigma: float = 0.6) -> torch.Tensor:
    """[batch] token counts drawn log-normally around ``median``, clipped to [4, max_length]."""
    draw = torch.randn(batch, generator=generator) * sigma + math.log(median)
    return draw.exp().round().clamp(4, max_length).long()


def padded_condition(tokens: list[torch.Tensor], pooled: torch.Tensor | None, generator: torch.Generator,
                     trim: bool = True) -> TextCondition:
    """A condition over full-length ``tokens`` [B, L_i, D_i] with caption lengths per sample (one draw shared
    by the encoders, as one caption feeds them all), trimmed to the batch's longest caption."""
    batch = tokens[0].shape[0]
    lengths = caption_lengths(batch, min(t.shape[1] for t in tokens), generator)
    masks = [torch.arange(t.shape[1], device=t.device)[None] < lengths.to(t.device)[:, None] for t in tokens]
    cond = TextCondition(tokens, masks, pooled)
    return cond.trimmed() if trim else cond
