"""Tiny random-weight DINOv2 and CLIP (vision + text) of the real classes, saved like hub folders.

They load offline through :mod:`mmdit.eval.features`, the same code that loads ``facebook/dinov2-large`` and
``openai/clip-vit-large-patch14``, so tests exercise the real loading path. The CLIP tokenizer is the tiny
encoders' WordPiece one (:mod:`mmdit.encoders.tiny`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..encoders.tiny import _seed_all, _train_tokenizer, caption_corpus

IMAGE_SIZE = 28  # 2 x 2 patches of 14 px: real DINOv2 / CLIP-L patch size, tiny image
PATCH = 14
# ImageNet / CLIP normalisation constants, as the real processors ship them
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _save_processor(out: Path, processor_type: str, mean: list[float], std: list[float]) -> None:
    """A preprocessor_config.json like the real ones (resize, centre crop, normalise)."""
    config = {
        "image_processor_type": processor_type, "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
        "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean, "image_std": std,
        "resample": 3, "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(config, indent=1))


def build_tiny_dinov2(out: str | Path, seed: int = 0) -> str:
    """A ``Dinov2Model`` (width 32, 2 layers) + BitImageProcessor config in ``out``."""
    from transformers import Dinov2Config, Dinov2Model

    out = Path(out)
    _seed_all(seed + 10)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       patch_size=PATCH, image_size=IMAGE_SIZE)
    Dinov2Model(cfg).eval().save_pretrained(out)
    _save_processor(out, "BitImageProcessor", IMAGENET_MEAN, IMAGENET_STD)
    return str(out.resolve())


def build_tiny_clip(out: str | Path, seed: int = 0, model=None) -> str:
    """A ``CLIPModel`` (text and vision towers, projection 16) + tokenizer + processor config in ``out``.

    ``model``: save this CLIPModel instead of a random one (a test's hand-set weights); it must use
    :func:`tiny_clip_config`.
    """
    from transformers import CLIPModel

    out = Path(out)
    tok = _train_tokenizer(caption_corpus(400, seed), "clip")
    tok.model_max_length = 77
    if model is None:
        _seed_all(seed + 11)
        model = CLIPModel(tiny_clip_config(tok)).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _save_processor(out, "CLIPImageProcessor", CLIP_MEAN, CLIP_STD)
    return str(out.resolve())


def tiny_clip_tokenizer(seed: int = 0):
    """The tokenizer :func:`build_tiny_clip` saves (to build a matching config or model first)."""
    tok = _train_tokenizer(caption_corpus(400, seed), "clip")
    tok.model_max_length = 77
    return tok


def tiny_clip_config(tok, hidden: int = 32, projection: int = 16):
    """CLIPConfig of the tiny CLIP; bos/eos/pad ids set explicitly (transformers 5 defaults are CLIP's real ids)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def build_tiny_extractors(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """Both tiny extractors under ``out_dir``: {"dino": folder, "clip": folder}."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    return {"dino": build_tiny_dinov2(out_dir / "dinov2", seed), "clip": build_tiny_clip(out_dir / "clip", seed)}
