"""FLOPs of the MMDiT for MFU and HFU, counted as torchtitan's Flux trainer does; 2 FLOPs per multiply-add.

Each stream's matmuls run over its own tokens; adaLN modulation is per sample (y is one vector per image),
not per token; the frozen text encoders, the VAE and a REPA teacher are not counted (the REPA projector, which
trains, is added by the trainer: :meth:`mmdit.train.repa.RepaHead.train_flops`). Norms, activations and RoPE are not
matmuls and are left out. Joint attention counts what the kernel runs:

- softmax attention costs 4 n_q n_k d per block forward (Q K^T and P V), n_q = all image + text tokens; the
  keys n_k are all of them too where padded text is computed and masked (SDPA, naive, xformers), but only
  the image and the real text tokens where the kernel skips padded keys (FlexAttention's block mask,
  flash-attn varlen: :func:`skips_padded_keys`);
- ``cosine`` (linear) attention costs 4 n d d_head (K^T V, then Q (K^T V)).

Tests check the forward against PyTorch's ``FlopCounterMode`` to 2 %, and the training step too.

MFU counts 3 x forward per training step (backward = 2 x forward: input and weight gradients), except for
the input layers (patch embedding, text projections, the pooled-text MLP's first layer), whose inputs are
frozen data: their backward is the weight gradient alone, so they count 2 x forward. HFU adds what
activation checkpointing recomputes in the backward (``model.checkpoint``), the work the hardware really does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ModelConfig
from .policy import block_checkpoints
from .routing import kept_tokens, route_span

TIME_FREQ_DIM = 256  # sinusoidal features into the timestep MLP (embedders.TimestepEmbedder)

log = logging.getLogger(__name__)


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


def attention_core_flops(cfg: ModelConfig, queries: float, keys: float) -> float:
    """Forward FLOPs of one block's attention kernel for one sample (``queries`` x ``keys`` tokens)."""
    if cfg.attention == "cosine":  # linear: K^T V over every key (padded ones are zeroed, not skipped), then Q (.)
        return 2 * keys * cfg.dim * cfg.head_dim + 2 * queries * cfg.dim * cfg.head_dim
    return 4 * queries * keys * cfg.dim


def block_flops(cfg: ModelConfig, image_tokens: int, text_tokens: float, last: bool,
                attended_text: Optional[float] = None) -> BlockFlops:
    """One block's forward for one sample with ``image_tokens`` patches and ``text_tokens`` (all encoders);
    ``attended_text``: the text keys the attention kernel computes over (None = all ``text_tokens``)."""
    d, h = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    mlp_mats = 3 if cfg.mlp_type == "swiglu" else 2
    n = image_tokens + text_tokens
    keys = image_tokens + (text_tokens if attended_text is None else attended_text)
    streams_with_mlp = image_tokens + (0 if last else text_tokens)  # the last text stream is keys/values only
    return BlockFlops(
        modulation=2 * d * 6 * d + 2 * d * (2 if last else 6) * d,
        attention=2 * n * 3 * d * d + attention_core_flops(cfg, n, keys),
        projection=2 * streams_with_mlp * d * d,
        mlp=2 * streams_with_mlp * mlp_mats * d * h,
    )


def input_layer_flops(cfg: ModelConfig, image_tokens: int, text_tokens: int | Sequence[int]) -> float:
    """Forward FLOPs of the layers that read frozen data (patch embedding, text projections, the pooled MLP's
    first layer): their backward computes no input gradient, only the weight gradient."""
    d = cfg.dim
    lengths = _text_lengths(cfg, text_tokens)
    patch = cfg.in_channels * cfg.patch_size**2
    return float(2 * image_tokens * patch * d + 2 * sum(n * k for n, k in zip(lengths, cfg.text_dims)) * d
                 + 2 * cfg.pooled_dim * d)


def block_image_tokens(cfg: ModelConfig, image_tokens: int, routed: bool) -> list[int]:
    """Image tokens each block computes: fewer in the routed span when training with ``model.route``."""
    span = route_span(cfg) if routed and cfg.route else range(0)
    return [kept_tokens(image_tokens, cfg.route) if i in span else image_tokens for i in range(cfg.depth)]


def forward_flops(cfg: ModelConfig, image_tokens: int, text_tokens: int | Sequence[int],
                  attended_text: Optional[float] = None, routed: bool = False) -> float:
    """Forward FLOPs for one image with ``image_tokens`` patches and text of ``text_tokens`` tokens (a total,
    or one length per encoder: the trimmed length the model computes, padding included). ``attended_text``:
    the real text tokens (all encoders) where the attention kernel skips padded keys; None = it computes all.
    ``routed``: a training forward with token routing (:mod:`.routing`)."""
    d = cfg.dim
    text = sum(_text_lengths(cfg, text_tokens))
    conditioning = 2 * (TIME_FREQ_DIM * d + d * d) + (2 * d * d if cfg.pooled_dim else 0)
    per_block = block_image_tokens(cfg, image_tokens, routed)
    blocks = sum(block_flops(cfg, per_block[i], text, i == cfg.depth - 1, attended_text).total
                 for i in range(cfg.depth))
    final = 2 * d * 2 * d + 2 * image_tokens * d * cfg.in_channels * cfg.patch_size**2
    return float(input_layer_flops(cfg, image_tokens, text_tokens) + conditioning + blocks + final)


def recompute_flops(cfg: ModelConfig, image_tokens: int, text_tokens: int | Sequence[int],
                    attended_text: Optional[float] = None) -> float:
    """Forward FLOPs that activation checkpointing (``model.checkpoint``) repeats in the backward, per image."""
    text = sum(_text_lengths(cfg, text_tokens))
    total = 0.0
    per_block = block_image_tokens(cfg, image_tokens, routed=True)
    for i, policy in enumerate(block_checkpoints(cfg.checkpoint_policy, cfg.depth)):
        f = block_flops(cfg, per_block[i], text, i == cfg.depth - 1, attended_text)
        total += {"none": 0.0, "attention": f.attention, "mlp": f.mlp, "attention+mlp": f.attention + f.mlp,
                  "full": f.total}[policy]
    return total


def _image_tokens(cfg: ModelConfig, height: int, width: int) -> int:
    step = cfg.pixel_step
    return (height // step) * (width // step)


def train_flops_per_image(cfg: ModelConfig, height: int, width: int, text_tokens: int | Sequence[int],
                          attended_text: Optional[float] = None) -> float:
    """Model FLOPs of one training step per image of height x width pixels (for MFU): 3 x forward, less the
    input-gradient half of the input layers' backward, which is never computed. Routed blocks (``model.route``)
    count the tokens they compute."""
    tokens = _image_tokens(cfg, height, width)
    return (3.0 * forward_flops(cfg, tokens, text_tokens, attended_text, routed=True)
            - input_layer_flops(cfg, tokens, text_tokens))


def hardware_flops_per_image(cfg: ModelConfig, height: int, width: int, text_tokens: int | Sequence[int],
                             attended_text: Optional[float] = None) -> float:
    """What the hardware computes per image and step: the model FLOPs plus the checkpointing recompute (HFU)."""
    return (train_flops_per_image(cfg, height, width, text_tokens, attended_text)
            + recompute_flops(cfg, _image_tokens(cfg, height, width), text_tokens, attended_text))


def skips_padded_keys(attention: str, device_type: str) -> bool:
    """Whether ``model.attention`` on this device skips padded text keys rather than computing and masking them:
    FlexAttention (``flex``, and ``auto`` on CUDA, which picks it when text is padded) and flash-attn varlen."""
    return attention in ("flex", "flash_attn") or (attention == "auto" and device_type == "cuda")


def batch_train_flops(cfg: ModelConfig, height: int, width: int, masks: Sequence[torch.Tensor],
                      skip_padded: bool) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """(model, hardware) FLOPs of one micro-batch of images height x width pixels with text ``masks`` [B, L_i].

    Where the kernel skips padded keys the count depends on the real text tokens, and is returned as a tensor
    on the masks' device (no host sync; read it when reporting): the FLOPs are linear in the attended keys, so
    count(keys) = count(0) + keys x (count(1) - count(0)), summed over the batch.
    """
    b, lengths = masks[0].shape[0], [m.shape[1] for m in masks]
    if not skip_padded:
        return (b * train_flops_per_image(cfg, height, width, lengths),
                b * hardware_flops_per_image(cfg, height, width, lengths))
    keys = sum(m.sum(dtype=torch.float32) for m in masks)
    out = []
    for count in (train_flops_per_image, hardware_flops_per_image):
        zero = count(cfg, height, width, lengths, attended_text=0.0)
        out.append(b * zero + (count(cfg, height, width, lengths, attended_text=1.0) - zero) * keys)
    return out[0], out[1]


# Dense (no sparsity) bf16 tensor-core peak FLOP/s by the exact torch.cuda.get_device_name() string, from the
# vendor datasheets; GeForce cards at their bf16-with-fp32-accumulate rate.
PEAK_BF16_FLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H800": 989e12,  # SXM
    "NVIDIA H800 PCIe": 756e12,
    "NVIDIA H200": 989e12,  # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "NVIDIA A40": 150e12,
    "NVIDIA RTX 6000 Ada Generation": 364e12,
    "NVIDIA GeForce RTX 4090": 165e12,
    "NVIDIA GeForce RTX 3090": 71e12,
}

_UNKNOWN_LOGGED: set[str] = set()


def peak_flops_for(name: str) -> float:
    """Dense bf16 peak of the device named ``name`` (exact match), or 0 with one log line naming it."""
    peak = PEAK_BF16_FLOPS.get(name.strip(), 0.0)
    if not peak and name not in _UNKNOWN_LOGGED:
        _UNKNOWN_LOGGED.add(name)
        log.warning("no dense bf16 peak known for device %r: MFU is not reported; set train.peak_flops to its "
                    "peak FLOP/s (dense, no sparsity) from the vendor's datasheet", name)
    return peak


def device_peak_flops() -> float:
    """Dense bf16 peak of the current CUDA device from its exact name (0 on the CPU or if unknown: logged)."""
    if not torch.cuda.is_available():
        return 0.0
    return peak_flops_for(torch.cuda.get_device_name())
