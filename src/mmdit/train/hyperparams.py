"""At a resume the config, not the checkpoint, decides the optimizer's hyper-parameters.

``optimizer.load_state_dict`` restores every param group's values (lr, betas, weight decay, ...) and the
LR scheduler restores its ``base_lrs``: without this module, "resume with a lower LR after a spike" would
silently keep the old one. The values the optimizer was built with from the config (:func:`snapshot`, taken
before loading) are put back after loading (:func:`apply`), the schedule is re-evaluated at the restored
step, and each change is returned as one line for the log. Gradient clipping and the schedule's shape
(warmup, cosine, total steps) are read from the config at every step and need nothing here. Changes that
cannot be made at a resume (the parameters or the number of groups) fail in ``load_state_dict`` itself.
"""

from __future__ import annotations

import torch

_STRUCTURE = {"params", "initial_lr", "param_names"}  # what the state owns, not the config


def snapshot(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's hyper-parameters as the config built them (call before loading a state)."""
    return [{k: v for k, v in g.items() if k not in _STRUCTURE} | {"initial_lr": g.get("initial_lr", g["lr"])}
            for g in optimizer.param_groups]


def apply(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
          configured: list[dict]) -> list[str]:
    """Put the configured hyper-parameters back after a state was loaded; one log line per change."""
    changes = []
    for i, (group, want) in enumerate(zip(optimizer.param_groups, configured)):
        for key, value in want.items():
            loaded = group.get(key)
            if key == "lr" or _same(loaded, value):
                continue  # lr follows from initial_lr and the schedule, below
            name = "lr" if key == "initial_lr" else key
            changes.append(f"param group {i}: {name} {_fmt(loaded)} -> {_fmt(value)} from the config")
            group[key] = value
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, _factors(scheduler)):
        group["lr"] = base * factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return changes


def _factors(scheduler) -> list[float]:
    """The schedule's factor at the restored step (LambdaLR: the config's lambdas; others: lr / base)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    return [1.0 for _ in scheduler.base_lrs]


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return float(a) == float(b)
    return a == b


def _fmt(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)
