"""Samplers for the rectified flow x_t = (1 - t) x0 + t eps: integrate from t = 1 (noise) to t = 0 (data).

``velocity_fn(x, t, cond) -> v`` is the model: x [B, ...], t [B] (same dtype as x), cond a TextCondition (or
anything, or None, for unconditional toys). Classifier-free guidance evaluates the conditional and the
unconditional halves in one batched call, the unconditional half being ``cond.dropped()`` -- exactly the
condition training saw when CFG dropout dropped every encoder (``mmdit.flow.cfg_dropout_keep``).

Samplers (``SampleConfig.sampler``):

* ``euler``: x <- x + (t_next - t) v(x, t). First order; num_steps model evaluations.
* ``heun``: Heun's 2nd-order predictor-corrector on every step, the last one included: its corrector
  queries the model at t = 0, where the flow velocity is defined (E[eps - x0 | x_0 = x] = -x).
  Karras et al. 2022 end with a plain Euler step instead, but under a timestep shift that last step is long
  (shift(1/N) -> 0: 0.136 -> 0 at N = 20, shift 3) and loses variance: on Gaussian data with exact
  velocities the sample std is 4.4 % low at N = 20, shift 3 (16 % at N = 10), against 0.3 % (1.7 %) with
  the corrector (BENCHMARKS.md, "Heun vs Euler"; ending at a small t_min then stepping to 0 measured the
  same and costs one more evaluation). 2 num_steps model evaluations.
* ``euler_stochastic``: a first-order discretisation of the reverse SDE below, with noise scale eta
  (``SampleConfig.noise_scale``); eta = 0 is ``euler``. num_steps model evaluations.

The state is integrated in float32 (float64 if the noise is float64), whatever dtype the model runs in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from .conditioning import TextCondition
from .config import Config, SampleConfig
from .flow import image_tokens, shift_timesteps, timestep_shift

SAMPLERS = ("euler", "heun", "euler_stochastic")

VelocityFn = Callable[[Tensor, Tensor, object], Tensor]
Callback = Callable[[int, float, Tensor], None]


def timestep_schedule(num_steps: int, shift: float = 1.0, device=None, dtype=torch.float64) -> Tensor:
    """[num_steps + 1] times from 1 (noise) down to 0 (data): uniform in t, then ``shift_timesteps``.

    shift > 1 spends more steps at high noise (SD3 samples 1024 px with shift 3).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    t = shift_timesteps(t, shift)
    t[0], t[-1] = 1.0, 0.0
    return t.to(device=device, dtype=dtype)


def num_evaluations(sampler: str, num_steps: int) -> int:
    """Model evaluations (batched calls) a sampler makes for num_steps steps."""
    _check_sampler(sampler)
    return 2 * num_steps if sampler == "heun" else num_steps


def sample_noise(
    shape: tuple[int, ...], generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32
) -> Tensor:
    """Gaussian noise drawn on the generator's device, then moved: a CPU generator with a fixed seed gives
    the same starting noise (hence the same images) on any device."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device, dtype)


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")


class GuidedVelocity:
    """v(x, t) with classifier-free guidance: v = v_u + s (v_c - v_u), both halves in one batched call.

    Scale 1 (or cond None) calls the model on the conditional batch alone and returns its prediction
    unchanged; scale 0 calls it on the unconditional batch alone.
    """

    def __init__(self, velocity_fn: VelocityFn, cond, cfg_scale: float, batch_size: int):
        self.velocity_fn = velocity_fn
        self.cfg_scale = float(cfg_scale)
        self.cond = cond
        if cond is None:
            if self.cfg_scale != 1.0:
                raise ValueError(f"cfg_scale={cfg_scale} needs a condition; pass cond, or cfg_scale=1 for cond=None")
            self.mode = "cond"
            return
        if isinstance(cond, TextCondition) and cond.batch_size != batch_size:
            raise ValueError(f"cond has batch size {cond.batch_size}, the noise {batch_size}")
        if self.cfg_scale == 1.0:
            self.mode = "cond"
        elif self.cfg_scale == 0.0:
            self.mode = "uncond"
            self.cond = cond.dropped()
        else:
            self.mode = "cfg"
            self.cond = TextCondition.cat([cond, cond.dropped()])

    def __call__(self, x: Tensor, t: float) -> Tensor:
        if self.mode != "cfg":
            t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            return self.velocity_fn(x, t_batch, self.cond).to(x.dtype)
        t_batch = torch.full((2 * x.shape[0],), t, dtype=x.dtype, device=x.device)
        v = self.velocity_fn(torch.cat([x, x]), t_batch, self.cond).to(x.dtype)
        v_c, v_u = v.chunk(2)
        return v_u + self.cfg_scale * (v_c - v_u)


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    cond=None,
    *,
    sampler: str = "euler",
    num_steps: int = 28,
    cfg_scale: float = 1.0,
    shift: float = 1.0,
    noise_scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    timesteps: Optional[Tensor] = None,
) -> Tensor:
    """Integrate from ``noise`` (x at t = 1) to t = 0 and return x0 (float32, or float64 for float64 noise).

    velocity_fn(x, t, cond) -> v; cond: TextCondition, or None (then cfg_scale must be 1).
    sampler: euler | heun | euler_stochastic; num_steps steps on ``timestep_schedule(num_steps, shift)``
    unless ``timesteps`` (decreasing, from 1 to 0) is given. cfg_scale: guidance scale s (1 = no guidance).
    noise_scale: eta of ``euler_stochastic`` (ignored by the others). generator: the SDE noise of
    ``euler_stochastic`` (the starting noise is the caller's: see :func:`sample_noise`); the same generator
    state and noise give the same result. callback(i, t, x) is called after step i = 0 .. num_steps - 1 with
    the state x at time t = t_{i+1} (the last call has t = 0 and the final sample): frames for a gif.
    """
    _check_sampler(sampler)
    if noise_scale < 0:
        raise ValueError(f"noise_scale={noise_scale} must be >= 0")
    if timesteps is None:
        ts = timestep_schedule(num_steps, shift).tolist()
    else:
        ts = timesteps.detach().to("cpu", torch.float64).tolist()
        if len(ts) < 2 or any(b >= a for a, b in zip(ts[:-1], ts[1:])) or ts[0] > 1 or ts[-1] < 0:
            raise ValueError("timesteps must decrease strictly within [0, 1], e.g. from 1 to 0")
    x = noise.clone() if noise.dtype in (torch.float32, torch.float64) else noise.float()
    v_fn = GuidedVelocity(velocity_fn, cond, cfg_scale, x.shape[0])

    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = v_fn(x, t)
        if sampler == "euler":
            x = x + dt * v
        elif sampler == "heun":
            v_next = v_fn(x + dt * v, t_next)
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = stochastic_step(x, v, t, t_next, noise_scale, generator)
        if callback is not None:
            callback(i, t_next, x)
    return x


def stochastic_step(
    x: Tensor, v: Tensor, t: float, t_next: float, noise_scale: float, generator: Optional[torch.Generator]
) -> Tensor:
    """One step of ``euler_stochastic`` from t to t_next < t, given the model's v at (x, t).

    The flow's marginals p_t are shared by the ODE dx = v dt and, for any g(t) >= 0, by the reverse-time SDE
    (written with dtau = -dt > 0, running from t = 1 to 0)

        dx = [-v(x, t) + g(t)^2 / 2 * score(x, t)] dtau + g(t) dW,   score = grad log p_t = -eps_hat / t,

    where eps_hat = E[eps | x_t = x] = x + (1 - t) v and x0_hat = E[x0 | x_t = x] = x - t v. (Fokker-Planck:
    the score term and the diffusion term cancel, leaving the ODE's continuity equation.) We take
    g(t)^2 = 2 eta t, which re-noises a constant fraction per unit of log t, so the SDE reads

        dx = [-v - eta * eps_hat] dtau + sqrt(2 eta t) dW.

    Holding x0_hat fixed over a step, the noise component e in x = (1 - t) x0_hat + t e then follows an
    Ornstein-Uhlenbeck process in log t, which we integrate exactly:

        x_next = (1 - t_next) x0_hat + t_next (c eps_hat + sqrt(1 - c^2) z),  c = (t_next / t)^eta,  z ~ N(0, I).

    To first order in the step this is the Euler-Maruyama step of the SDE above; eta = 0 gives c = 1, the
    Euler step of the ODE; t_next = 0 gives c = 0, i.e. x_next = x0_hat with no noise left.
    """
    x0_hat = x - t * v
    eps_hat = x + (1 - t) * v
    if noise_scale == 0.0:
        return (1 - t_next) * x0_hat + t_next * eps_hat
    c = (t_next / t) ** noise_scale
    z = sample_noise(tuple(x.shape), generator, device=x.device, dtype=x.dtype)
    return (1 - t_next) * x0_hat + t_next * (c * eps_hat + (1 - c * c) ** 0.5 * z)


def sampling_shift(cfg: Config, height: int, width: int) -> float:
    """The timestep shift to sample ``height`` x ``width`` px images with: ``sample.shift`` when given, else
    the training rule :func:`mmdit.flow.timestep_shift` at that size (inference, validation and evaluation
    all call this, so they agree with each other and with training)."""
    if cfg.sample.shift is not None:
        return float(cfg.sample.shift)
    return timestep_shift(cfg.flow, image_tokens(cfg.model, height, width))


def sample_with_config(
    velocity_fn: VelocityFn,
    noise: Tensor,
    cond,
    cfg: SampleConfig,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    shift: Optional[float] = None,
) -> Tensor:
    """:func:`sample` with sampler, steps, guidance, shift and noise scale from a SampleConfig.

    ``shift`` (from :func:`sampling_shift`) is needed when ``cfg.shift`` is null, since the rule depends on
    the image size; an explicit ``cfg.shift`` wins over it.
    """
    if cfg.shift is not None:
        shift = cfg.shift
    elif shift is None:
        raise ValueError("sample.shift is null (the resolution rule): pass shift=sampling_shift(cfg, height, width)")
    return sample(
        velocity_fn,
        noise,
        cond,
        sampler=cfg.sampler,
        num_steps=cfg.num_steps,
        cfg_scale=cfg.cfg_scale,
        shift=shift,
        noise_scale=cfg.noise_scale,
        generator=generator,
        callback=callback,
    )
