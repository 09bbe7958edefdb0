"""The optimizer (AdamW with the right parameters exempt from weight decay, or Muon + AdamW: :mod:`.muon`), the
warmup schedule (one per parameter group kind), and the EMA of the weights."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices: norms, learnable scalars (text scales, time scale) and biases are exempt."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer``: adamw, or muon (:class:`.muon.MuonAdamW`)."""
    if cfg.optimizer == "muon":
        from .muon import MuonAdamW

        return MuonAdamW(model, cfg)
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             fused=fused or None)


def schedule_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Linear warmup from 0 over ``warmup_steps`` optimizer steps, then constant or cosine to 0."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The ``train.warmup_steps`` / ``train.lr_schedule`` factor (AdamW's groups)."""
    return schedule_factor(step, cfg.warmup_steps, cfg.lr_schedule, cfg.total_steps)


def muon_lr_factor(step: int, cfg: TrainConfig) -> float:
    """``train.muon.warmup_steps`` / ``lr_schedule``, each falling back to the train.* key when null."""
    m = cfg.muon
    return schedule_factor(step, cfg.warmup_steps if m.warmup_steps is None else m.warmup_steps,
                           cfg.lr_schedule if m.lr_schedule is None else m.lr_schedule, cfg.total_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """One LambdaLR; Muon's groups (``kind: muon``) follow their own schedule."""
    def adamw(step: int) -> float:
        return lr_factor(step, cfg)

    def muon(step: int) -> float:
        return muon_lr_factor(step, cfg)

    factors = [muon if g.get("kind") == "muon" else adamw for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


class EMA:
    """Exponential moving average of the weights, kept on the model's device: ema <- d * ema + (1 - d) * w."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        ema = list(self.model.parameters())
        live = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, live, 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
