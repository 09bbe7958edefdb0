"""Token routing (TREAD, Krause et al. 2025): during training a random share of the image tokens skips a
span of blocks and rejoins after it, unchanged; text tokens are never routed; inference routes nothing.

``model.route`` is the share that skips, ``model.route_start`` / ``model.route_end`` the span of blocks
(Python slice bounds; negative counts from the end). The kept tokens are a fixed number, round(N (1 - route)),
so every step has static shapes; which ones is drawn per sample from a generator seeded by (train.seed,
micro-step), the same on every model rank and after a resume, and handed to the model as indices, so an
activation-checkpointing recompute sees the same route. RoPE angles are gathered with their tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig


def route_span(cfg: ModelConfig) -> range:
    """The blocks the routed tokens go through alone."""
    return range(cfg.depth)[cfg.route_start:cfg.route_end]


def kept_tokens(num_tokens: int, route: float) -> int:
    """How many image tokens go through the span (at least one)."""
    return max(1, num_tokens - round(num_tokens * route))


def route_generator(seed: int, micro: int, device: torch.device) -> torch.Generator:
    """The route of a micro-step: the same on every model rank, independent of the noise draws."""
    state = int(np.random.SeedSequence([seed, micro, 0x7E4D]).generate_state(1)[0])
    return torch.Generator(device).manual_seed(state)


def route_indices(batch: int, num_tokens: int, route: float, generator: torch.Generator) -> Tensor:
    """Indices [B, K] of the image tokens that go through the span, ascending within each sample."""
    scores = torch.rand(batch, num_tokens, generator=generator, device=generator.device)
    keep = kept_tokens(num_tokens, route)
    return scores.argsort(dim=1)[:, :keep].sort(dim=1).values


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, D] at index [B, K] -> [B, K, D]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_angles(angles: Tensor | None, index: Tensor) -> Tensor | None:
    """RoPE angles or rotors [N, Dh/2] of the routed tokens: [B, K, Dh/2] (they broadcast over heads)."""
    return None if angles is None else angles[index]


def rejoin(full: Tensor, routed: Tensor, index: Tensor) -> Tensor:
    """The tokens that went through the span back in their places; the others as they were before it."""
    return full.scatter(1, index.unsqueeze(-1).expand(-1, -1, full.shape[-1]), routed)
