"""Rectified-flow objective: interpolation, velocity target, timestep distributions, shift, CFG dropout.

Convention (SD3): t = 0 is data, t = 1 is noise,

    x_t = (1 - t) x0 + t eps,   eps ~ N(0, I),   v = d x_t / dt = eps - x0,

and the model is trained with the MSE between its velocity and ``eps - x0``. Everything here is a pure
function of tensors (no network), so it is tested against closed-form answers.

Posterior identities used by the samplers (``mmdit.sampling``): given the model's v at (x, t),
``x0_hat = x - t v`` and ``eps_hat = x + (1 - t) v``, and the score is ``grad log p_t(x) = -eps_hat / t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from .config import FlowConfig, ModelConfig, TextEncoderConfig

LOSS_WEIGHTINGS = ("none", "snr_clip")
# Hang et al. 2023 (Min-SNR-gamma) default; FlowConfig has no field for it yet
DEFAULT_SNR_GAMMA = 5.0
# f_mode is a monotone map of [0, 1] onto [0, 1] only for scale in this range (SD3 paper, eq. 20)
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] to broadcast against ``like`` ([B, ...])."""
    return t.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps, with ``t`` [B] (or a scalar) broadcast over the non-batch dims."""
    t = torch.as_tensor(t)
    tb = _bcast(t, x0) if t.dim() == 1 else t.to(device=x0.device, dtype=x0.dtype)
    return (1 - tb) * x0 + tb * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The regression target d x_t / dt = eps - x0."""
    return eps - x0


# ---------------------------------------------------------------------------------------------------------
# timestep distributions


def _rand(n: int, generator: Optional[torch.Generator], device, normal: bool = False) -> Tensor:
    """Draw on the generator's device (so a CPU generator gives the same numbers for any target device)."""
    gen_device = generator.device if generator is not None else device
    fn = torch.randn if normal else torch.rand
    out = fn(n, generator=generator, device=gen_device, dtype=torch.float32)
    return out.to(device) if device is not None else out


def uniform(n: int, *, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """t ~ U[0, 1)."""
    return _rand(n, generator, device)


def logit_normal(
    n: int, mean: float = 0.0, std: float = 1.0, *, generator: Optional[torch.Generator] = None, device=None
) -> Tensor:
    """t = sigmoid(mean + std * z), z ~ N(0, 1) (SD3's default with mean 0, std 1)."""
    return torch.sigmoid(mean + std * _rand(n, generator, device, normal=True))


def logit_normal_quantile(q: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Inverse CDF of the logit-normal: sigmoid(mean + std * Phi^-1(q))."""
    return torch.sigmoid(mean + std * torch.special.ndtri(q))


def mode_transform(u: Tensor, scale: float) -> Tensor:
    """SD3 'mode sampling' map f(u) = 1 - u - scale * (cos^2(pi u / 2) - 1 + u).

    Decreasing from f(0) = 1 to f(1) = 0 for scale in [-1, 2 / (pi - 2)]; scale 0 is uniform, scale > 0
    puts more mass on intermediate t. The q-quantile of t = f(u), u ~ U[0, 1], is f(1 - q).
    """
    return 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def mode(n: int, scale: float = 1.29, *, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """t = f_mode(u; scale), u ~ U[0, 1] (SD3 paper, eq. 20)."""
    lo, hi = MODE_SCALE_RANGE
    if not lo <= scale <= hi:
        raise ValueError(f"mode scale {scale} must be in [{lo}, {hi:.4f}] for f_mode to map [0,1] onto [0,1]")
    return mode_transform(_rand(n, generator, device), scale).clamp(0.0, 1.0)


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """t' = shift t / (1 + (shift - 1) t): monotone on [0, 1], fixes 0 and 1; shift > 1 moves t toward noise.

    ``shift_timesteps(., 1 / a)`` inverts ``shift_timesteps(., a)``. In terms of SNR = ((1 - t) / t)^2 the
    shift divides the SNR by shift^2, which is why SD3 ties it to the image size.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int) -> float:
    """SD3's resolution-dependent shift sqrt(num_tokens / base_tokens) (tokens, or pixels: same ratio)."""
    if num_tokens <= 0 or base_tokens <= 0:
        raise ValueError(f"num_tokens={num_tokens} and base_tokens={base_tokens} must both be > 0")
    return math.sqrt(num_tokens / base_tokens)


def image_tokens(model_cfg: ModelConfig, height: int, width: int) -> int:
    """Image tokens of a ``height`` x ``width`` px image: (side / (latent_factor x patch_size)) per side."""
    step = model_cfg.pixel_step
    return (height // step) * (width // step)


def timestep_shift(flow_cfg: FlowConfig, num_tokens: int) -> float:
    """The one resolution-shift rule, for training, sampling, validation and evaluation alike.

    sqrt(num_tokens / flow.shift_base_tokens) (SD3; base 256 tokens = 256 px with the SD3 VAE and patch 2,
    so 2 at 512 px and 4 at 1024 px), and 1 when ``flow.shift_base_tokens`` is 0 (no shift).
    """
    if flow_cfg.shift_base_tokens <= 0:
        return 1.0
    return resolution_shift(num_tokens, flow_cfg.shift_base_tokens)


def sample_timesteps(
    n: int,
    cfg: FlowConfig,
    generator: Optional[torch.Generator] = None,
    device=None,
    num_tokens: Optional[int] = None,
) -> Tensor:
    """Draw n training timesteps [n] (float32) from ``cfg.timestep_sampling``, then apply the shift.

    The shift is used when ``cfg.shift_base_tokens > 0``: shift = sqrt(num_tokens / shift_base_tokens), with
    ``num_tokens`` the image tokens of this batch's bucket (required then, so it is never silently skipped).
    """
    kind = cfg.timestep_sampling
    if kind == "logit_normal":
        t = logit_normal(n, cfg.logit_mean, cfg.logit_std, generator=generator, device=device)
    elif kind == "uniform":
        t = uniform(n, generator=generator, device=device)
    elif kind == "mode":
        t = mode(n, cfg.mode_scale, generator=generator, device=device)
    else:
        raise ValueError(f"unknown flow.timestep_sampling {kind!r}")
    if cfg.shift_base_tokens > 0:
        if num_tokens is None:
            raise ValueError("flow.shift_base_tokens > 0 needs num_tokens (image tokens of the batch) for the shift")
        t = shift_timesteps(t, timestep_shift(cfg, num_tokens))
    return t


def timestep_grid(cfg: FlowConfig, num: int) -> Tensor:
    """``num`` fixed timesteps [num] (float64, increasing) at the mid-quantiles (k + 0.5) / num of the
    training law ``cfg.timestep_sampling``, before any shift: where training puts its mass, so does the grid."""
    if num < 1:
        raise ValueError(f"num={num} timesteps must be >= 1")
    q = (torch.arange(num, dtype=torch.float64) + 0.5) / num
    kind = cfg.timestep_sampling
    if kind == "logit_normal":
        return logit_normal_quantile(q, cfg.logit_mean, cfg.logit_std)
    if kind == "uniform":
        return q
    if kind == "mode":
        return mode_transform(1 - q, cfg.mode_scale)
    raise ValueError(f"unknown flow.timestep_sampling {kind!r}")


# ---------------------------------------------------------------------------------------------------------
# loss


def loss_weight(t: Tensor, weighting: str = "none", snr_gamma: float = DEFAULT_SNR_GAMMA) -> Tensor:
    """Per-sample weight [B] that multiplies the velocity MSE.

    ``none``: 1 (the plain rectified-flow loss).
    ``snr_clip``: w(t) = min(1, gamma / SNR(t)) with SNR(t) = ((1 - t) / t)^2, i.e. the Min-SNR-gamma cap
    (Hang et al. 2023) on top of the rectified-flow weighting. Since x0 - x0_hat = -t (v - v_hat), the
    plain velocity loss weights the x0 error by 1 / t^2, which grows without bound as t -> 0; with the cap
    the x0-error weight becomes min(1 / t^2, gamma / (1 - t)^2) <= gamma / (1 - t)^2 -> gamma as t -> 0.
    Timesteps with SNR <= gamma (t >= 1 / (1 + sqrt(gamma)), ~0.31 for gamma = 5) keep weight 1, so the
    loss scale (and the learning rate that suits it) is unchanged there.
    """
    if weighting == "none":
        return torch.ones_like(t)
    if weighting == "snr_clip":
        return (snr_gamma * t**2 / (1 - t) ** 2).clamp(max=1.0)
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {list(LOSS_WEIGHTINGS)}")


def flow_loss(
    model_fn: Callable[[Tensor, Tensor, object], Tensor],
    x0: Tensor,
    cond,
    t: Tensor,
    eps: Tensor,
    weighting: str = "none",
    snr_gamma: float = DEFAULT_SNR_GAMMA,
) -> tuple[Tensor, Tensor]:
    """Rectified-flow loss. ``model_fn(x_t, t, cond) -> v`` ([B, ...] like x0); t [B]; eps like x0.

    Returns ``(loss, per_sample)``: per_sample [B] is the *unweighted* velocity MSE of each sample (mean over
    its elements, float32; log it binned by t), loss = mean(loss_weight(t) * per_sample), a float32 scalar.
    With ``weighting='none'`` loss == per_sample.mean().
    """
    x_t = interpolate(x0, eps, t)
    v = model_fn(x_t, t, cond)
    err = (v.float() - velocity_target(x0, eps).float()) ** 2
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    w = loss_weight(t.to(per_sample.device, torch.float32), weighting, snr_gamma)
    return (w * per_sample).mean(), per_sample


# ---------------------------------------------------------------------------------------------------------
# classifier-free guidance dropout


def cfg_dropout_keep(
    batch_size: int,
    num_encoders: int,
    p_uncond: float,
    per_encoder_drop: Optional[Sequence[float]] = None,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> Tensor:
    """Which encoders each sample keeps: bool [batch_size, num_encoders], True = keep.

    Semantics: for each sample, a "whole" drop happens with probability ``p_uncond``; independently of it and
    of each other, encoder i is dropped with probability ``per_encoder_drop[i]`` (default 0 for all). An
    encoder is kept only if neither happened:

        P(encoder i dropped)       = p + (1 - p) q_i
        P(encoders i, j both kept) = (1 - p) (1 - q_i) (1 - q_j)
        P(all encoders dropped)    = p + (1 - p) prod_i q_i

    Columns follow ``TextCondition``: the sequence encoders in order, then the pooled one (see
    :func:`encoder_drop_probs`). Apply with ``cond.keep(mask)``; an all-False row is exactly
    ``cond.dropped()``, the sampler's unconditional branch.
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond={p_uncond} must be in [0, 1]")
    q = [0.0] * num_encoders if per_encoder_drop is None else [float(x) for x in per_encoder_drop]
    if len(q) != num_encoders:
        raise ValueError(f"per_encoder_drop has {len(q)} entries for {num_encoders} encoders")
    if any(not 0.0 <= x <= 1.0 for x in q):
        raise ValueError(f"per_encoder_drop={q} must hold probabilities in [0, 1]")
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(batch_size, 1 + num_encoders, generator=generator, device=gen_device, dtype=torch.float64)
    whole_kept = u[:, :1] >= p_uncond
    enc_kept = u[:, 1:] >= torch.tensor(q, dtype=torch.float64, device=gen_device)
    keep = whole_kept & enc_kept
    return keep.to(device) if device is not None else keep


def encoder_drop_probs(text_cfgs: Sequence[TextEncoderConfig]) -> list[float]:
    """``drop_prob`` of each configured encoder in TextCondition's column order: sequence ones, then pooled."""
    seq = [c.drop_prob for c in text_cfgs if c.kind == "sequence"]
    pooled = [c.drop_prob for c in text_cfgs if c.kind == "pooled"]
    return seq + pooled


def drop_condition(
    cond,
    p_uncond: float,
    per_encoder_drop: Optional[Sequence[float]] = None,
    generator: Optional[torch.Generator] = None,
):
    """``cond.keep(cfg_dropout_keep(...))`` for a TextCondition (see :func:`cfg_dropout_keep`)."""
    keep = cfg_dropout_keep(cond.batch_size, cond.num_encoders, p_uncond, per_encoder_drop, generator)
    return cond.keep(keep)
