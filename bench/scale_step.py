"""The sd3_2b rung of the scaling ladder on one GPU, next to ``python -m mmdit memory``'s estimate (issue 17).

Called by bench/gpu_suite.py after its sd3_256 variants: the sd3_2b model (depth 24, SwiGLU, full
checkpointing, compiled blocks) trains as a one-GPU job does (DDP's layout: fp32 weights, gradients, AdamW
and an EMA copy on the GPU, bf16 autocast) at the preset's batch on every caption real, and its median
step time and peak memory are reported with the estimate for the same batch. ``--tiny`` shrinks the model
so the code path runs on the CPU in seconds.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

from mmdit.conditioning import TextCondition
from mmdit.config import Config, DataConfig, EncodersConfig, ModelConfig, TextEncoderConfig
from mmdit.memory import GIB, estimate

ROOT = Path(__file__).resolve().parents[1]


def preset_config(name: str, tiny: bool) -> Config:
    """A preset's model, encoders' lengths and batch, read from the YAML files without omegaconf."""
    layers, current = [], name
    while current:
        layer = yaml.safe_load((ROOT / "configs" / f"{current}.yaml").read_text())
        layers.insert(0, layer)
        current = layer.get("defaults_from")
    model: dict = {}
    batch, text = 0, []
    for layer in layers:  # parents first: a later layer overrides
        model.update(layer.get("model", {}))
        batch = layer.get("data", {}).get("batch_size", batch)
        text = layer.get("encoders", {}).get("text", text)
    if tiny:
        model.update(depth=2, text_dims=[64, 32], pooled_dim=32, max_res=64, max_res_orig=64)
        text, batch = [{**e, "max_length": 16} for e in text], 2
    encoders = EncodersConfig(text=[TextEncoderConfig(name=e["name"], kind=e["kind"], max_length=e["max_length"])
                                    for e in text], vae="vae-unused")  # only the latent shape matters here
    return Config(model=ModelConfig(**model), encoders=encoders, data=DataConfig(batch_size=batch))


def sd3_2b_step(build_ours, time_steps, compile_blocks, device: torch.device, dtype, backend: str, tiny: bool,
                steps: int, warmup: int) -> dict:
    """Median step time and peak memory of sd3_2b on one device, with the estimate at the same batch."""
    cfg = preset_config("sd3_2b", tiny)
    m, batch = cfg.model, cfg.data.batch_size
    model = build_ours(m, device)
    if device.type == "cuda" or tiny:
        compile_blocks(model, backend=backend)
    ema = copy.deepcopy(model).requires_grad_(False)  # the trainer's EMA copy lives on the device too
    side = m.max_res // m.latent_factor
    g = torch.Generator().manual_seed(0)
    lengths = [e.max_length for e in cfg.encoders.text if e.kind == "sequence"]
    x = torch.randn(batch, m.in_channels, side, side, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    cond = TextCondition([torch.randn(batch, n, d, generator=g).to(device) for n, d in zip(lengths, m.text_dims)],
                         [torch.ones(batch, n, dtype=torch.bool, device=device) for n in lengths],
                         torch.randn(batch, m.pooled_dim, generator=g).to(device))
    timing = time_steps(model, lambda net=model: net(x, t, cond), torch.randn_like(x), dtype, warmup, steps)
    est = estimate(cfg, 1, "ddp")
    del model, ema
    params = est.params
    timing.update(batch=batch, params=params, depth=m.depth, estimate_gib=est.total(True) / GIB,
                  estimate_parts_gib={"weights+grads+adamw+ema": (est.weights + est.gradients + est.optimizer
                                                                  + est.ema) / GIB,
                                      "autocast_copies": est.transient / GIB,
                                      "activations_ckpt": est.activations_checkpointed / GIB})
    return timing
