"""The frozen REPA teacher: a vision encoder whose patch features the MMDiT's image tokens are aligned to.

``train.repa.encoder`` names a DINOv2 model (``Dinov2Model`` or ``Dinov2WithRegistersModel``: a Hugging Face
name or local folder, loaded through the text encoders' name resolution and error messages), or the special
name ``effnet_lite0``: the real EfficientNet-Lite0 of :mod:`mmdit.eval.effnet_lite0`, whose last feature map
before pooling (1280 channels after the head convolution, stride 32: its most semantic one, the map the
``fd_effnet_lite0`` metric pools) stands in for patch features, the one real pretrained image network offline.

Geometry (one rule for every bucket, aspect kept): a bucket's image tokens form a grid of th x tw (pixels /
``model.pixel_step``); the teacher sees the bucket's image resized to (k th p) x (k tw p) pixels, p its
patch (or stride), k = max(1, round(image_size / (p sqrt(th tw)))) so that it sees about ``image_size``^2
pixels (REPA at 256 px: 16 x 16 tokens, 224 px, k = 1; at 512 px it doubles the teacher's input as REPA
does, k = 1 again). Its feature map is then exactly k x the token grid, and each token's target is the
mean of the k x k teacher cells covering the same pixels (:func:`pool_to_grid`): no interpolation weight
straddles two tokens and nothing is squashed, which a square resize of a 1:2 bucket would do.

DINOv2's features are its ``last_hidden_state`` patch tokens (after its final layer norm; the class and
register tokens dropped), as REPA takes them; inputs are ImageNet mean/std normalised, bicubic resized.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, RepaConfig
from .text import EncoderNotFoundError, load_hf_config, resolve_dtype, resolve_name

log = logging.getLogger(__name__)

EFFNET = "effnet_lite0"
EFFNET_STRIDE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_TYPES = ("dinov2", "dinov2_with_registers")
WHAT = "REPA teacher (train.repa.encoder)"


def token_grid(model: ModelConfig, height: int, width: int) -> tuple[int, int]:
    """The image-token grid (rows, columns) of a ``height`` x ``width`` pixel bucket."""
    return height // model.pixel_step, width // model.pixel_step


def teacher_scale(grid: tuple[int, int], patch: int, image_size: int) -> int:
    """k: teacher cells per token side, so that the teacher sees about ``image_size``^2 pixels."""
    return max(1, round(image_size / (patch * math.sqrt(grid[0] * grid[1]))))


def teacher_input_size(grid: tuple[int, int], patch: int, image_size: int) -> tuple[int, int]:
    """(height, width) in pixels of the teacher's input for a token grid ``grid`` = (th, tw)."""
    k = teacher_scale(grid, patch, image_size)
    return k * grid[0] * patch, k * grid[1] * patch


def pool_to_grid(feature_map: Tensor, grid: tuple[int, int]) -> Tensor:
    """Teacher features [B, D, k th, k tw] -> per-token targets [B, th tw, D] (row-major like the image tokens):
    each the mean of its k x k cells (computed in fp32, returned in the input's dtype)."""
    b, d, h, w = feature_map.shape
    if h % grid[0] or w % grid[1] or h // grid[0] != w // grid[1]:
        raise ValueError(f"teacher feature map {h}x{w} is not one whole multiple of the token grid {grid}")
    pooled = F.avg_pool2d(feature_map.float(), kernel_size=h // grid[0])
    return pooled.flatten(2).transpose(1, 2).to(feature_map.dtype)


def normalized_pixels(images: Tensor, size: tuple[int, int], mean: tuple, std: tuple) -> Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, *size]: bicubic (antialiased when shrinking), then (x - mean) / std
    on [0, 1] values."""
    x = F.interpolate(images.float() / 255.0, size=size, mode="bicubic", align_corners=False, antialias=True)
    m, s = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x.clamp(0.0, 1.0) - m) / s


@dataclass
class VisionTeacher:
    """A frozen teacher: ``features(images, grid)`` gives each image token's target [B, th tw, dim]."""

    name: str
    model: nn.Module
    dim: int
    patch: int  # pixels per feature-map cell
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    skip_tokens: int  # leading tokens that are not patches (DINOv2: class + registers); -1: a conv feature map
    device: torch.device
    dtype: torch.dtype

    @torch.inference_mode()
    def feature_map(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        """uint8 images -> the teacher's features [B, D, H / patch, W / patch] at input ``size``."""
        x = normalized_pixels(images.to(self.device), size, self.mean, self.std).to(self.dtype)
        if self.skip_tokens < 0:  # EfficientNet-Lite0: its normalisation is (x - 127) / 128, folded into mean/std
            return self.model.feature_map(x)
        tokens = self.model(pixel_values=x).last_hidden_state[:, self.skip_tokens:]
        gh, gw = size[0] // self.patch, size[1] // self.patch
        if tokens.shape[1] != gh * gw:
            raise RuntimeError(f"{WHAT} {self.name!r} gave {tokens.shape[1]} patch tokens for a {size[0]}x{size[1]} "
                               f"input, expected {gh}x{gw}")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)

    def features(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """uint8 [B, 3, H, W] of one bucket -> targets [B, th tw, dim] on the token grid, in the teacher's dtype
        (a plain tensor, outside inference mode)."""
        size = teacher_input_size(grid, self.patch, self.image_size)
        return pool_to_grid(self.feature_map(images, size), grid).clone()

    def describe(self) -> dict:
        """What the cache manifest records of the teacher."""
        return {"class": type(self.model).__name__, "dim": self.dim, "patch": self.patch,
                "dtype": str(self.dtype).removeprefix("torch.")}


class EffNetFeatureMap(nn.Module):
    """EfficientNet-Lite0 up to its head convolution: the spatial map that its pooled features average."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def feature_map(self, x: Tensor) -> Tensor:
        n = self.net
        h = F.relu6(n._bn0(n._conv_stem(x)))
        for block in n._blocks:
            h = block(h)
        return F.relu6(n._bn1(n._conv_head(h)))


def teacher_dim(name: str) -> int:
    """The width of a teacher's features from its config alone (model ranks build the projector with it)."""
    if name == EFFNET:
        from ..eval.effnet_lite0 import HEAD

        return HEAD
    return int(_dinov2_config(name).hidden_size)


def _dinov2_config(name: str):
    config = load_hf_config(resolve_name(name), WHAT)
    if getattr(config, "model_type", "") not in DINOV2_TYPES:
        raise ConfigError(f"train.repa.encoder={name!r} is a {getattr(config, 'model_type', '?')!r} model; the "
                          f"teacher must be a DINOv2 ({', '.join(DINOV2_TYPES)}) or {EFFNET!r}")
    return config


def load_teacher(cfg: RepaConfig, device: torch.device | str, dtype: str | torch.dtype = "auto") -> VisionTeacher:
    """Load ``train.repa.encoder`` frozen on ``device`` in ``dtype`` (``encoders.dtype``: auto = bf16 on CUDA)."""
    device, torch_dtype = torch.device(device), resolve_dtype(dtype, device)
    if cfg.encoder == EFFNET:
        from ..eval.effnet_lite0 import EfficientNetLite0, default_weights

        net = EfficientNetLite0()
        try:
            net.load_state_dict(torch.load(default_weights(), map_location="cpu", weights_only=True))
        except FileNotFoundError as err:
            raise EncoderNotFoundError(f"{WHAT} {EFFNET!r}: {err}") from err
        model, dim, patch, skip = EffNetFeatureMap(net), teacher_dim(EFFNET), EFFNET_STRIDE, -1
        mean, std = (127.0 / 255.0,) * 3, (128.0 / 255.0,) * 3  # (x - 127) / 128 on 0..255
    else:
        from transformers import AutoModel

        config = _dinov2_config(cfg.encoder)
        model = AutoModel.from_pretrained(resolve_name(cfg.encoder), dtype=torch_dtype)
        dim, patch = int(config.hidden_size), int(config.patch_size)
        skip = 1 + int(getattr(config, "num_register_tokens", 0))
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    model.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
    log.info("%s %s: %s, %s on %s, %d-d features every %d px, about %d px seen", WHAT, cfg.encoder,
             type(model).__name__, str(torch_dtype)[6:], device, dim, patch, cfg.image_size)
    return VisionTeacher(cfg.encoder, model, dim, patch, cfg.image_size, mean, std, skip, device, torch_dtype)
