"""Held-out validation loss: velocity MSE at a fixed timestep grid with fixed noise per sample.

SD3 (Esser et al. 2024, sec. 5.1) shows that this loss tracks image quality. The grid is the mid-quantiles
of the training law (:func:`mmdit.flow.timestep_grid`), shifted per bucket by the training shift rule; the
noise of sample ``id`` at grid point ``k`` comes from a CPU generator seeded by (eval.seed, id), so the
number is a deterministic function of the weights. Conditions are never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..conditioning import TextCondition
from ..config import Config
from ..flow import flow_loss, image_tokens, shift_timesteps, timestep_grid, timestep_shift


@dataclass
class EncodedChunk:
    """A chunk of the eval set encoded once: latents [B, C, h, w] and its text condition, on the CPU."""

    number: int
    ids: np.ndarray
    latents: Tensor
    cond: TextCondition


def chunk_noise(ids: np.ndarray, num_timesteps: int, shape: tuple[int, ...], seed: int) -> Tensor:
    """[K, B, *shape] float32 noise; sample ``ids[b]``'s draws depend only on (seed, id)."""
    per_sample = []
    for sample_id in ids:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(sample_id)]).generate_state(1)[0]))
        per_sample.append(torch.randn((num_timesteps, *shape), generator=g))
    return torch.stack(per_sample, dim=1)


@torch.no_grad()
def chunk_losses(model: torch.nn.Module, chunk: EncodedChunk, cfg: Config, device: torch.device,
                 dtype: torch.dtype) -> Tensor:
    """Per-timestep sums of the per-sample velocity MSE of one chunk: float64 [K] (divide by the count)."""
    x0 = chunk.latents.to(device, torch.float32)
    cond = chunk.cond.to(device)
    n, _, h, w = x0.shape
    f = cfg.model.latent_factor
    shift = timestep_shift(cfg.flow, image_tokens(cfg.model, h * f, w * f))
    grid = shift_timesteps(timestep_grid(cfg.flow, cfg.eval.num_timesteps), shift)
    noise = chunk_noise(chunk.ids, len(grid), tuple(x0.shape[1:]), cfg.eval.seed)
    sums = torch.zeros(len(grid), dtype=torch.float64)
    for k, t_k in enumerate(grid.tolist()):
        t = torch.full((n,), t_k, dtype=torch.float32, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, per_sample = flow_loss(model, x0, cond, t, noise[k].to(device))
        sums[k] = per_sample.double().sum().cpu()
    return sums


def summarize(sums_by_chunk: dict[int, Tensor], counts_by_chunk: dict[int, int], grid: Tensor,
              prefix: str) -> dict[str, float]:
    """``{prefix}/loss`` (mean over the grid) and ``{prefix}/loss_t<t>`` per grid point, summed in chunk order."""
    total = torch.zeros(len(grid), dtype=torch.float64)
    count = 0
    for number in sorted(sums_by_chunk):
        total += sums_by_chunk[number]
        count += counts_by_chunk[number]
    if count == 0:
        raise RuntimeError("the eval set has no readable rows; check eval.parquet_folder")
    per_t = total / count
    out = {f"{prefix}/loss": float(per_t.mean())}
    out.update({f"{prefix}/loss_t{t:.3f}": float(v) for t, v in zip(grid.tolist(), per_t.tolist())})
    return out
