"""FLOPs of the MMDiT for MFU and HFU, counted as torchtitan's Flux trainer does; 2 FLOPs per multiply-add.

Each stream's matmuls run over its own tokens; joint attention costs 4 n^2 d per block forward (Q K^T and
P V over all n = image + text tokens, padded text included: it is computed); adaLN modulation is per sample
(y is one vector per image), not per token; the frozen text encoders and the VAE are not counted. Norms,
activations and RoPE are not matmuls and are left out. A test checks the forward against PyTorch's
``FlopCounterMode`` to 2 %.

MFU counts 3 x forward per training step (backward = 2 x forward). HFU adds what activation checkpointing
recomputes in the backward (``model.checkpoint``), the work the hardware really does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import ModelConfig
from .policy import block_checkpoints

TIME_FREQ_DIM = 256  # sinusoidal features into the timestep MLP (embedders.TimestepEmbedder)


@dataclass(frozen=True)
class BlockFlops:
    """Forward FLOPs of one joint block for one sample, split the way checkpointing recomputes them."""

    modulation: float  # adaLN projections of y
    attention: float  # QKV projections of both streams and the core 4 n^2 d
    projection: float  # attention output projections
    mlp: float

    @property
    def total(self) -> float:
        return self.modulation + self.attention + self.projection + self.mlp


def _text_lengths(cfg: ModelConfig, text_tokens: int | Sequence[int]) -> list[float]:
    """Per-encoder token counts; a plain total is split evenly over the encoders."""
    if isinstance(text_tokens, int):
        return [text_tokens / len(cfg.text_dims)] * len(cfg.text_dims)
    if len(text_tokens) != len(cfg.text_dims):
        raise ValueError(f"text_tokens has {len(text_tokens)} lengths but model.text_dims has "
                         f"{len(cfg.text_dims)} encoders; give one length per sequence encoder")
    return [float(n) for n in text_tokens]


def block_flops(cfg: ModelConfig, image_tokens: int, text_tokens: float, last: bool) -> BlockFlops:
    """One block's forward for one sample with ``image_tokens`` patches and ``text_tokens`` (all encoders)."""
    d, h = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    mlp_mats = 3 if cfg.mlp_type == "swiglu" else 2
    n = image_tokens + text_tokens
    streams_with_mlp = image_tokens + (0 if last else text_tokens)  # the last text stream is keys/values only
    return BlockFlops(
        modulation=2 * d * 6 * d + 2 * d * (2 if last else 6) * d,
        attention=2 * n * 3 * d * d + 4 * n * n * d,
        projection=2 * streams_with_mlp * d * d,
        mlp=2 * streams_with_mlp * mlp_mats * d * h,
    )


def forward_flops(cfg: ModelConfig, image_tokens: int, text_tokens: int | Sequence[int]) -> float:
    """Forward FLOPs for one image with ``image_tokens`` patches and text of ``text_tokens`` tokens (a total,
    or one length per encoder: the trimmed length the model computes, padding included)."""
    d = cfg.dim
    lengths = _text_lengths(cfg, text_tokens)
    text = sum(lengths)
    patch = cfg.in_channels * cfg.patch_size**2
    embed = 2 * image_tokens * patch * d + 2 * sum(n * k for n, k in zip(lengths, cfg.text_dims)) * d
    conditioning = 2 * (TIME_FREQ_DIM * d + d * d) + (2 * (cfg.pooled_dim * d + d * d) if cfg.pooled_dim else 0)
    blocks = sum(block_flops(cfg, image_tokens, text, last=i == cfg.depth - 1).total for i in range(cfg.depth))
    final = 2 * d * 2 * d + 2 * image_tokens * d * patch
    return float(embed + conditioning + blocks + final)


def recompute_flops(cfg: ModelConfig, image_tokens: int, text_tokens: int | Sequence[int]) -> float:
    """Forward FLOPs that activation checkpointing (``model.checkpoint``) repeats in the backward, per image."""
    text = sum(_text_lengths(cfg, text_tokens))
    total = 0.0
    for i, policy in enumerate(block_checkpoints(cfg.checkpoint_policy, cfg.depth)):
        f = block_flops(cfg, image_tokens, text, last=i == cfg.depth - 1)
        total += {"none": 0.0, "attention": f.attention, "mlp": f.mlp, "attention+mlp": f.attention + f.mlp,
                  "full": f.total}[policy]
    return total


def _image_tokens(cfg: ModelConfig, height: int, width: int) -> int:
    step = cfg.pixel_step
    return (height // step) * (width // step)


def train_flops_per_image(cfg: ModelConfig, height: int, width: int, text_tokens: int | Sequence[int]) -> float:
    """Model FLOPs of one training step per image of height x width pixels: 3 x forward (for MFU)."""
    return 3.0 * forward_flops(cfg, _image_tokens(cfg, height, width), text_tokens)


def hardware_flops_per_image(cfg: ModelConfig, height: int, width: int, text_tokens: int | Sequence[int]) -> float:
    """What the hardware computes per image and step: 3 x forward plus the checkpointing recompute (for HFU)."""
    tokens = _image_tokens(cfg, height, width)
    return 3.0 * forward_flops(cfg, tokens, text_tokens) + recompute_flops(cfg, tokens, text_tokens)


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def device_peak_flops() -> float:
    """Dense bf16 peak of the current CUDA device from its name (0 if unknown or on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 0.0)
