"""Matmul FLOPs of the MMDiT, for MFU: 2 FLOPs per multiply-add, training = 3 x forward."""

from __future__ import annotations

from ..config import ModelConfig


def forward_flops(cfg: ModelConfig, image_tokens: int, text_tokens: int) -> float:
    """Forward FLOPs for one image with ``image_tokens`` patches and ``text_tokens`` text tokens."""
    d = cfg.dim
    hidden = int(d * cfg.mlp_ratio)
    mlp_mats = 3 if cfg.mlp_type == "swiglu" else 2
    per_token_stream = 2 * (3 * d * d + d * d + mlp_mats * d * hidden)  # qkv, out proj, MLP
    pre_only = 2 * 3 * d * d  # last block's text stream: qkv only
    n = image_tokens + text_tokens
    attention = 2 * 2 * n * n * d  # QK^T and AV
    blocks = cfg.depth * (image_tokens * per_token_stream + attention) + (cfg.depth - 1) * text_tokens * (
        per_token_stream) + text_tokens * pre_only
    embed = 2 * image_tokens * d * cfg.in_channels * cfg.patch_size**2 * 2  # patch in + out
    text_in = 2 * text_tokens * d * (sum(cfg.text_dims) / max(1, len(cfg.text_dims)))
    return float(blocks + embed + text_in)


def train_flops_per_image(cfg: ModelConfig, height: int, width: int, text_tokens: int) -> float:
    """Forward + backward FLOPs for one image of height x width pixels."""
    step = cfg.pixel_step
    tokens = (height // step) * (width // step)
    return 3.0 * forward_flops(cfg, tokens, text_tokens)


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def device_peak_flops() -> float:
    """Dense bf16 peak of the current CUDA device from its name (0 if unknown or on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 0.0)
