"""Feature extractors for the image metrics: DINOv2 (FD-DINOv2) and CLIP (CLIP score).

Loaded by Hugging Face name or local folder through the encoders' loading code (``resolve_name``,
``load_hf_config``: the same names, offline behaviour and error messages), frozen, in bf16 on CUDA and
fp32 on the CPU. Images arrive as uint8 [B, 3, H, W] at any size; preprocessing runs on the device as the
metric's reference implementation does: DINOv2 resizes to the crop size (bicubic, no crop, as dgm-eval of
Stein et al. 2023), CLIP resizes the short side and centre-crops (as CLIPImageProcessor); both normalise
with the processor's mean and std.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..encoders.text import load_hf_config, resolve_dtype, resolve_name


class ExtractorError(ValueError):
    """A feature extractor that is not the kind asked for; the message names the name and the fix."""


def _processor_settings(path: str) -> tuple[int, Tensor, Tensor]:
    """(crop side, mean [3], std [3]) from the model's preprocessor_config.json."""
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(path)
    crop = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
    side = int(crop.get("height") or crop.get("shortest_edge") or 224)
    return side, torch.tensor(proc.image_mean, dtype=torch.float32), torch.tensor(proc.image_std, dtype=torch.float32)


def _prepare(images: Tensor, side: int, mean: Tensor, std: Tensor, crop: bool, dtype: torch.dtype) -> Tensor:
    """uint8 [B, 3, H, W] -> normalised float [B, 3, side, side] in ``dtype``."""
    x = images.float() / 255.0
    if crop:
        h, w = x.shape[-2:]
        scale = side / min(h, w)
        size = (max(side, round(h * scale)), max(side, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - side) // 2, (size[1] - side) // 2
        x = x[..., top:top + side, left:left + side]
    else:
        x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 1)
    return ((x - mean.to(x.device)[:, None, None]) / std.to(x.device)[:, None, None]).to(dtype)


class DinoFeatures:
    """DINOv2's CLS token after the final LayerNorm (``pooler_output``): the FD-DINOv2 representation."""

    def __init__(self, name: str, device: torch.device | str, dtype: str | torch.dtype = "auto"):
        from transformers import AutoModel

        self.device, self.dtype = torch.device(device), resolve_dtype(dtype, device)
        self.name, path = name, resolve_name(name)
        config = load_hf_config(path, f"DINOv2 feature extractor (eval.dino={name!r})")
        if getattr(config, "model_type", "") not in ("dinov2", "dinov2_with_registers"):
            raise ExtractorError(f"eval.dino={name!r} is a {config.model_type!r} model, not DINOv2; use e.g. "
                                 "facebook/dinov2-base")
        self.model = AutoModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
        self.side, self.mean, self.std = _processor_settings(path)
        self.dim = int(config.hidden_size)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] -> float64 features [B, dim] on the CPU."""
        x = _prepare(images.to(self.device), self.side, self.mean, self.std, crop=False, dtype=self.dtype)
        return self.model(pixel_values=x).pooler_output.double().cpu()


class ClipFeatures:
    """CLIP's projected image and text embeddings (the CLIP-score space of Hessel et al. 2021)."""

    def __init__(self, name: str, device: torch.device | str, dtype: str | torch.dtype = "auto"):
        from transformers import AutoTokenizer, CLIPModel

        self.device, self.dtype = torch.device(device), resolve_dtype(dtype, device)
        self.name, path = name, resolve_name(name)
        config = load_hf_config(path, f"CLIP feature extractor (eval.clip={name!r})")
        if getattr(config, "model_type", "") != "clip" or not hasattr(config, "vision_config"):
            raise ExtractorError(f"eval.clip={name!r} is a {config.model_type!r} model, not a full CLIP (text and "
                                 "vision); use e.g. openai/clip-vit-large-patch14")
        self.model = CLIPModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_length = int(config.text_config.max_position_embeddings)
        self.side, self.mean, self.std = _processor_settings(path)

    @torch.no_grad()
    def images(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] -> image embeddings [B, P] (float32, CPU)."""
        x = _prepare(images.to(self.device), self.side, self.mean, self.std, crop=True, dtype=self.dtype)
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return self.model.visual_projection(pooled).float().cpu()

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> Tensor:
        """Prompts -> text embeddings [B, P] (float32, CPU); long prompts are truncated to CLIP's 77 tokens."""
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        out = self.model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pooled = out.pooler_output
        return self.model.text_projection(pooled).float().cpu()


def describe(path: str | Path) -> dict:
    """Name and size of an extractor folder's config (for the metrics' provenance)."""
    f = Path(resolve_name(str(path))) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {"name": str(path)}
