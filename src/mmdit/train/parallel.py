"""How the model ranks share the MMDiT: ``train.parallel=ddp`` (a full copy per rank, gradients all-reduced)
or ``fsdp`` (FSDP2: weights, gradients, AdamW state and EMA sharded over the model ranks).

FSDP2 is applied as torchtitan does: activation checkpointing is already inside each JointBlock (the
model's policy), then regional compilation of every block (``train.compile``), then ``fully_shard`` of each
JointBlock (one unit: its parameters are all-gathered just before its forward and freed after it) and the
root last (embedders and the output layer). The mesh is built from ``rt.model_group``: loader ranks hold no
part of the model and are not in it. Mixed precision follows ``train.precision`` (:mod:`mmdit.precision`):
bf16 gathers each unit in bf16 and reduces gradients in fp32 (the sharded master weights and AdamW stay
fp32), fp32 keeps everything fp32 (auto: bf16 on CUDA, fp32 on the CPU). Forward inputs are never cast:
the timestep and RoPE angles stay fp32.

The optimizer must be built after wrapping: FSDP2 replaces each parameter with a sharded ``DTensor``.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..config import ConfigError
from ..model.blocks import JointBlock
from ..precision import Precision, precision_of

log = logging.getLogger(__name__)


def check_parallel(parallel: str, distributed: bool) -> None:
    """FSDP shards over the model ranks of a torchrun job: a single process has nothing to shard over."""
    if parallel == "fsdp" and not distributed:
        raise ConfigError("train.parallel=fsdp needs a torchrun job (a process group over the model ranks); "
                          "one process holds the whole model anyway: use train.parallel=ddp")


def mixed_precision(precision: Precision):
    """FSDP2's policy for ``precision``: gather in its parameter dtype, reduce in its reduce dtype, and leave
    forward inputs alone (``cast_forward_inputs=False``): a cast would round the timestep and the RoPE angles
    that the root hands to every block; the model casts its activations' inputs itself."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=precision.params, reduce_dtype=precision.reduce,
                                cast_forward_inputs=False)


def model_mesh(model_group, device: torch.device):
    """A 1-D DeviceMesh over exactly the model ranks (loader ranks are outside it)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(model_group, device.type, mesh_dim_names=("fsdp",))


def shard_model(model: nn.Module, mesh, mp_policy, ignored: Optional[set] = None) -> nn.Module:
    """``fully_shard`` every JointBlock, then the root (in place; parameter names are unchanged);
    ``ignored`` parameters stay plain, replicated tensors."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for m in model.modules() if isinstance(m, JointBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no JointBlock to shard")
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again first in backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, ignored_params=ignored or None)
    return model


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


class ShardedEMA:
    """The EMA of FSDP-sharded weights, sharded the same way: each rank averages only its shard.

    Holds one DTensor per parameter name (same mesh and placements as the live weight), so the sharded
    checkpoint saves it like the weights and :meth:`full_state_dict` gathers it for an export.
    """

    def __init__(self, model: nn.Module):
        self.shards = {name: p.detach().clone() for name, p in model.named_parameters()}
        self._names = list(self.shards)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        live = dict(model.named_parameters())
        ema = [_local(self.shards[n]) for n in self._names]
        torch._foreach_lerp_(ema, [_local(live[n].detach()) for n in self._names], 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Sharded tensors (what torch.distributed.checkpoint saves and loads in place)."""
        return self.shards

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Shard full tensors (a DDP checkpoint's EMA, the same on every rank) into this rank's part."""
        missing = sorted(set(self.shards) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:4]} ({len(missing)} in all)")
        for name, shard in self.shards.items():
            full = state[name].to(device=shard.device, dtype=shard.dtype)
            if isinstance(shard, DTensor):
                full = distribute_tensor(full, shard.device_mesh, shard.placements)
            shard.copy_(full)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA on every rank (a collective: every model rank calls it)."""
        return {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in self.shards.items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t



class ParallelModel:
    """The model as the training step sees it: the module to call, gradient sync per micro-step, clipping.

    ``ddp``: a DDP wrapper over ``rt.model_group`` (None for a lone model rank: the model itself).
    ``fsdp``: the model sharded in place (see the module docstring). FSDP2 cannot shard 0-d parameters
    (the learnable time and text scales): they stay replicated plain tensors outside FSDP, and their
    gradients are averaged over the model ranks here, as DDP would. Build the optimizer and EMA after this.
    ``precision`` (:func:`mmdit.precision.precision_of`, FSDP only: DDP's weights and reduction are fp32 and
    autocast is the caller's) defaults to ``train.precision=auto``. ``extra``: parameters trained beside the
    model but outside it (the REPA projector, :mod:`.repa`): plain and replicated under either kind, their
    gradients averaged over the model ranks and clipped together with the model's.
    """

    def __init__(self, model: nn.Module, parallel: str, rt, precision: Optional[Precision] = None,
                 extra: Optional[list[nn.Parameter]] = None):
        self.model, self.kind = model, parallel
        self.group = rt.model_group if rt.distributed else None
        self.num_ranks = rt.num_model_ranks
        self.ddp = None
        self.extra = list(extra or [])
        self.replicated: list[nn.Parameter] = []
        if parallel == "fsdp":
            check_parallel(parallel, rt.distributed)
            self.replicated = [p for p in model.parameters() if p.dim() == 0]
            precision = precision or precision_of("auto", rt.device, "fsdp")
            shard_model(model, model_mesh(rt.model_group, rt.device), mixed_precision(precision),
                        ignored=set(self.replicated))
        elif rt.distributed and rt.num_model_ranks > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(model, process_group=rt.model_group, gradient_as_bucket_view=True)

    @property
    def net(self) -> nn.Module:
        return self.ddp or self.model

    def grad_sync(self, sync: bool):
        """A context for one micro-step's backward: gradients are reduced only on the last of an accumulation."""
        import contextlib

        if self.ddp is not None and not sync:
            return self.ddp.no_sync()
        if self.kind == "fsdp":
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Average the gradients of the replicated (FSDP) and extra parameters over the model ranks, then clip
        all by the global norm (a plain tensor: the norm of sharded gradients is combined over the model ranks)."""
        extra = [p for p in self.extra if p.grad is not None]
        self._average([p.grad for p in extra])
        params = [p for p in self.model.parameters() if p.grad is not None] + extra
        if self.kind != "fsdp":
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        self._average([p.grad.reshape(1) for p in self.replicated if p.grad is not None])
        sharded = [p for p in params if isinstance(p, DTensor)]
        plain = [p for p in params if not isinstance(p, DTensor)]
        norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in (sharded, plain) if group]
        total = torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]).norm()
        for group in (sharded, plain):
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total

    def _average(self, grads: list[torch.Tensor]) -> None:
        """Gradients of plain parameters replicated on every model rank: their mean over the ranks, in place."""
        if not grads or self.num_ranks <= 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, group=self.group)
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip((flat / self.num_ranks).split(
            [g.numel() for g in grads]), grads)])
