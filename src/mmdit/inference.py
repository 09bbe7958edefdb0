"""Inference: load a checkpoint once, then sample many times (``infer.py``, ``src/infer_loop.ipynb``).

    pipe = Pipeline.from_checkpoint("models/my_run")            # newest complete step_<N>/, EMA weights
    images = pipe.generate(["a red circle"], width=256, height=256, num_steps=28, cfg_scale=5, seed=0)
    images, frames = pipe.generate("a red circle", seed=0, return_frames=True)
    save_gif(frames[0], "denoise.gif")                          # one frame per sampling step

A source is a Hub-style folder or Hub id written by ``python -m mmdit export`` (``mmdit.export``: one set
of weights, its ``mmdit_config.yaml`` naming the encoders and VAE), or a trainer checkpoint.
Checkpoints are the trainer's ``<run>/step_<N>/`` folders (``mmdit.train.checkpoint``, full or sharded):
``config.yaml`` gives the architecture, text encoders and VAE; ``ema.safetensors`` (default) or
``model.safetensors`` the weights, loaded strictly -- a config that does not describe the weights is one
:class:`CheckpointMismatchError` that lists what differs.

Numerics are training's: fp32 weights under autocast (bf16 on CUDA, none on the CPU; ``precision``
overrides), so LayerNorm, modulation and the output layer run as they did in training. ``dtype=bf16``
casts the weights instead (half the memory; every op then runs in bf16, except the learnable time scale,
which stays fp32: t x 1000 in bf16 would round t to ~1/256). ``tests/test_inference.py`` records how far
the two drift apart. The timestep shift is :func:`mmdit.sampling.sampling_shift` at the size sampled.

Seeds. Image k of a call (prompts in order, ``num_per_prompt`` images each) starts from the noise of
``seed + k``, drawn on the CPU (:func:`mmdit.sampling.sample_noise`), so a seed gives the same images on
any device and whatever ``batch_size`` is, and an image's own seed (``image.info["seed"]``, also in its
file name) reproduces it as the first image of a call. ``seed=None`` or ``-1`` picks a random seed, which
is reported the same way. ``euler_stochastic`` also draws noise during sampling, from one generator per
batch, so with it images depend on the batching too.

Frames (``return_frames=True``, gifs). After sampling step i the pipeline decodes, by default
(``frame_mode="x0"``), the model's guided prediction of the clean image at the start of that step,
x0_hat = x_i - t_i v(x_i, t_i): a sharpening picture of what the sampler is heading for. The last frame
is the final image itself (every sampler's last step ends at t = 0). ``frame_mode="state"`` decodes
the noisy state x_{i+1} instead (from noise to the image). Either way there are ``num_steps`` frames.
"""

from __future__ import annotations

import logging
import math
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from .checkpoint_loading import (  # noqa: F401 - re-exported: the inference API in one import
    WEIGHTS,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ImageSizeError,
    InferenceError,
    check_state_dict,
    default_device,
    default_dtype,
    is_pretrained_folder,
    keep_time_scale_fp32,
    load_model,
    read_checkpoint_config,
    resolve_checkpoint,
    weights_file,
)
from .conditioning import TextCondition
from .config import Config
from .image_files import image_filename, image_grid, save_gif, save_images, slugify  # noqa: F401
from .model.policy import compile_blocks, compile_enabled
from .sampling import SAMPLERS, sample, sample_noise, sampling_shift

log = logging.getLogger(__name__)

FRAME_MODES = ("x0", "state")


# ----------------------------------------------------------------------------------------------------
# sizes, seeds, names


def nearest_multiple(x: int, step: int) -> int:
    return max(step, int(math.floor(x / step + 0.5)) * step)


def check_size(width: int, height: int, cfg: Config) -> None:
    """Width/height must be positive multiples of ``model.pixel_step``; warn above ``model.max_res``."""
    m = cfg.model
    step = m.pixel_step
    if width <= 0 or height <= 0 or width % step or height % step:
        raise ImageSizeError(
            f"image size {width}x{height} (width x height) is not valid for this model: sides must be positive "
            f"multiples of {step} px (model.latent_factor={m.latent_factor} x model.patch_size={m.patch_size}); "
            f"nearest valid size: {nearest_multiple(width, step)}x{nearest_multiple(height, step)}"
        )
    if max(width, height) > m.max_res:
        warnings.warn(
            f"image size {width}x{height} exceeds model.max_res={m.max_res}, the largest side this model was "
            "trained at; expect repeated or broken structure",
            stacklevel=3,
        )


def random_seed() -> int:
    return random.SystemRandom().randrange(2**31 - 1)





# ----------------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class _Job:
    prompt: str
    seed: int


class Pipeline:
    """A checkpoint's MMDiT with its text encoders and image codec, loaded once; :meth:`generate` samples."""

    def __init__(self, model, cfg: Config, encoders, codec, device, dtype, step_dir: Optional[Path] = None,
                 weights: str = "ema", precision: Optional[torch.dtype] = None, preview=None):
        self.model = model
        self.cfg = cfg
        self.encoders = encoders
        self.codec = codec
        self.preview = preview  # decodes the intermediate frames when set (encoders.preview_vae)
        self.device = torch.device(device)
        self.dtype = dtype  # of the weights (and of the inputs handed to the model)
        # autocast dtype over fp32 weights (training's numerics); bf16 weights run as they are
        self.precision = precision or default_dtype(self.device)
        self.step_dir = step_dir
        self.weights = weights
        self.last_seed: Optional[int] = None
        if compile_enabled(cfg.sample.compile, self.device) and not getattr(model, "blocks_compiled", True):
            compile_blocks(model)  # sample.compile: each JointBlock once, reused by every denoising step
        m = cfg.model
        if codec.latent_channels != m.in_channels or codec.latent_factor != m.latent_factor:
            raise CheckpointMismatchError(
                f"the image codec ({'encoders.vae=' + repr(cfg.encoders.vae) if cfg.encoders.vae else 'pixel space'}: "
                f"{codec.latent_channels} channels, factor {codec.latent_factor}) does not match model.in_channels="
                f"{m.in_channels}, model.latent_factor={m.latent_factor}"
            )
        if preview is not None and (preview.latent_channels, preview.latent_factor) != (m.in_channels,
                                                                                        m.latent_factor):
            raise CheckpointMismatchError(
                f"the preview decoder (encoders.preview_vae): {preview.latent_channels} channels, factor "
                f"{preview.latent_factor}; the model's latent space has {m.in_channels}, factor {m.latent_factor}: "
                "give a decoder of the same latent space (TAEF2 for FLUX.2's VAE, TAESD3 for SD3's, ...)"
            )
        if encoders is not None:
            if list(encoders.text_dims) != list(m.text_dims) or encoders.pooled_dim != m.pooled_dim:
                raise CheckpointMismatchError(
                    f"the text encoders give widths {encoders.text_dims} (pooled {encoders.pooled_dim}) but the model "
                    f"expects model.text_dims={list(m.text_dims)} (model.pooled_dim={m.pooled_dim})"
                )

    @classmethod
    def from_checkpoint(
        cls,
        path: Union[str, Path],
        device: Union[str, torch.device, None] = None,
        weights: str = "ema",
        dtype: Optional[torch.dtype] = None,
        precision: Optional[torch.dtype] = None,
        preview_vae: Optional[str] = None,
    ) -> Pipeline:
        """Load a step directory, a run directory's newest complete checkpoint, an exported Hub-style folder or
        a Hub id (``owner/name``) of one.

        device: default CUDA if available, else CPU. weights: ``ema`` (default) or ``model``.
        dtype: the diffusion model's weights, fp32 by default; ``torch.bfloat16`` saves memory at the cost of
        training's numerics. precision: the autocast dtype over fp32 weights (default bf16 on CUDA, fp32 =
        no autocast on the CPU). The text encoders and VAE use ``encoders.dtype`` (auto = bf16 on CUDA).
        preview_vae: a cheap decoder of the same latent space for the intermediate frames (default: the
        checkpoint's ``encoders.preview_vae``; "" = none).
        """
        from .encoders import TextEncoders, make_codec, resolve_dtype

        device = torch.device(device) if device is not None else default_device()
        model, cfg, step_dir = load_model(path, weights=weights, device=device, dtype=dtype or torch.float32)
        enc_dtype = resolve_dtype(cfg.encoders.dtype, device)
        # encoders live on the CPU between calls when sampling on CUDA (moved in for encoding only)
        enc_device = "cpu" if device.type == "cuda" else device
        encoders = TextEncoders.from_config(cfg.encoders, enc_device, dtype=enc_dtype) if cfg.encoders.text else None
        codec = make_codec(cfg.encoders, device, dtype=enc_dtype)
        preview_vae = cfg.encoders.preview_vae if preview_vae is None else preview_vae
        preview = make_codec(replace(cfg.encoders, vae=preview_vae, vae_subfolder=""), device,
                             dtype=enc_dtype) if preview_vae else None
        log.info("loaded %s (%s weights) on %s%s", step_dir, weights, device,
                 f", frames previewed by {preview_vae}" if preview_vae else "")
        return cls(model, cfg, encoders, codec, device, next(model.parameters()).dtype, step_dir, weights, precision,
                   preview)

    @property
    def step(self) -> Optional[int]:
        m = re.match(r"step_(\d+)$", self.step_dir.name) if self.step_dir is not None else None
        return int(m.group(1)) if m else None

    def encode(self, prompts: list[str]) -> TextCondition:
        """Text-encode on the device, then (on CUDA) move the encoders back to the CPU."""
        if self.encoders is None:
            raise InferenceError("this checkpoint has no text encoders (encoders.text is empty)")
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            self.encoders.to(self.device)
        try:
            cond = self.encoders.encode(list(prompts))
        finally:
            if on_cuda:
                self.encoders.offload()
        return cond.to(self.device, self.dtype)

    def velocity(self, x: Tensor, t: Tensor, cond) -> Tensor:
        """The model as the sampler's velocity_fn: x in the weights' dtype, t kept fp32, v back in fp32;
        fp32 weights run under autocast to ``precision``, as in training."""
        use_autocast = self.dtype == torch.float32 and self.precision != torch.float32
        with torch.autocast(self.device.type, dtype=self.precision, enabled=use_autocast):
            return self.model(x.to(self.dtype), t.float(), cond).float()

    def decode(self, latents: Tensor, preview: bool = False) -> list:
        """Model-space latents [B, C, h, w] -> list of PIL images; ``preview``: by the preview decoder when there
        is one (intermediate frames)."""
        from .encoders import to_pil

        codec = self.preview if preview and self.preview is not None else self.codec
        return to_pil(codec.decode(latents))

    @torch.no_grad()
    def generate(
        self,
        prompts: Union[str, Sequence[str]],
        width: Optional[int] = None,
        height: Optional[int] = None,
        num_steps: Optional[int] = None,
        cfg_scale: Optional[float] = None,
        sampler: Optional[str] = None,
        seed: Optional[int] = None,
        batch_size: int = 4,
        shift: Optional[float] = None,
        callback: Optional[Callable[[int, float, Tensor], None]] = None,
        *,
        num_per_prompt: int = 1,
        noise_scale: Optional[float] = None,
        return_frames: bool = False,
        frame_mode: str = "x0",
    ):
        """Sample ``num_per_prompt`` images for each prompt; returns a list of PIL images in prompt order.

        Unset arguments come from the checkpoint's ``sample`` config (size: ``model.max_res`` square; shift:
        :func:`mmdit.sampling.sampling_shift` at the size asked for).
        batch_size: images per model pass (CFG doubles it: cond and uncond go in one batch).
        seed: image k uses seed + k (None/-1: random; see the module doc). callback(i, t, x) is passed to the
        sampler for every batch. Each image's ``info`` holds prompt, seed, sampler, steps, cfg_scale, shift,
        size and checkpoint. ``return_frames=True`` returns ``(images, frames)``, frames[k] being image k's
        ``num_steps`` PIL frames (``frame_mode`` "x0" or "state", see the module doc).
        """
        sc = self.cfg.sample
        num_steps = int(num_steps or sc.num_steps)
        cfg_scale = float(sc.cfg_scale if cfg_scale is None else cfg_scale)
        sampler = sampler or sc.sampler
        width = int(width or self.cfg.model.max_res)
        height = int(height or self.cfg.model.max_res)
        shift = float(sampling_shift(self.cfg, height, width) if shift is None else shift)
        noise_scale = float(sc.noise_scale if noise_scale is None else noise_scale)
        if sampler not in SAMPLERS:
            raise InferenceError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
        if num_steps < 1:
            raise InferenceError(f"num_steps={num_steps} must be >= 1")
        if shift <= 0:
            raise InferenceError(f"shift={shift} must be > 0")
        if batch_size < 1 or num_per_prompt < 1:
            raise InferenceError(f"batch_size={batch_size} and num_per_prompt={num_per_prompt} must be >= 1")
        if frame_mode not in FRAME_MODES:
            raise InferenceError(f"frame_mode={frame_mode!r}; choose one of {list(FRAME_MODES)}")
        check_size(width, height, self.cfg)
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise InferenceError("no prompts given")
        if seed is None or int(seed) < 0:
            seed = random_seed()
        seed = int(seed)
        self.last_seed = seed

        jobs = [_Job(p, seed + i * num_per_prompt + j) for i, p in enumerate(prompts) for j in range(num_per_prompt)]
        c, h, w = self.codec.latent_shape(height, width)
        info = {
            "sampler": sampler, "num_steps": num_steps, "cfg_scale": cfg_scale, "shift": shift,
            "width": width, "height": height, "checkpoint": str(self.step_dir or ""), "weights": self.weights,
        }
        if sampler == "euler_stochastic":
            info["noise_scale"] = noise_scale
        cond_all = self.encode([j.prompt for j in jobs])

        images, frames = [], []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            noise = torch.cat([
                sample_noise((1, c, h, w), torch.Generator().manual_seed(j.seed), device=self.device)
                for j in chunk
            ])
            cond = _slice_condition(cond_all, start, start + len(chunk))
            sde_gen = torch.Generator().manual_seed(chunk[0].seed + 2**31) if sampler == "euler_stochastic" else None
            recorder = _FrameRecorder(self, cfg_scale, frame_mode, callback) if return_frames else None
            x0 = sample(
                self.velocity if recorder is None else recorder.velocity,
                noise,
                cond,
                sampler=sampler,
                num_steps=num_steps,
                cfg_scale=cfg_scale,
                shift=shift,
                noise_scale=noise_scale,
                generator=sde_gen,
                callback=callback if recorder is None else recorder,
            )
            for job, im in zip(chunk, self.decode(x0)):
                im.info.update(info, prompt=job.prompt, seed=job.seed)
                images.append(im)
            if recorder is not None:
                frames.extend(recorder.per_image())
        return (images, frames) if return_frames else images


def _slice_condition(cond: TextCondition, a: int, b: int) -> TextCondition:
    return TextCondition(
        tokens=[t[a:b] for t in cond.tokens],
        masks=[m[a:b] for m in cond.masks],
        pooled=None if cond.pooled is None else cond.pooled[a:b],
    )


class _FrameRecorder:
    """Sampler callback that decodes one frame per step (and wraps the velocity to see the model's output).

    x0 mode: the first model call of step i is at (x_i, t_i); its guided velocity (as the sampler combines
    it: v_u + s (v_c - v_u) for a doubled batch) gives x0_hat = x_i - t_i v.
    """

    def __init__(self, pipe: Pipeline, cfg_scale: float, mode: str, callback=None):
        self.pipe = pipe
        self.cfg_scale = cfg_scale
        self.mode = mode
        self.callback = callback
        self.first_call: Optional[tuple[Tensor, float, Tensor]] = None
        self.frames: list[list] = []  # per step: list of PIL images (batch)

    def velocity(self, x: Tensor, t: Tensor, cond) -> Tensor:
        v = self.pipe.velocity(x, t, cond)
        if self.first_call is None:
            self.first_call = (x, float(t[0]), v)
        return v

    def _guided(self, x_in: Tensor, v: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        if v.shape[0] == 2 * batch:  # CFG: [cond; uncond] in one batch
            v_c, v_u = v.chunk(2)
            return x_in[:batch], v_u + self.cfg_scale * (v_c - v_u)
        return x_in, v

    def __call__(self, i: int, t: float, x: Tensor) -> None:
        if self.mode == "x0" and self.first_call is not None:
            x_in, t_i, v = self.first_call
            x_i, v = self._guided(x_in.float(), v, x.shape[0])
            target = x_i - t_i * v
        else:
            target = x
        last = t == 0.0
        if last:
            target = x  # the last frame is exactly the final sample (decoded by encoders.vae, as the image)
        self.frames.append(self.pipe.decode(target, preview=not last))
        self.first_call = None
        if self.callback is not None:
            self.callback(i, t, x)

    def per_image(self) -> list[list]:
        return [list(f) for f in zip(*self.frames)] if self.frames else []


# ----------------------------------------------------------------------------------------------------
# folders (infer.py, the notebook)


def default_out_dir(pipe: Pipeline) -> Path:
    """``<run dir>/samples/step_<N>`` next to the checkpoint (``models/`` is git-ignored), else ``samples``."""
    if pipe.step_dir is None:
        return Path("samples")
    if is_pretrained_folder(pipe.step_dir):  # an export or a Hub download (its folder may be the Hub cache)
        return Path("samples") / pipe.step_dir.name
    return pipe.step_dir.parent / "samples" / pipe.step_dir.name


def read_prompts(prompts: Sequence[str] = (), prompts_file: Union[str, Path, None] = None) -> list[str]:
    """Prompts given directly, then those of a text file (one per line; blank lines skipped)."""
    out = [str(p) for p in prompts]
    if prompts_file:
        f = Path(prompts_file).expanduser()
        if not f.is_file():
            raise InferenceError(f"prompts file not found: {f}")
        out += [line.strip() for line in f.read_text().splitlines() if line.strip()]
    if not out:
        raise InferenceError("no prompts: give --prompt TEXT (repeatable) or --prompts_file FILE")
    return out


def generate_to_folder(
    pipe: Pipeline,
    prompts: Sequence[str],
    out_dir: Union[str, Path, None] = None,
    gif: bool = False,
    gif_duration_ms: int = 100,
    frame_mode: str = "x0",
    **generate_kwargs,
) -> tuple[list, list[Path], list[Path]]:
    """:meth:`Pipeline.generate`, then save PNGs (and with ``gif`` one ``.gif`` per image, one frame per
    step) into ``out_dir`` (default :func:`default_out_dir`). Returns (images, png paths, gif paths)."""
    out_dir = Path(out_dir) if out_dir else default_out_dir(pipe)
    if gif:
        images, frames = pipe.generate(prompts, return_frames=True, frame_mode=frame_mode, **generate_kwargs)
    else:
        images, frames = pipe.generate(prompts, **generate_kwargs), []
    pngs = save_images(images, out_dir)
    gifs = [save_gif(f, png.with_suffix(".gif"), gif_duration_ms) for f, png in zip(frames, pngs)]
    return images, pngs, gifs
