"""The tiny-autoencoder codec: real TAEF2 weights (../shared/assets/taef2, skipped when absent) round-trip a real
photo; diffusers' AutoencoderTiny (tiny random weights) goes through the same ``encoders.vae`` loading path; our
TAESD-layout module computes what diffusers' AutoencoderTiny computes on the same weights."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit.config import load_config
from mmdit.encoders import make_codec
from mmdit.encoders.tiny_autoencoder import TinyAutoencoder, weight_files
from mmdit.encoders.tiny_codec import TinyAECodec

ROOT = Path(__file__).resolve().parents[1]
TAEF2 = ROOT.parent / "shared" / "assets" / "taef2"
needs_taef2 = pytest.mark.skipif(weight_files(TAEF2) is None if TAEF2.is_dir() else True,
                                 reason=f"TAEF2 weights not found in {TAEF2} (see ../shared/assets/README.md)")


def photo(width: int) -> torch.Tensor:
    """A real photo (matplotlib's sample of Grace Hopper) as uint8 [1, 3, H, W], sides multiples of 8."""
    from matplotlib import cbook

    im = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    height = width * im.height // im.width // 8 * 8
    return torch.from_numpy(np.array(im.resize((width, height), Image.BICUBIC))).permute(2, 0, 1)[None]


def psnr(codec, images: torch.Tensor) -> float:
    decoded = codec.to_uint8(codec.decode(codec.encode(images))).float()
    return float(10 * torch.log10(255.0**2 / ((decoded - images.float()) ** 2).mean()))


def taef2_codec():
    return make_codec(load_config("tiny", [f"encoders.vae={TAEF2}"]).encoders, "cpu")


@needs_taef2
def test_taef2_round_trips_a_real_photo():
    codec = taef2_codec()
    assert isinstance(codec, TinyAECodec) and codec.kind == "pth"
    assert (codec.latent_channels, codec.latent_factor, codec.scaling_factor, codec.shift_factor) == (32, 8, 1.0, 0.0)
    assert codec.vae.norm  # the FLUX.2 variant: GroupNorm branches in the middle blocks
    images = photo(256)
    latents = codec.encode(images)
    assert latents.shape == (1, 32, images.shape[2] // 8, 32) and latents.dtype == torch.float32
    assert 0.5 < latents.std() < 1.2  # unscaled TAEF2 latents: std ~0.85 on photos
    # measured here: 29.2 dB at 256 px, 26.2 dB at 128 px; a randomly initialised copy: 7.5 dB
    assert psnr(codec, images) > 27.0
    assert psnr(codec, photo(128)) > 24.0
    torch.manual_seed(0)
    assert psnr(TinyAECodec(TinyAutoencoder(32, norm=True), "pth"), photo(128)) < 15.0
    # deterministic: the cache's posterior has std 0, and encode gives its mean whatever the generator
    mean, std = codec.posterior(images)
    assert torch.equal(mean, latents) and not std.any()
    assert torch.equal(codec.encode(images, generator=torch.Generator().manual_seed(5)), latents)


@needs_taef2
def test_taef2_takes_uint8_and_minus_one_to_one_alike():
    codec = taef2_codec()
    images = photo(64)
    assert torch.allclose(codec.encode(images), codec.encode(images.float() / 127.5 - 1.0), atol=1e-5)
    decoded = codec.decode(codec.encode(images))
    assert decoded.min() >= -1.0 and decoded.max() <= 1.0 and decoded.dtype == torch.float32


def tiny_autoencoder_tiny(**overrides):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    kwargs = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                  num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
    return AutoencoderTiny(**{**kwargs, **overrides}).eval()


def test_autoencoder_tiny_loads_through_the_vae_key(tmp_path):
    vae = tiny_autoencoder_tiny(scaling_factor=1.5, shift_factor=0.25)
    vae.save_pretrained(tmp_path / "taesd")
    codec = make_codec(load_config("tiny", [f"encoders.vae={tmp_path / 'taesd'}"]).encoders, "cpu")
    assert isinstance(codec, TinyAECodec) and codec.kind == "diffusers"
    assert (codec.latent_channels, codec.latent_factor, codec.scaling_factor, codec.shift_factor) == (4, 8, 1.5, 0.25)
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    latents = codec.encode(images)
    with torch.no_grad():
        raw = vae.encode(images.float() / 127.5 - 1.0).latents  # AutoencoderTiny's API is [-1, 1]
        assert torch.allclose(latents, (raw - 0.25) * 1.5, atol=1e-5)
        expected = vae.decode(latents / 1.5 + 0.25).sample.clamp(-1, 1)
    assert torch.allclose(codec.decode(latents), expected, atol=1e-5)


def test_a_kl_vae_folder_still_loads_the_kl_codec(tiny_models):
    from mmdit.encoders import VAECodec

    codec = make_codec(load_config("tiny", [f"encoders.vae={tiny_models['vae']}"]).encoders, "cpu")
    assert type(codec) is VAECodec


def test_our_module_computes_what_autoencoder_tiny_computes():
    """Same random weights, the TAESD layout: our encoder/decoder equal diffusers' AutoencoderTiny's layers."""
    vae = tiny_autoencoder_tiny(encoder_block_out_channels=(64,) * 4, decoder_block_out_channels=(64,) * 4,
                                num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1))
    ours = TinyAutoencoder(4).eval()
    enc = {k.removeprefix("encoder.layers."): v for k, v in vae.state_dict().items() if k.startswith("encoder.")}
    dec = {k.removeprefix("decoder.layers."): v for k, v in vae.state_dict().items() if k.startswith("decoder.")}
    dec = {f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": v for k, v in dec.items()}  # ours: a clamp first
    ours.encoder.load_state_dict(enc)
    ours.decoder.load_state_dict(dec)
    x = torch.rand(2, 3, 32, 40)
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latents
        assert torch.allclose(ours.encode(x), z, atol=1e-5)
        assert torch.allclose(ours.decode(z) * 2 - 1, vae.decode(z).sample, atol=1e-5)
