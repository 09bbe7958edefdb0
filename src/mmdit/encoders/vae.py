"""Image <-> model-space codecs: the SD3-style VAE (16 latent channels, 8x) or plain pixel space.

Both take images as uint8 [B, 3, H, W] (0..255) or float in [-1, 1], and decode to float in [-1, 1].
The VAE stores latents normalised as ``(z - shift_factor) * scaling_factor`` with the constants from the
VAE's own config (a missing shift is 0), which :meth:`VAECodec.decode` inverts exactly. The VAE runs in
channels-last memory (the layout cuDNN's convolutions are fastest in), its encoder under
``torch.inference_mode``, optionally compiled (``encoders.compile``).
"""

from __future__ import annotations

import abc
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from mmdit.config import EncodersConfig
from mmdit.hub_access import gated_model_error

from .text import (
    EncoderNotFoundError,
    _looks_like_path,
    _missing_message,
    compile_module,
    offload_to_cpu,
    resolve_dtype,
)

log = logging.getLogger(__name__)


def images_to_float(images: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] in 0..255 -> float32 in [-1, 1]; floating input is taken to be in [-1, 1] already."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")
    return images


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [-1, 1] [B, 3, H, W] -> uint8 0..255 (clamped, rounded), on the CPU."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.to(torch.uint8).cpu()


def to_pil(images: Tensor) -> list:
    """Float images in [-1, 1] (or uint8) [B, 3, H, W] -> list of RGB ``PIL.Image``."""
    from PIL import Image

    if images.dim() == 3:
        images = images[None]
    arr = (images.cpu() if images.dtype == torch.uint8 else to_uint8(images)).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


class ImageCodec(abc.ABC):
    """Maps images to what the diffusion model sees (``encode``) and back (``decode``)."""

    latent_channels: int
    latent_factor: int
    device: torch.device
    dtype: torch.dtype

    @abc.abstractmethod
    def encode(self, images: Tensor, **kwargs) -> Tensor:
        """uint8 [B, 3, H, W] (or float in [-1, 1]) -> model inputs [B, C, H/f, W/f]."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Model inputs -> float images in [-1, 1]."""

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """[C, h, w] of the latent for an image of ``height`` x ``width`` pixels."""
        f = self.latent_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} must be a multiple of the latent factor {f}")
        return self.latent_channels, height // f, width // f

    def to(self, device: torch.device | str) -> ImageCodec:
        self.device = torch.device(device)
        return self

    def offload(self) -> ImageCodec:
        """Move to the CPU and release cached GPU memory."""
        return offload_to_cpu(self)

    to_uint8 = staticmethod(to_uint8)
    to_pil = staticmethod(to_pil)


class PixelCodec(ImageCodec):
    """No VAE: the model works on the pixels scaled to [-1, 1] (3 channels, factor 1)."""

    latent_channels = 3
    latent_factor = 1

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype

    def encode(self, images: Tensor, **kwargs) -> Tensor:
        """uint8 or [-1, 1] float images -> [-1, 1] float in ``self.dtype`` on ``self.device``."""
        return images_to_float(images.to(self.device)).to(self.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        return latents.float().clamp(-1.0, 1.0)

    def __repr__(self) -> str:
        return f"PixelCodec(device={self.device}, dtype={self.dtype})"


class VAECodec(ImageCodec):
    """A diffusers ``AutoencoderKL`` (frozen). Latents are ``(z - shift) * scale``.

    ``sample=True`` (default) draws z from the posterior with ``generator``; ``sample=False`` takes its
    mean. Both can be overridden per ``encode`` call. ``chunk`` > 0 encodes/decodes that many images at a
    time to bound memory. ``compile_backend`` non-empty compiles the encoder half with that backend.
    """

    def __init__(
        self, vae, device: torch.device | str = "cpu", sample: bool = True, chunk: int = 0, compile_backend: str = ""
    ):
        self.vae = vae.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.vae.to(self.device, memory_format=torch.channels_last)
        self.dtype = next(vae.parameters()).dtype
        self.compiled = bool(compile_backend)
        if compile_backend:
            compile_module(self.vae.encoder, compile_backend)
        log.info("VAE (encoders.vae): %s, %s on %s, channels_last%s", type(vae).__name__, str(self.dtype)[6:],
                 self.device, f", encoder compiled ({compile_backend})" if compile_backend else "")
        self.sample = sample
        self.chunk = chunk
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.latent_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        subfolder: str = "",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        sample: bool = True,
        chunk: int = 0,
        compile_backend: str = "",
    ) -> VAECodec:
        from diffusers import AutoencoderKL
        from diffusers.utils import is_accelerate_available

        what = "VAE (encoders.vae)"
        name_or_path = os.path.expanduser(name_or_path)
        if _looks_like_path(name_or_path) and not Path(name_or_path).exists():
            raise EncoderNotFoundError(
                f"{what} {name_or_path!r}: folder does not exist. Build tiny test models with "
                "`python -m mmdit tiny-models <dir>`, give an existing local folder, or set encoders.vae='' "
                "for pixel space."
            )
        try:
            vae = AutoencoderKL.from_pretrained(
                name_or_path,
                subfolder=subfolder or None,
                torch_dtype=dtype,
                low_cpu_mem_usage=is_accelerate_available(),  # without accelerate: no warning
            )
        except (OSError, ValueError) as err:
            if Path(name_or_path).is_dir() and not subfolder:
                raise
            if subfolder:
                what = f"VAE (encoders.vae, encoders.vae_subfolder={subfolder!r})"
            hint = "set encoders.vae='' for pixel space, "
            gated = gated_model_error(name_or_path, err, what)
            if gated is not None:
                raise EncoderNotFoundError(str(gated)) from err
            raise EncoderNotFoundError(_missing_message(what, name_or_path, err, hint)) from err
        return cls(vae, device=device, sample=sample, chunk=chunk, compile_backend=compile_backend)

    def _chunks(self, x: Tensor) -> list[Tensor]:
        return list(x.split(self.chunk)) if self.chunk and x.shape[0] > self.chunk else [x]

    def encode(
        self, images: Tensor, sample: Optional[bool] = None, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """uint8 [B, 3, H, W] or float in [-1, 1] -> normalised latents [B, C, H/f, W/f] in the VAE's dtype.

        A plain contiguous tensor (copied out of inference mode, so autograd may save it).
        """
        sample = self.sample if sample is None else sample
        with torch.inference_mode():
            outs = []
            for dist in self._posteriors(images):
                z = dist.sample(generator=generator) if sample else dist.mean
                outs.append((z - self.shift_factor) * self.scaling_factor)
            latents = torch.cat(outs)
        return latents.clone(memory_format=torch.contiguous_format)

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's (mean, std) [B, C, H/f, W/f], unnormalised: what :meth:`encode` samples from,
        computed the same way (what the precompute cache stores, ``mmdit.cache.writer``)."""
        with torch.inference_mode():
            dists = list(self._posteriors(images))
            mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
        return mean.clone(memory_format=torch.contiguous_format), std.clone(memory_format=torch.contiguous_format)

    def _posteriors(self, images: Tensor):
        """The VAE's latent distribution of each chunk of ``images`` (call under inference mode)."""
        x = images_to_float(images.to(self.device)).to(self.dtype).contiguous(memory_format=torch.channels_last)
        for part in self._chunks(x):
            yield self.vae.encode(part).latent_dist

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> float32 images in [-1, 1]."""
        z = latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        z = z.contiguous(memory_format=torch.channels_last)
        outs = [self.vae.decode(part).sample.float().clamp(-1.0, 1.0) for part in self._chunks(z)]
        return torch.cat(outs)

    def to(self, device: torch.device | str) -> VAECodec:
        self.device = torch.device(device)
        self.vae.to(self.device, memory_format=torch.channels_last)
        return self

    def __repr__(self) -> str:
        return (
            f"VAECodec(channels={self.latent_channels}, factor={self.latent_factor}, scale={self.scaling_factor}, "
            f"shift={self.shift_factor}, sample={self.sample}, device={self.device}, dtype={self.dtype})"
        )


def make_codec(
    cfg: EncodersConfig,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype | None = None,
    sample: bool = True,
    chunk: int = 0,
) -> ImageCodec:
    """``cfg.vae`` empty -> :class:`PixelCodec`; a TAESD-family tiny autoencoder (a ``*encoder.pth`` /
    ``*decoder.pth`` folder, or an ``AutoencoderTiny`` config) -> :class:`~.tiny_codec.TinyAECodec`; else
    :class:`VAECodec` from that name/folder (+ ``vae_subfolder``).

    ``dtype`` overrides ``cfg.dtype`` (auto = bf16 on CUDA, fp32 on CPU).
    """
    torch_dtype = resolve_dtype(dtype if dtype is not None else cfg.dtype, device)
    if not cfg.vae:
        # pixels stay fp32 whatever the encoder dtype: cheap, and uint8 -> float -> uint8 stays exact
        return PixelCodec(device=device, dtype=torch.float32)
    from .tiny_codec import TinyAECodec, tiny_autoencoder_kind

    kind = tiny_autoencoder_kind(cfg.vae, cfg.vae_subfolder)
    codec_class = TinyAECodec if kind else VAECodec
    return codec_class.from_pretrained(
        cfg.vae, subfolder=cfg.vae_subfolder, device=device, dtype=torch_dtype, sample=sample, chunk=chunk,
        compile_backend=cfg.compile_backend if cfg.compile else "", **({"kind": kind} if kind else {}),
    )
