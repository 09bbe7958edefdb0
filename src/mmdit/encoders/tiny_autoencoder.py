"""The TAESD-family tiny autoencoder as a plain module, for the weights diffusers' ``AutoencoderTiny`` cannot take.

TAESD, TAESDXL, TAESD3, TAEF1 and TAEF2 (madebyollin/taesd) share one layout: 3x3 Conv + ReLU residual blocks of
64 channels, three stride-2 convolutions down (8x), three nearest-neighbour 2x upsamplings back, a soft clamp
``3 tanh(z / 3)`` on the decoder's input. The FLUX.2 variant (TAEF2, 32 latent channels) adds to each block of
the lowest resolution a 1x1 -> GroupNorm(4) -> ReLU -> 1x1 branch added to the block's input. Images are in
[0, 1] at this module's API (the family's own convention), latents are unscaled (scale 1, shift 0).

The modules are numbered as in the published ``*_encoder.pth`` / ``*_decoder.pth`` state dicts, so those files
load strictly; the layout (latent channels, norm branch) is read from the files themselves.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

WIDTH = 64
DOWNSAMPLINGS = 3  # 8x: the latent factor of the whole family
BLOCKS_PER_LEVEL = 3


def conv3x3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class LatentClamp(nn.Module):
    """``3 tanh(z / 3)``: the decoder's soft limit on latents far outside what the encoder produces."""

    def forward(self, z: Tensor) -> Tensor:
        return torch.tanh(z / 3) * 3


class ResidualBlock(nn.Module):
    """Three 3x3 convolutions (ReLU between) added to the input, then ReLU; with ``norm``, first a
    1x1 -> GroupNorm(4) -> ReLU -> 1x1 branch (4x wide) is added to the input (TAEF2's middle blocks)."""

    def __init__(self, channels: int = WIDTH, norm: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv3x3(channels, channels), nn.ReLU(), conv3x3(channels, channels), nn.ReLU(),
                                  conv3x3(channels, channels))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()
        wide = 4 * channels
        self.pool = nn.Sequential(nn.Conv2d(channels, wide, 1, bias=False), nn.GroupNorm(4, wide), nn.ReLU(),
                                  nn.Conv2d(wide, channels, 1, bias=False)) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def build_encoder(latent_channels: int, norm: bool = False) -> nn.Sequential:
    """[0, 1] image [B, 3, H, W] -> latent [B, latent_channels, H/8, W/8]; ``norm`` on the lowest level."""
    layers: list[nn.Module] = [conv3x3(3, WIDTH), ResidualBlock()]
    for level in range(DOWNSAMPLINGS):
        layers.append(conv3x3(WIDTH, WIDTH, stride=2, bias=False))
        lowest = level == DOWNSAMPLINGS - 1
        layers += [ResidualBlock(norm=norm and lowest) for _ in range(BLOCKS_PER_LEVEL)]
    layers.append(conv3x3(WIDTH, latent_channels))
    return nn.Sequential(*layers)


def build_decoder(latent_channels: int, norm: bool = False) -> nn.Sequential:
    """Latent -> image [B, 3, 8h, 8w] in about [0, 1] (not clamped); ``norm`` on the lowest level."""
    layers: list[nn.Module] = [LatentClamp(), conv3x3(latent_channels, WIDTH), nn.ReLU()]
    for level in range(DOWNSAMPLINGS):
        layers += [ResidualBlock(norm=norm and level == 0) for _ in range(BLOCKS_PER_LEVEL)]
        layers += [nn.Upsample(scale_factor=2), conv3x3(WIDTH, WIDTH, bias=False)]
    layers += [ResidualBlock(), conv3x3(WIDTH, 3)]
    return nn.Sequential(*layers)


def weight_files(folder: str | Path) -> tuple[Path, Path] | None:
    """The (encoder, decoder) ``.pth`` pair of a TAESD-family folder (``taef2_encoder.pth`` ...), or None."""
    folder = Path(folder)
    encoders, decoders = sorted(folder.glob("*encoder.pth")), sorted(folder.glob("*decoder.pth"))
    if len(encoders) == 1 and len(decoders) == 1:
        return encoders[0], decoders[0]
    return None


def _layout(state: dict[str, Tensor]) -> tuple[int, bool]:
    """(latent channels, norm branch present) of an encoder state dict."""
    last = max(int(k.split(".")[0]) for k in state)
    return int(state[f"{last}.weight"].shape[0]), any(".pool." in k for k in state)


class TinyAutoencoder(nn.Module):
    """Encoder + decoder of the TAESD family; ``encode`` / ``decode`` speak [0, 1] images and raw latents."""

    latent_factor = 2 ** DOWNSAMPLINGS

    def __init__(self, latent_channels: int, norm: bool = False):
        super().__init__()
        self.latent_channels, self.norm = latent_channels, norm
        self.encoder = build_encoder(latent_channels, norm)
        self.decoder = build_decoder(latent_channels, norm)

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> TinyAutoencoder:
        """Load the ``*encoder.pth`` / ``*decoder.pth`` pair of ``folder`` (strictly), in ``dtype``."""
        files = weight_files(folder)
        if files is None:
            raise FileNotFoundError(f"{str(folder)!r} has no single *encoder.pth + *decoder.pth pair "
                                    "(the TAESD-family files, e.g. taef2_encoder.pth and taef2_decoder.pth)")
        enc, dec = (torch.load(f, map_location="cpu", weights_only=True) for f in files)
        net = cls(*_layout(enc))
        net.encoder.load_state_dict(enc)
        net.decoder.load_state_dict(dec)
        return net.to(dtype).eval().requires_grad_(False)

    def encode(self, images: Tensor) -> Tensor:
        """[0, 1] images -> raw latents."""
        return self.encoder(images)

    def decode(self, latents: Tensor) -> Tensor:
        """Raw latents -> images in about [0, 1] (the caller clamps)."""
        return self.decoder(latents)

    def extra_repr(self) -> str:
        return f"latent_channels={self.latent_channels}, norm={self.norm}"
