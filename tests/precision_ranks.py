"""A 2-rank gloo worker for the precision tests: the same tiny MMDiT and batches trained a few SGD steps under
each mode (DDP / FSDP x fp32 / bf16) through :class:`mmdit.train.parallel.ParallelModel`, the trainer's own
wrapper, with hooks that record the dtypes the timestep, ``time_scale``, the RoPE angles and the blocks'
weights have inside the forward."""

from __future__ import annotations

import os

import torch

from mmdit.conditioning import TextCondition
from mmdit.config import ModelConfig, TopologyConfig
from mmdit.flow import flow_loss
from mmdit.model import MMDiT
from mmdit.model.blocks import JointBlock
from mmdit.precision import precision_of
from mmdit.train.parallel import ParallelModel
from mmdit.train.runtime import Runtime
from mmdit.train.topology import build_topology

MODES = [("ddp", "fp32"), ("ddp", "bf16"), ("fsdp", "fp32"), ("fsdp", "bf16")]
STEPS, LR, BATCH = 3, 0.5, 2  # per rank


def model_config() -> ModelConfig:
    return ModelConfig(depth=2, hidden_size=64, num_heads=4, text_dims=[8, 4], pooled_dim=7, in_channels=4,
                       latent_factor=8, max_res=128, max_res_orig=128)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TextCondition]:
    """This rank's share of step ``step``: latents, t, noise and a padded two-encoder condition."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x0, eps = torch.randn(BATCH, 4, 8, 8, generator=g), torch.randn(BATCH, 4, 8, 8, generator=g)
    t = torch.rand(BATCH, generator=g) * 0.98 + 0.01
    tokens = [torch.randn(BATCH, 5, 8, generator=g), torch.randn(BATCH, 3, 4, generator=g)]
    masks = [torch.rand(BATCH, 5, generator=g) > 0.3, torch.rand(BATCH, 3, generator=g) > 0.3]
    for m in masks:
        m[:, 0] = True
    return x0, t, eps, TextCondition(tokens, masks, torch.randn(BATCH, 7, generator=g))


def fresh_model() -> MMDiT:
    """Identical on every rank; zero-initialised gates and output perturbed so the output and all gradients
    are non-zero; blocks take real RoPE angles (what compiled blocks get: a floating input that an FSDP cast
    would round; eager complex rotors are not floating)."""
    torch.manual_seed(0)
    model = MMDiT(model_config())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.blocks_compiled = True
    return model


def record_dtypes(model: MMDiT, seen: dict[str, set]) -> None:
    """Forward pre-hooks (after FSDP's own, so weights are already gathered) that note the dtypes."""

    def time_hook(module, args):
        seen["t"].add(str(args[0].dtype))
        seen["time_scale"].add(str(module.time_scale.dtype))

    def block_hook(module, args):
        seen["rope"].add(str(args[4].dtype))
        seen["block_weights"].add(str(module.image.qkv.weight.dtype))
        seen["block_activations"].add(str(args[0].dtype))

    model.condition.time.register_forward_pre_hook(time_hook)
    for block in model.modules():
        if isinstance(block, JointBlock):
            block.register_forward_pre_hook(block_hook)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = p.detach().float().clone()
    return out


def train_mode(parallel: str, precision_name: str, rt: Runtime) -> dict:
    model = fresh_model()
    precision = precision_of(precision_name, rt.device, parallel)
    pm = ParallelModel(model, parallel, rt, precision if parallel == "fsdp" else None)
    seen: dict[str, set] = {k: set() for k in ("t", "time_scale", "rope", "block_weights", "block_activations")}
    record_dtypes(model, seen)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grad_norms = [], []
    for step in range(STEPS):
        x0, t, eps, cond = batch(rt.rank, step)
        with precision.autocast_context(rt.device):
            loss, _ = flow_loss(pm.net, x0, cond, t, eps)
        loss.backward()
        grad_norms.append(float(pm.clip_grad_norm_(1e9)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(float(mean) / rt.world_size)
    return {"losses": losses, "grad_norms": grad_norms, "weights": full_weights(model),
            "dtypes": {k: sorted(v) for k, v in seen.items()}}


def rank_worker(rank: int, world: int, port: int, out_file: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = torch.distributed.group.WORLD
        rt = Runtime(rank, world, rank, torch.device("cpu"), build_topology(TopologyConfig(), world, world),
                     data_group=group, model_group=group)
        results = {f"{p}-{q}": train_mode(p, q, rt) for p, q in MODES}
        if rank == 0:
            torch.save({"initial": full_weights(fresh_model()), **results}, out_file)
    finally:
        torch.distributed.destroy_process_group()
