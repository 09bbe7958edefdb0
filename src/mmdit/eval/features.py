"""Feature extractors for the image metrics: DINOv2 (FD_DINOv2) and CLIP (CLIP score, CMMD).

Loaded by Hugging Face name or local folder through the encoders' loading code (``resolve_name``,
``load_hf_config``: the same names, offline behaviour and error messages), frozen, always in fp32 (the
references compute in fp32; bf16 features move FD by more than the differences it is used to rank).
Images arrive as uint8 [B, 3, H, W] at any size and are preprocessed on the CPU exactly as the reference
implementations do:

- DINOv2, as dgm-eval (Stein et al. 2023): PIL bicubic resize to the square crop size (224 for the real
  models; no crop, so the aspect ratio is squashed), to [0, 1], ImageNet mean / std (the processor's).
- CLIP, as torchmetrics' CLIPScore: ``CLIPProcessor`` (resize the short side, centre crop, normalise);
  text tokenized without truncation, padded, then ``input_ids`` sliced to the 77 positions (an over-long
  caption loses its EOS, as in torchmetrics).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..encoders.text import load_hf_config, resolve_name


class ExtractorError(ValueError):
    """A feature extractor that is not the kind asked for; the message names the name and the fix."""


def model_revision(path: str, config) -> str:
    """The hub commit a model was loaded from, or for a local folder a digest of its config and weight sizes."""
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return str(commit)
    folder = Path(path)
    h = hashlib.sha256()
    for f in sorted(folder.glob("*")):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin")):
            h.update(f.name.encode() + str(f.stat().st_size).encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return "local-" + h.hexdigest()[:12]


def pil_resize_normalize(images: Tensor, side: int, mean: list[float], std: list[float]) -> Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, side, side]: PIL bicubic to side x side, /255, (x - mean) / std.

    dgm-eval's ``TF.Resize((224, 224), BICUBIC)`` on a PIL image is PIL's bicubic resize (with its own
    antialiasing), then ``ToTensor`` and ``Normalize``: the same steps, without torchvision.
    """
    from PIL import Image

    out = []
    for a in images.permute(0, 2, 3, 1).cpu().numpy():
        resized = Image.fromarray(a).resize((side, side), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class DinoFeatures:
    """DINOv2's CLS token after the final LayerNorm (``pooler_output``): the FD_DINOv2 representation."""

    def __init__(self, name: str, device: torch.device | str):
        from transformers import AutoImageProcessor, AutoModel

        self.device, self.dtype = torch.device(device), torch.float32
        self.name, path = name, resolve_name(name)
        config = load_hf_config(path, f"DINOv2 feature extractor (eval.dino={name!r})")
        if getattr(config, "model_type", "") not in ("dinov2", "dinov2_with_registers"):
            raise ExtractorError(f"eval.dino={name!r} is a {config.model_type!r} model, not DINOv2; use e.g. "
                                 "facebook/dinov2-large (dgm-eval's ViT-L/14)")
        self.model = AutoModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
        proc = AutoImageProcessor.from_pretrained(path)
        crop = getattr(proc, "crop_size", None) or {}
        self.side = int(crop.get("height") or 224)
        self.mean, self.std = [float(v) for v in proc.image_mean], [float(v) for v in proc.image_std]
        self.dim = int(config.hidden_size)
        self.revision = model_revision(path, config)

    def recipe(self) -> dict[str, str]:
        """Everything that changes the features: the statistics cache is keyed by it."""
        return {"extractor": self.name, "revision": self.revision, "dtype": str(self.dtype).removeprefix("torch."),
                "device": self.device.type, "resize": f"pil_bicubic_{self.side}x{self.side}",
                "normalize": json.dumps([self.mean, self.std])}

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] -> float64 features [B, dim] on the CPU."""
        x = pil_resize_normalize(images, self.side, self.mean, self.std).to(self.device)
        return self.model(pixel_values=x).pooler_output.double().cpu()


class ClipFeatures:
    """CLIP's projected image and text embeddings (the CLIP-score space of Hessel et al. 2021)."""

    def __init__(self, name: str, device: torch.device | str):
        from transformers import CLIPModel, CLIPProcessor

        self.device, self.dtype = torch.device(device), torch.float32
        self.name, path = name, resolve_name(name)
        config = load_hf_config(path, f"CLIP feature extractor (eval.clip={name!r})")
        if getattr(config, "model_type", "") != "clip" or not hasattr(config, "vision_config"):
            raise ExtractorError(f"eval.clip={name!r} is a {config.model_type!r} model, not a full CLIP (text and "
                                 "vision); use e.g. openai/clip-vit-large-patch14")
        self.model = CLIPModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(path)  # what torchmetrics' CLIPScore loads
        self.max_length = int(config.text_config.max_position_embeddings)
        self.revision = model_revision(path, config)

    def recipe(self) -> dict[str, str]:
        """Everything that changes the image embeddings (the CMMD cache key)."""
        proc = self.processor.image_processor
        return {"extractor": self.name, "revision": self.revision, "dtype": str(self.dtype).removeprefix("torch."),
                "device": self.device.type, "processor": type(proc).__name__,
                "resize": json.dumps([getattr(proc, "size", None), getattr(proc, "crop_size", None)], default=str)}

    @torch.no_grad()
    def images(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] -> image embeddings [B, P] (float32, CPU)."""
        pixels = self.processor(images=[im.cpu() for im in images], return_tensors="pt")["pixel_values"]
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return self.model.visual_projection(pooled).float().cpu()

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> Tensor:
        """Prompts -> text embeddings [B, P] (float32, CPU); ``input_ids`` cut to CLIP's 77 positions."""
        batch = self.processor(text=list(prompts), return_tensors="pt", padding=True)
        ids, mask = batch["input_ids"][..., :self.max_length], batch["attention_mask"][..., :self.max_length]
        pooled = self.model.text_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).pooler_output
        return self.model.text_projection(pooled).float().cpu()


def describe(path: str | Path) -> dict:
    """Name and size of an extractor folder's config (for the metrics' provenance)."""
    f = Path(resolve_name(str(path))) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {"name": str(path)}
