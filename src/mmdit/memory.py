"""Memory per GPU of a training config under DDP and FSDP: ``python -m mmdit memory --config <preset> --gpus N``.

Bytes per parameter (N parameters, S = GPUs the model is sharded over: S = 1 under DDP, the model ranks
under FSDP): fp32 weights 4/S, fp32 gradients 4/S, AdamW moments 8/S, the EMA 4/S. On top: under DDP,
autocast's bf16 copy of every weight lives through forward and backward (2 N); under FSDP, the gathered
bf16 parameters of two units (the one computing and the one prefetched) and one unit's unsharded bf16 and
fp32 gradients before its reduce-scatter.

Activations are not a formula guessed from a paper: they are measured from this code's own saved
tensors (``saved_tensors_hooks``) on one sample of the preset's largest bucket, with the preset's MLP,
QK-norm and text lengths but a narrow width (2 heads of the preset's head size), once at depth 2 and once
at 3, and scaled: per block linearly in width and batch, times depth. Saved tensors are all linear in
width except attention's log-sum-exp (flash-style kernels keep no N x N matrix, on CUDA as on the CPU
kernel measured here). With full checkpointing a block keeps only its inputs (image and text tokens in
bf16), and one block's activations exist again during its recompute. Figures are estimates of what the
allocator holds at the peak, not of fragmentation or the CUDA context (~1 GiB).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from .config import Config, ModelConfig, load_config

GIB = 2**30


@dataclass
class MemoryEstimate:
    """Bytes per GPU, by what holds them."""

    parallel: str
    gpus: int
    params: int
    weights: float
    gradients: float
    optimizer: float
    ema: float
    transient: float  # DDP: autocast weight copies; FSDP: gathered units and their unsharded gradients
    activations: float
    activations_checkpointed: float

    def total(self, checkpointed: bool) -> float:
        act = self.activations_checkpointed if checkpointed else self.activations
        return self.weights + self.gradients + self.optimizer + self.ema + self.transient + act


def tokens_per_sample(cfg: Config) -> tuple[int, int]:
    """(image tokens at the largest bucket, text tokens: every sequence encoder's max_length)."""
    side = cfg.model.max_res // cfg.model.pixel_step
    text = sum(e.max_length for e in cfg.encoders.text if e.kind == "sequence") or 256
    return side * side, text


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond, dtype: torch.dtype) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward (weights and their casts excluded)."""
    weights = {tuple(p.shape) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        shape = tuple(tensor.shape)
        if not (tensor.dim() <= 2 and (shape in weights or shape[::-1] in weights)):
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(x, t, cond)
    return sum(seen.values())


def measured_activations(cfg: Config, batch: int, dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(bytes of the whole model's saved activations at ``batch``, of one block) without checkpointing."""
    from .conditioning import TextCondition
    from .model import MMDiT

    m = cfg.model
    image_tokens, text_tokens = tokens_per_sample(cfg)
    narrow_dim = 2 * m.head_dim
    sizes = {}
    for depth in (2, 3):
        small = dataclasses.replace(m, depth=depth, hidden_size=narrow_dim, num_heads=2, checkpoint="none",
                                    checkpoint_attn=False, checkpoint_mlp=False)
        torch.manual_seed(0)
        model = MMDiT(small).train()
        side = m.max_res // m.latent_factor
        x = torch.randn(1, m.in_channels, side, side)
        lengths = [e.max_length for e in cfg.encoders.text if e.kind == "sequence"] or [text_tokens]
        cond = TextCondition(tokens=[torch.randn(1, n, d) for n, d in zip(lengths, m.text_dims)],
                             masks=[torch.ones(1, n, dtype=torch.bool) for n in lengths],
                             pooled=torch.randn(1, m.pooled_dim) if m.pooled_dim else None)
        sizes[depth] = _saved_bytes(model, x, torch.rand(1), cond, dtype)
    scale = batch * m.dim / narrow_dim
    per_block = (sizes[3] - sizes[2]) * scale
    return sizes[2] * scale + (m.depth - 2) * per_block, per_block


def unit_params(m: ModelConfig) -> tuple[int, int]:
    """(parameters of one JointBlock, of the root unit: embedders and output layer), meta device."""
    from .model import MMDiT

    with torch.device("meta"):
        model = MMDiT(m)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    return block, total - m.depth * block


def estimate(cfg: Config, gpus: int, parallel: str, activations: tuple[float, float] | None = None) -> MemoryEstimate:
    """The memory of one GPU of a ``gpus``-GPU job at the preset's per-GPU batch (``data.batch_size``)."""
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel={parallel!r}; choose ddp or fsdp")
    if gpus < 1:
        raise ValueError(f"gpus={gpus}; give the number of model GPUs (1 or more)")
    block, root = unit_params(cfg.model)
    n = cfg.model.depth * block + root
    shards = gpus if parallel == "fsdp" else 1
    act, per_block = activations or measured_activations(cfg, cfg.data.batch_size)
    image_tokens, text_tokens = tokens_per_sample(cfg)
    kept_inputs = cfg.model.depth * cfg.data.batch_size * (image_tokens + text_tokens) * cfg.model.dim * 2
    if parallel == "ddp":
        transient = 2.0 * n
    else:
        unit = max(block, root)
        transient = unit * (2 * 2 + 2 + 4)
    return MemoryEstimate(parallel, gpus, n, 4 * n / shards, 4 * n / shards, 8 * n / shards, 4 * n / shards,
                          transient, act, kept_inputs + per_block)


def table(cfg: Config, gpu_counts: list[int]) -> list[str]:
    """Lines of a per-GPU memory table (GiB) for DDP and FSDP at each GPU count."""
    acts = measured_activations(cfg, cfg.data.batch_size)
    image_tokens, text_tokens = tokens_per_sample(cfg)
    head = (f"params {unit_params(cfg.model)[0] * cfg.model.depth + unit_params(cfg.model)[1]:,}; batch "
            f"{cfg.data.batch_size}/GPU at {cfg.model.max_res} px ({image_tokens} image + {text_tokens} text tokens)")
    lines = [head, f"{'parallel':>8} {'gpus':>4} {'weights':>8} {'grads':>8} {'adamw':>8} {'ema':>8} {'transient':>9} "
             f"{'acts':>8} {'acts_ckpt':>9} {'total':>8} {'total_ckpt':>10}"]
    for parallel in ("ddp", "fsdp"):
        for g in gpu_counts if parallel == "fsdp" else [gpu_counts[0]]:
            e = estimate(cfg, g, parallel, acts)
            lines.append(f"{parallel:>8} {g if parallel == 'fsdp' else 'any':>4} {e.weights / GIB:8.1f} "
                         f"{e.gradients / GIB:8.1f} {e.optimizer / GIB:8.1f} {e.ema / GIB:8.1f} "
                         f"{e.transient / GIB:9.1f} {e.activations / GIB:8.1f} {e.activations_checkpointed / GIB:9.1f} "
                         f"{e.total(False) / GIB:8.1f} {e.total(True) / GIB:10.1f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmdit memory", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="preset name in configs/ or a YAML path")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8], help="model GPUs (FSDP shards over them)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (e.g. data.batch_size=64)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    print("\n".join(table(load_config(args.config, args.overrides), args.gpus)))
    print("GiB per GPU; ddp: a full copy on every GPU (the GPU count does not matter); acts_ckpt: "
          "model.checkpoint=full")


if __name__ == "__main__":
    main()
