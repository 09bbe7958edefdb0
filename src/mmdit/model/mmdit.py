"""MMDiT: patch embedding, conditioning, a stack of joint blocks, and the adaLN-Zero output layer."""

from __future__ import annotations

from dataclasses import fields
from functools import lru_cache
from typing import Union

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from ..conditioning import TextCondition
from ..config import ModelConfig
from .attention import check_backend, plan_attention
from .blocks import JointBlock, modulate
from .embedders import ConditionEmbedder, patchify, unpatchify
from .policy import block_checkpoints
from .positions import rope_angles_1d, rope_angles_2d, rope_rotors, sincos_2d
from .routing import gather_angles, gather_tokens, rejoin, route_span

ROPE_ANGLES = {"RoPE2d": rope_angles_2d, "RoPE": rope_angles_1d}


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear back to patch pixels; starts at zero so the first prediction is 0."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class MMDiT(nn.Module, PyTorchModelHubMixin, library_name="mmdit", tags=["text-to-image", "mmdit", "rectified-flow"],
            repo_url="https://github.com/mmdit/mmdit", pipeline_tag="text-to-image"):
    """Predicts the flow velocity v = eps - x0 for a latent x [B, C, H, W] at times t [B] given text.

    A Hub model too: ``save_pretrained(folder)`` writes config.json (the ModelConfig) + model.safetensors,
    ``MMDiT.from_pretrained(folder or hub id)`` reads them back (strictly), ``push_to_hub(repo_id)`` uploads.
    """

    def __init__(self, cfg: Union[ModelConfig, dict]):
        super().__init__()
        if isinstance(cfg, dict):  # from config.json (PyTorchModelHubMixin); unknown keys are an error
            known = {f.name for f in fields(ModelConfig)}
            unknown = sorted(set(cfg) - known)
            if unknown:
                raise ValueError(f"config.json has keys {unknown} that ModelConfig does not know; it was written "
                                 "by a newer mmdit: upgrade mmdit")
            cfg = ModelConfig(**cfg)
        self.cfg = cfg
        dim, p = cfg.dim, cfg.patch_size
        self.patch_embed = nn.Linear(cfg.in_channels * p * p, dim)
        self.condition = ConditionEmbedder(dim, list(cfg.text_dims), cfg.pooled_dim, cfg.time_scale_init)
        check_backend(cfg.attention)
        plan = block_checkpoints(cfg.checkpoint_policy, cfg.depth)
        self.blocks = nn.ModuleList(
            JointBlock(dim, cfg.heads, cfg.mlp_ratio, cfg.mlp_type, cfg.qk_norm, last=i == cfg.depth - 1,
                       checkpoint=plan[i])
            for i in range(cfg.depth)
        )
        self.blocks_compiled = False  # set by policy.compile_blocks
        self.final = FinalLayer(dim, cfg.in_channels * p * p)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier for linears; adaLN projections and the output layer at zero (every block starts as identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.condition.time.mlp[0].weight, std=0.02)
        nn.init.normal_(self.condition.time.mlp[2].weight, std=0.02)
        for block in self.blocks:
            for stream in (block.image, block.text):
                nn.init.zeros_(stream.adaLN.weight)
                nn.init.zeros_(stream.adaLN.bias)
        for layer in (self.final.adaLN, self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        """As PyTorchModelHubMixin, but strict by default: weights that do not fit the config are an error."""
        return super()._from_pretrained(strict=strict, **kwargs)

    @property
    def position_scale(self) -> float:
        """RoPE / absolute position interpolation factor when fine-tuning above the original resolution."""
        return self.cfg.max_res_orig / self.cfg.max_res

    def rope_angles(self, grid_h: int, grid_w: int, device: torch.device) -> Tensor | None:
        """Rotation angles [tokens, head_dim / 2] of the image tokens (None without RoPE)."""
        fn = ROPE_ANGLES.get(self.cfg.pos_encoding)
        return None if fn is None else _cached(fn, grid_h, grid_w, self.cfg.head_dim, self.position_scale, device)

    def rope_rotors(self, grid_h: int, grid_w: int, device: torch.device) -> Tensor | None:
        """exp(i * angles) of :meth:`rope_angles`, built once per grid and device (what the blocks apply)."""
        fn = ROPE_ANGLES.get(self.cfg.pos_encoding)
        return None if fn is None else _cached_rotors(fn, grid_h, grid_w, self.cfg.head_dim, self.position_scale,
                                                      device)

    def forward(self, x: Tensor, t: Tensor, cond: TextCondition, route: Tensor | None = None,
                hidden_at: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """``route``: indices [B, K] of the image tokens that go through the routed span alone (training with
        ``model.route``, :mod:`.routing`); None runs every token through every block. ``hidden_at``: also return
        the image-stream output tokens of that block, [B, N, D] ([B, K, D] inside a routed span), as
        ``(velocity, tokens)`` (REPA, :mod:`mmdit.train.repa`)."""
        b, c, h, w = x.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by model.patch_size={p}")
        if c != self.cfg.in_channels:
            raise ValueError(f"input has {c} channels, model.in_channels={self.cfg.in_channels}")
        if hidden_at is not None and not 0 <= hidden_at < self.cfg.depth:
            raise ValueError(f"hidden_at={hidden_at} is not a block of model.depth={self.cfg.depth}")
        grid_h, grid_w = h // p, w // p
        img = self.patch_embed(patchify(x, p).to(self.patch_embed.weight.dtype))  # FSDP: bf16 weights, fp32 x
        if self.cfg.pos_encoding == "absolute":
            pos = _cached(sincos_2d, grid_h, grid_w, self.cfg.dim, self.position_scale, x.device)
            img = img + pos.to(img.dtype)
        txt, text_mask, y = self.condition(t, cond)
        # joint tokens are text first, then image; image keys are always real
        key_mask = torch.cat([text_mask, torch.ones(b, img.shape[1], dtype=torch.bool, device=x.device)], dim=1)
        # once per forward, outside the blocks: the kernel, and its mask (None when nothing is padded)
        attend, mask = plan_attention(self.cfg.attention, key_mask)
        # compiled code gets real angles (cos / sin, fused by the compiler): complex rotors do not compile
        traced = torch.compiler.is_compiling() or self.blocks_compiled
        rope = (self.rope_angles if traced else self.rope_rotors)(grid_h, grid_w, x.device)
        span = route_span(self.cfg) if route is not None else range(0)
        for i, block in enumerate(self.blocks):
            if i == span.start and span:  # the routed tokens go on alone, with their positions and their mask
                full, full_rope, full_plan = img, rope, (attend, mask)
                img, rope = gather_tokens(img, route), gather_angles(rope, route)
                attend, mask = plan_attention(self.cfg.attention, key_mask[:, : txt.shape[1] + route.shape[1]])
            img, txt = block(img, txt, y, mask, rope, attend)
            if i == hidden_at:
                hidden = img
            if span and i == span.stop - 1:  # the others rejoin where they were
                img, rope, (attend, mask) = rejoin(full, img, route), full_rope, full_plan
        velocity = unpatchify(self.final(img, y), p, c, h, w)
        return velocity if hidden_at is None else (velocity, hidden)


@lru_cache(maxsize=64)
def _cached(fn, grid_h: int, grid_w: int, dim: int, scale: float, device: torch.device) -> Tensor:
    """Position tables depend only on the grid, so each bucket's table is built once per device."""
    return fn(grid_h, grid_w, dim, scale, device=device)


@lru_cache(maxsize=64)
def _cached_rotors(fn, grid_h: int, grid_w: int, dim: int, scale: float, device: torch.device) -> Tensor:
    return rope_rotors(_cached(fn, grid_h, grid_w, dim, scale, device))


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    return sum(p.numel() for p in model.parameters())
