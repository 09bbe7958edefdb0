"""Process-level set-up: ranks, device, process groups, liveness, and the stop request (:mod:`.stopping`).

Groups are created on every rank in the same order: the world group (NCCL on CUDA, gloo on CPU; used only
for the set-up barrier), a gloo group over all ranks for the loader -> model data path and the stop
protocol, and the group of model ranks that DDP reduces over.
``topology.timeout_s`` bounds only the set-up; then every group waits for a live peer without a limit
(:data:`UNBOUNDED`) and :mod:`.liveness` finds dead ones (the reasoning is in :mod:`.stopping`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store

from ..config import Config
from ..model.policy import compile_enabled
from .liveness import Liveness
from .stopping import StopRequest, start_compile_workers
from .topology import Topology, build_topology

UNBOUNDED = timedelta(days=3650)  # "no limit" for a wait on a live peer (gloo and NCCL want a finite value)


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    topology: Topology
    data_group: object = None  # gloo group over all ranks (None when single-process)
    model_group: object = None  # group of model ranks (None when single-process)
    stop: StopRequest = field(default_factory=StopRequest)
    liveness: Liveness | None = None  # the heartbeat thread (None when single-process)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_loader(self) -> bool:
        return self.topology.is_loader(self.rank)

    @property
    def is_main(self) -> bool:
        """The first model rank writes checkpoints, logs and validation images."""
        return self.rank == self.topology.model_ranks[0]

    @property
    def num_model_ranks(self) -> int:
        return len(self.topology.model_ranks)


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_runtime(cfg: Config) -> Runtime:
    """Read torchrun's environment (or run as one plain process), build the topology and the groups."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    topology = build_topology(cfg.topology, world, local_world)
    device = _pick_device(local_rank)
    rt = Runtime(rank, world, local_rank, device, topology)
    compiles = (cfg.encoders.compile,) if topology.is_loader(rank) else (cfg.train.compile, cfg.sample.compile)
    if any(compile_enabled(c, device) for c in compiles):
        start_compile_workers()  # before the stop handler: the workers ignore stop signals (mmdit.train.stopping)
    rt.stop.install()
    if world == 1:
        return rt
    backend = cfg.topology.backend if cfg.topology.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    join = timedelta(seconds=cfg.topology.timeout_s)
    dist.init_process_group(backend, timeout=join, device_id=device if backend == "nccl" else None)
    # gloo's sends and receives wait as long as the timeout their group's context was built with (setting it
    # later does not reach them), so the groups that do the work are built unbounded; the world group, with
    # the join timeout, serves only the set-up barrier
    rt.data_group = dist.new_group(backend="gloo", timeout=UNBOUNDED)
    rt.model_group = dist.new_group(list(topology.model_ranks), timeout=UNBOUNDED)
    dist.barrier()  # every rank is connected within the join timeout
    roles = {r: "loader rank" if topology.is_loader(r) else "model rank" for r in range(world)}
    rt.liveness = Liveness(_get_default_store(), rank, world, roles, cfg.topology.heartbeat_s,
                           cfg.topology.dead_peer_s).start()
    return rt
