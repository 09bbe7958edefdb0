"""The tiny-autoencoder codec: TAESD / TAESDXL / TAESD3 / TAEF1 through diffusers' ``AutoencoderTiny``, TAEF2
(and any TAESD-family ``*_encoder.pth`` / ``*_decoder.pth`` folder) through :class:`TinyAutoencoder`.

Chosen by :func:`mmdit.encoders.make_codec` from the same ``encoders.vae`` key as the KL VAE: a folder holding the
``.pth`` pair, or a folder / hub name whose ``config.json`` names ``AutoencoderTiny``. It is deterministic (the
posterior's std is 0, so the loader rank, the precompute cache and validation all get the same latent), speaks
the codecs' [-1, 1] at its API and converts to the family's [0, 1] inside; latents are scaled by the config's
``scaling_factor`` (1 for the whole family: taesd#3) and shifted by ``shift_factor`` (0).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .text import compile_module, resolve_name
from .tiny_autoencoder import TinyAutoencoder, weight_files
from .vae import VAECodec, images_to_float

log = logging.getLogger(__name__)


class PointPosterior:
    """A deterministic encoder's "distribution": its mean is the latent, its std is 0."""

    def __init__(self, mean: Tensor):
        self.mean, self.std = mean, torch.zeros_like(mean)

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.mean


def tiny_autoencoder_kind(name: str, subfolder: str = "") -> str | None:
    """"pth" (a TAESD-family ``.pth`` pair), "diffusers" (an ``AutoencoderTiny`` config) or None (not a tiny
    autoencoder: the KL VAE path, whose errors then explain a missing name)."""
    folder = Path(resolve_name(name)) / subfolder
    if folder.is_dir():
        if weight_files(folder) is not None:
            return "pth"
        config = folder / "config.json"
        found = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
        return "diffusers" if found == "AutoencoderTiny" else None
    try:
        from diffusers import AutoencoderKL

        config = AutoencoderKL.load_config(name, subfolder=subfolder or None)
    except Exception:  # not on the hub / not in the cache: AutoencoderKL.from_pretrained reports it
        return None
    return "diffusers" if config.get("_class_name") == "AutoencoderTiny" else None


class TinyAECodec(VAECodec):
    """A frozen TAESD-family autoencoder as an :class:`ImageCodec`; ``kind`` "pth" or "diffusers"."""

    image_range = (0.0, 1.0)  # what the network itself takes and returns

    def __init__(self, net, kind: str, device: torch.device | str = "cpu", chunk: int = 0, compile_backend: str = ""):
        self.vae, self.kind = net.eval().requires_grad_(False), kind
        self.device = torch.device(device)
        self.vae.to(self.device, memory_format=torch.channels_last)
        self.dtype = next(net.parameters()).dtype
        self.sample, self.chunk = False, chunk
        self.compiled = bool(compile_backend)
        if compile_backend:
            compile_module(self.vae.encoder, compile_backend)
        if kind == "diffusers":
            cfg = net.config
            self.latent_channels = int(cfg.latent_channels)
            self.latent_factor = 2 ** (len(cfg.encoder_block_out_channels) - 1)
            self.scaling_factor = float(cfg.scaling_factor)
            self.shift_factor = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        else:
            self.latent_channels, self.latent_factor = net.latent_channels, net.latent_factor
            self.scaling_factor, self.shift_factor = 1.0, 0.0
        log.info("VAE (encoders.vae): tiny autoencoder (%s), %d channels, %s on %s", kind, self.latent_channels,
                 str(self.dtype)[6:], self.device)

    @classmethod
    def from_pretrained(cls, name_or_path: str, subfolder: str = "", device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, chunk: int = 0, compile_backend: str = "",
                        kind: str | None = None, **_) -> TinyAECodec:
        kind = kind or tiny_autoencoder_kind(name_or_path, subfolder)
        if kind == "pth":
            net = TinyAutoencoder.from_folder(Path(resolve_name(name_or_path)) / subfolder, dtype=dtype)
        elif kind == "diffusers":
            from diffusers import AutoencoderTiny

            net = AutoencoderTiny.from_pretrained(resolve_name(name_or_path), subfolder=subfolder or None,
                                                  torch_dtype=dtype)
        else:
            raise ValueError(f"encoders.vae={name_or_path!r} is not a tiny autoencoder (no *encoder.pth + "
                             "*decoder.pth pair, no AutoencoderTiny config.json)")
        return cls(net, kind, device=device, chunk=chunk, compile_backend=compile_backend)

    def _raw_encode(self, x: Tensor) -> Tensor:
        """[-1, 1] images -> raw latents."""
        if self.kind == "diffusers":
            return self.vae.encode(x).latents  # AutoencoderTiny maps [-1, 1] to [0, 1] itself
        return self.vae.encode((x + 1.0) / 2.0)

    def _raw_decode(self, z: Tensor) -> Tensor:
        """Raw latents -> [-1, 1] images (not clamped)."""
        if self.kind == "diffusers":
            return self.vae.decode(z).sample
        return self.vae.decode(z) * 2.0 - 1.0

    def _posteriors(self, images: Tensor):
        x = images_to_float(images.to(self.device)).to(self.dtype).contiguous(memory_format=torch.channels_last)
        for part in self._chunks(x):
            yield PointPosterior(self._raw_encode(part))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> float32 images in [-1, 1]."""
        z = (latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor)
        z = z.contiguous(memory_format=torch.channels_last)
        return torch.cat([self._raw_decode(part).float().clamp(-1.0, 1.0) for part in self._chunks(z)])

    def __repr__(self) -> str:
        return (f"TinyAECodec(kind={self.kind}, channels={self.latent_channels}, factor={self.latent_factor}, "
                f"scale={self.scaling_factor}, shift={self.shift_factor}, device={self.device}, dtype={self.dtype})")
