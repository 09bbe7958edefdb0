"""Distributed training: topology, loader -> model transport, the trainer loop, checkpoints."""

from __future__ import annotations

import logging

import torch.distributed as dist

from ..config import Config

log = logging.getLogger(__name__)


def run(cfg: Config) -> int:
    """Run this process's part of a training job and return its exit code (0 = done or stopped cleanly)."""
    from .runtime import init_runtime
    from .trainer import train

    rt = init_runtime(cfg)
    try:
        summary = train(cfg, rt)
    except Exception:
        if rt.is_loader and rt.stop_requested[0]:
            log.info("loader rank %d: model ranks stopped; exiting", rt.rank)
            return 0
        raise
    log.info("rank %d finished: %s", rt.rank, summary)
    if rt.distributed and not rt.stop_requested[0]:
        dist.barrier(group=rt.data_group)  # rank 0 hosts the store: nobody leaves while others still need it
    return 0
