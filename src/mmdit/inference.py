"""Inference: load a checkpoint once, then sample many times (``infer.py``, ``src/infer_loop.ipynb``).

    pipe = Pipeline.from_checkpoint("models/my_run")            # newest complete step_<N>/, EMA weights
    images = pipe.generate(["a red circle"], width=256, height=256, num_steps=28, cfg_scale=5, seed=0)
    images, frames = pipe.generate("a red circle", seed=0, return_frames=True)
    save_gif(frames[0], "denoise.gif")                          # one frame per sampling step

Checkpoints are the trainer's ``<run>/step_<N>/`` folders (``mmdit.train.checkpoint``): ``config.yaml`` gives
the architecture, text encoders and VAE; ``ema.safetensors`` (default) or ``model.safetensors`` the weights,
loaded strictly -- a config that does not describe the weights is one :class:`CheckpointMismatchError` that
lists what differs. The model runs in bf16 on CUDA and fp32 on the CPU (``dtype`` overrides), except its
learnable time scale, which stays fp32 (t x 1000 in bf16 would round t to ~1/256).

Seeds. Image k of a call (prompts in order, ``num_per_prompt`` images each) starts from the noise of
``seed + k``, drawn on the CPU (:func:`mmdit.sampling.sample_noise`), so a seed gives the same images on
any device and whatever ``batch_size`` is, and an image's own seed (``image.info["seed"]``, also in its
file name) reproduces it as the first image of a call. ``seed=None`` or ``-1`` picks a random seed, which
is reported the same way. ``euler_stochastic`` also draws noise during sampling, from one generator per
batch, so with it images depend on the batching too.

Frames (``return_frames=True``, gifs). After sampling step i the pipeline decodes, by default
(``frame_mode="x0"``), the model's guided prediction of the clean image at the start of that step,
x0_hat = x_i - t_i v(x_i, t_i): a sharpening picture of what the sampler is heading for. Every sampler
ends with an Euler-type step to t = 0, so the last frame is the final image. ``frame_mode="state"`` decodes
the noisy state x_{i+1} instead (from noise to the image). Either way there are ``num_steps`` frames.
"""

from __future__ import annotations

import logging
import math
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from .conditioning import TextCondition
from .config import Config, ConfigError, read_config
from .sampling import SAMPLERS, sample, sample_noise

log = logging.getLogger(__name__)

WEIGHTS = ("ema", "model")
FRAME_MODES = ("x0", "state")
# prefixes that wrappers add to state-dict keys: torch.compile, DDP
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class InferenceError(ValueError):
    """A bad inference request or an unusable checkpoint; the message says what and how to fix it."""


class CheckpointNotFoundError(InferenceError, FileNotFoundError):
    """The checkpoint path, or a file it must contain, does not exist."""


class CheckpointMismatchError(InferenceError):
    """The checkpoint's config.yaml does not describe its weights."""


class ImageSizeError(InferenceError):
    """Width/height the model cannot produce; the message names the nearest valid size."""


# ----------------------------------------------------------------------------------------------------
# checkpoint files


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """The step directory to load: ``path`` itself (a ``step_<N>`` folder with a config.yaml), the newest
    complete checkpoint of a run directory, or the folder of a ``.safetensors`` file."""
    from .train.checkpoint import CONFIG_FILE, MARKER, latest_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {p} does not exist")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointNotFoundError(f"checkpoint {p} is a file but not a .safetensors weights file")
        p = p.parent
    if (p / CONFIG_FILE).is_file():
        if not (p / MARKER).is_file():
            log.warning("checkpoint %s has no %s marker (an interrupted save?); loading it anyway", p, MARKER)
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointNotFoundError(
            f"checkpoint not found: {p} has no {CONFIG_FILE} and no complete step_<N> checkpoint folder inside"
        )
    return latest


def weights_file(step_dir: Path, weights: str = "ema") -> Path:
    """``ema.safetensors`` or ``model.safetensors`` in a step directory, with a clear error if absent."""
    from .train.checkpoint import WEIGHT_FILES

    if weights not in WEIGHTS:
        raise InferenceError(f"weights={weights!r}; choose one of {list(WEIGHTS)}")
    f = Path(step_dir) / WEIGHT_FILES[weights]
    if not f.is_file():
        other = "model" if weights == "ema" else "ema"
        has_other = (f.parent / WEIGHT_FILES[other]).is_file()
        alt = f" (it has {WEIGHT_FILES[other]}: use weights={other!r})" if has_other else ""
        raise CheckpointNotFoundError(f"checkpoint file not found: {f}{alt}")
    return f


def read_checkpoint_config(step_dir: Path) -> Config:
    from .train.checkpoint import CONFIG_FILE

    f = Path(step_dir) / CONFIG_FILE
    if not f.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {f}")
    try:
        return read_config(f)
    except ConfigError as err:
        raise InferenceError(f"checkpoint config {f} is invalid: {err}") from None


def _strip_wrapper_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _shape_hint(state: dict[str, Tensor]) -> str:
    """What architecture the weights themselves look like (depth, width, input channels)."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    parts = []
    if blocks:
        parts.append(f"depth={max(blocks) + 1}")
    w = state.get("patch_embed.weight")
    if w is not None and w.dim() == 2:
        parts.append(f"hidden_size={w.shape[0]}")
        parts.append(f"in_channels*patch_size^2={w.shape[1]}")
    return ", ".join(parts)


def _collapse(keys: list[str], universe: set[str]) -> list[str]:
    """Name whole modules: ``blocks.2.*`` when every key of ``universe`` under ``blocks.2.`` is in ``keys``."""
    keyset, out, covered = set(keys), [], set()
    for k in keys:
        if k in covered:
            continue
        parts = k.split(".")
        name = k
        for n in range(1, len(parts)):
            prefix = ".".join(parts[:n]) + "."
            under = {u for u in universe if u.startswith(prefix)}
            if under <= keyset:
                name = prefix + "*"
                covered |= under
                break
        out.append(name)
    return out


def _list(items: list[str], n: int = 4) -> str:
    head = ", ".join(items[:n])
    return f"{head}, ... ({len(items)} in all)" if len(items) > n else head


def check_state_dict(model: torch.nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise one :class:`CheckpointMismatchError` listing missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (weights {list(state[k].shape)}, config {list(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"missing {_list(_collapse(missing, set(expected)))}")
    if unexpected:
        problems.append(f"unexpected {_list(_collapse(unexpected, set(state)))}")
    if shapes:
        problems.append(f"shape mismatch for {_list(shapes, 2)}")
    cfg = getattr(model, "cfg", None)
    described = (
        f" (config: model.depth={cfg.depth}, hidden_size={cfg.dim}, num_heads={cfg.heads}, "
        f"in_channels={cfg.in_channels}, patch_size={cfg.patch_size}, mlp_type={cfg.mlp_type})"
        if cfg is not None
        else ""
    )
    hint = _shape_hint(state)
    raise CheckpointMismatchError(
        f"{source} weights do not match its config{described}: {'; '.join(problems)}"
        + (f". The weights look like {hint}" if hint else "")
    )


def load_model(
    path: Union[str, Path],
    weights: str = "ema",
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
):
    """(MMDiT in eval mode on ``device``/``dtype``, its Config, the step directory) from a checkpoint."""
    from safetensors.torch import load_file

    from .model import MMDiT

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    step_dir = resolve_checkpoint(path)
    cfg = read_checkpoint_config(step_dir)
    f = weights_file(step_dir, weights)
    state = _strip_wrapper_prefixes(load_file(str(f), device="cpu"))
    with torch.device("meta"):
        model = MMDiT(cfg.model)
    check_state_dict(model, state, f"checkpoint {step_dir}")
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # non-persistent buffers
        model = MMDiT(cfg.model)
        model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    keep_time_scale_fp32(model)
    return model, cfg, step_dir


def keep_time_scale_fp32(model: torch.nn.Module) -> None:
    """The learnable time scale (~1000) multiplies t before the sinusoids; in bf16 t x 1000 has a step of
    4 near 1000, so this one scalar stays fp32 (t arrives in fp32 from the sampler)."""
    ts = getattr(getattr(getattr(model, "condition", None), "time", None), "time_scale", None)
    if isinstance(ts, torch.nn.Parameter) and ts.dtype != torch.float32:
        ts.data = ts.data.float()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


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


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe version of a prompt: lowercase words joined by '_' (``empty`` for '')."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len].rstrip("_")
    return slug or "empty"


def image_filename(prompt: str, seed: int, ext: str = "png") -> str:
    return f"{slugify(prompt)}_seed{seed}.{ext}"


# ----------------------------------------------------------------------------------------------------
# images and gifs


def save_gif(frames: Sequence, path: Union[str, Path], duration_ms: int = 100, hold_last_ms: int = 1000) -> Path:
    """Write PIL frames as a looping animated gif, one gif frame per given frame, the last held longer.

    Pillow merges consecutive frames that are pixel-identical (adding up their durations), so a gif of a
    model that does not change the image between steps can have fewer frames than given.
    """
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [int(duration_ms)] * len(frames)
    durations[-1] = max(int(duration_ms), int(hold_last_ms))
    first, *rest = [f.convert("RGB") for f in frames]
    first.save(path, save_all=True, append_images=rest, duration=durations, loop=0, optimize=False)
    return path


def image_grid(images: Sequence, cols: Optional[int] = None, pad: int = 2):
    """Tile PIL images (same size) into one image, ``cols`` per row (default: about square)."""
    from PIL import Image

    if not images:
        raise ValueError("image_grid needs at least one image")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid


def save_images(images: Sequence, out_dir: Union[str, Path]) -> list[Path]:
    """Save images from :meth:`Pipeline.generate` as ``<prompt slug>_seed<seed>.png`` with the sampling
    settings in the PNG's text chunks; returns the paths."""
    from PIL.PngImagePlugin import PngInfo

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        prompt, seed = im.info.get("prompt", ""), im.info.get("seed", i)
        meta = PngInfo()
        for k, v in im.info.items():
            if isinstance(v, (str, int, float)):
                meta.add_text(str(k), str(v))
        p = out_dir / image_filename(prompt, seed)
        im.save(p, pnginfo=meta)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class _Job:
    prompt: str
    seed: int


class Pipeline:
    """A checkpoint's MMDiT with its text encoders and image codec, loaded once; :meth:`generate` samples."""

    def __init__(self, model, cfg: Config, encoders, codec, device, dtype, step_dir: Optional[Path] = None,
                 weights: str = "ema"):
        self.model = model
        self.cfg = cfg
        self.encoders = encoders
        self.codec = codec
        self.device = torch.device(device)
        self.dtype = dtype
        self.step_dir = step_dir
        self.weights = weights
        self.last_seed: Optional[int] = None
        m = cfg.model
        if codec.latent_channels != m.in_channels or codec.latent_factor != m.latent_factor:
            raise CheckpointMismatchError(
                f"the image codec ({'encoders.vae=' + repr(cfg.encoders.vae) if cfg.encoders.vae else 'pixel space'}: "
                f"{codec.latent_channels} channels, factor {codec.latent_factor}) does not match model.in_channels="
                f"{m.in_channels}, model.latent_factor={m.latent_factor}"
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
    ) -> Pipeline:
        """Load a step directory, or a run directory's newest complete checkpoint.

        device: default CUDA if available, else CPU. weights: ``ema`` (default) or ``model``.
        dtype: the diffusion model's dtype (default bf16 on CUDA, fp32 on CPU); the text encoders and VAE
        use ``encoders.dtype`` from the config (auto = the same rule).
        """
        from .encoders import TextEncoders, make_codec, resolve_dtype

        device = torch.device(device) if device is not None else default_device()
        model, cfg, step_dir = load_model(path, weights=weights, device=device, dtype=dtype)
        enc_dtype = resolve_dtype(cfg.encoders.dtype, device)
        # encoders live on the CPU between calls when sampling on CUDA (moved in for encoding only)
        enc_device = "cpu" if device.type == "cuda" else device
        encoders = TextEncoders.from_config(cfg.encoders, enc_device, dtype=enc_dtype) if cfg.encoders.text else None
        codec = make_codec(cfg.encoders, device, dtype=enc_dtype)
        log.info("loaded %s (%s weights) on %s", step_dir, weights, device)
        return cls(model, cfg, encoders, codec, device, next(model.parameters()).dtype, step_dir, weights)

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
        """The model as the sampler's velocity_fn: x in the model's dtype, t kept fp32, v back in fp32."""
        return self.model(x.to(self.dtype), t.float(), cond).float()

    def decode(self, latents: Tensor) -> list:
        """Model-space latents [B, C, h, w] -> list of PIL images."""
        from .encoders import to_pil

        return to_pil(self.codec.decode(latents))

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

        Unset arguments come from the checkpoint's ``sample`` config (size: ``model.max_res`` square).
        batch_size: images per model pass (CFG doubles it: cond and uncond go in one batch).
        seed: image k uses seed + k (None/-1: random; see the module doc). callback(i, t, x) is passed to the
        sampler for every batch. Each image's ``info`` holds prompt, seed, sampler, steps, cfg_scale, shift,
        size and checkpoint. ``return_frames=True`` returns ``(images, frames)``, frames[k] being image k's
        ``num_steps`` PIL frames (``frame_mode`` "x0" or "state", see the module doc).
        """
        sc = self.cfg.sample
        width = int(width or self.cfg.model.max_res)
        height = int(height or self.cfg.model.max_res)
        num_steps = int(num_steps or sc.num_steps)
        cfg_scale = float(sc.cfg_scale if cfg_scale is None else cfg_scale)
        sampler = sampler or sc.sampler
        shift = float(sc.shift if shift is None else shift)
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
        if t == 0.0:
            target = x  # the last frame is exactly the final sample
        self.frames.append(self.pipe.decode(target))
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
