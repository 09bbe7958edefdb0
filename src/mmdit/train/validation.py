"""Periodic validation: fixed prompts, fixed seeds, EMA weights -> an image grid in the run folder.

The EMA model keeps its fp32 weights and runs under the training autocast; the timestep shift is
:func:`mmdit.sampling.sampling_shift` at ``train.validation_size``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from ..config import Config
from ..encoders import TextEncoders, make_codec, to_pil
from ..sampling import sample_noise, sample_with_config, sampling_shift

log = logging.getLogger(__name__)


class Validator:
    """Encodes the prompts once at start (then frees the text encoders) and keeps the codec for decoding."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        prompts = list(cfg.train.validation_prompts)
        encoders = TextEncoders.from_config(cfg.encoders, device)
        self.cond = encoders.encode(prompts).to(device)
        del encoders
        self.codec = make_codec(cfg.encoders, device)
        self.prompts = prompts

    @torch.no_grad()
    def run(self, model: torch.nn.Module, step: int, out_dir: Path, dtype: torch.dtype) -> list[Image.Image]:
        height, width = self.cfg.train.validation_size
        c, factor = self.cfg.model.in_channels, self.cfg.model.latent_factor
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        noise = sample_noise((len(self.prompts), c, height // factor, width // factor), generator, self.device,
                             torch.float32)
        was_training = model.training
        model.eval()

        def velocity(x, t, cond):
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
                return model(x, t, cond).float()

        latents = sample_with_config(velocity, noise, self.cond, self.cfg.sample,
                                     shift=sampling_shift(self.cfg, height, width))
        model.train(was_training)
        images = to_pil(self.codec.decode(latents))
        out_dir.mkdir(parents=True, exist_ok=True)
        grid = Image.new("RGB", (width * len(images), height))
        for i, img in enumerate(images):
            grid.paste(img, (i * width, 0))
        grid.save(out_dir / f"step_{step:08d}.png")
        log.info("validation images for step %d in %s", step, out_dir)
        return images
