"""Cost of the in-loop validation loss at the defaults, relative to a training step (tiny preset, CPU).

    PYTHONPATH=src python bench/eval_cost.py

Times one optimizer step (forward, backward, AdamW) at data.batch_size and one validation loss at the eval
defaults (eval.loss_samples rows x eval.num_timesteps, both weights of eval.loss_weights, in chunks of
eval.batch_size) on random inputs of the preset's shapes (the cost does not depend on the data), and prints
the fraction of wall-clock the loss takes at eval.loss_every.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mmdit.conditioning import TextCondition
from mmdit.config import load_config
from mmdit.eval.validation_loss import EncodedChunk, chunk_losses
from mmdit.flow import flow_loss, sample_timesteps
from mmdit.model import MMDiT


def condition(batch: int, dims: list[int], pooled: int, length: int = 16) -> TextCondition:
    return TextCondition([torch.randn(batch, length, d) for d in dims],
                         [torch.ones(batch, length, dtype=torch.bool) for _ in dims], torch.randn(batch, pooled))


def main() -> None:
    torch.manual_seed(0)
    cfg = load_config("tiny")
    m, side = cfg.model, cfg.model.max_res // cfg.model.latent_factor
    model = MMDiT(m)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = cfg.data.batch_size
    x0, cond = torch.randn(b, m.in_channels, side, side), condition(b, m.text_dims, m.pooled_dim)

    def train_step() -> None:
        t = sample_timesteps(b, cfg.flow)
        loss, _ = flow_loss(model, x0, cond, t, torch.randn_like(x0))
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):
        train_step()
    t0 = time.perf_counter()
    for _ in range(5):
        train_step()
    step_s = (time.perf_counter() - t0) / 5

    e = cfg.eval
    chunks = [EncodedChunk(i, np.arange(i * e.batch_size, (i + 1) * e.batch_size),
                           torch.randn(e.batch_size, m.in_channels, side, side),
                           condition(e.batch_size, m.text_dims, m.pooled_dim))
              for i in range(e.loss_samples // e.batch_size)]
    t0 = time.perf_counter()
    for _ in e.loss_weights:
        for chunk in chunks:
            chunk_losses(model, chunk, cfg, torch.device("cpu"), torch.float32)
    loss_s = time.perf_counter() - t0
    frac = loss_s / (loss_s + e.loss_every * step_s)
    print(f"train step (batch {b}): {step_s * 1e3:.1f} ms; validation loss ({e.loss_samples} rows x "
          f"{e.num_timesteps} t x {len(e.loss_weights)} weights): {loss_s:.2f} s = {loss_s / step_s:.1f} steps; "
          f"every {e.loss_every} steps: {100 * frac:.2f} % of wall-clock (one model rank)")


if __name__ == "__main__":
    main()
