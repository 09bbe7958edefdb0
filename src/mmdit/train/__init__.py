"""Distributed training: topology, loader -> model transport, the trainer loop, stopping, checkpoints."""

from __future__ import annotations

import logging

import torch.distributed as dist

from ..config import Config

log = logging.getLogger(__name__)


def run(cfg: Config) -> int:
    """Run this process's part of a training job and return its exit code (0 = done or stopped cleanly).

    Every rank ends in one barrier over the whole world, after the final checkpoint is written: no rank
    (and so no node's torchrun) exits while another still saves or needs the rendezvous store. A model rank
    whose data stream broke after the final save (its loader died during the stop) skips the barrier and
    returns 1: the checkpoint is complete, the job is not.
    """
    from .runtime import init_runtime
    from .trainer import train

    rt = init_runtime(cfg)
    from ..hub_access import quiet_progress_bars

    quiet_progress_bars(show=rt.rank == 0)  # one rank's "Loading weights" bars, not every rank's
    summary = train(cfg, rt)
    log.info("rank %d finished: %s", rt.rank, summary)
    if summary.get("stream_error"):
        return 1
    if rt.distributed:
        dist.barrier(group=rt.data_group)
        rt.liveness.stop()
    return 0
