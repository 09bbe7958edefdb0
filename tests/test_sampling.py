"""Samplers against the exact velocity field of Gaussian data, CFG batching, seeds and callbacks.

For x0 ~ N(mu, sigma^2) (per dimension) and x_t = (1 - t) x0 + t eps, eps ~ N(0, 1):
    x_t ~ N((1 - t) mu, V(t)),  V(t) = (1 - t)^2 sigma^2 + t^2,
    Cov(eps - x0, x_t) = t - (1 - t) sigma^2,  so  E[v | x_t] = -mu + (t - (1 - t) sigma^2) / V(t) (x_t - (1 - t) mu).
The probability-flow ODE dx/dt = E[v | x] maps x_1 = z to x_t = (1 - t) mu + sqrt(V(t)) z (differentiate:
d sqrt(V)/dt = (t - (1 - t) sigma^2) / sqrt(V)), so its exact endpoint is x_0 = mu + sigma z.
"""

from __future__ import annotations

import math

import pytest
import torch
from conditions import random_condition

from mmdit.conditioning import TextCondition
from mmdit.config import SampleConfig
from mmdit.flow import shift_timesteps
from mmdit.sampling import num_evaluations, sample, sample_noise, sample_with_config, timestep_schedule

MU = torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64)
SIG = torch.tensor([0.5, 2.0, 0.8], dtype=torch.float64)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def var_t(t: float | torch.Tensor):
    return (1 - t) ** 2 * SIG**2 + t**2


def gaussian_velocity(x, t, cond=None):
    t = t.reshape(-1, 1).to(x.dtype)
    return -MU + (t - (1 - t) * SIG**2) / var_t(t) * (x - (1 - t) * MU)


def ode_solution(z, t: float):
    return (1 - t) * MU + var_t(t).sqrt() * z


def test_exact_field_fixture_is_consistent():
    """The closed-form ODE solution solves dx/dt = E[v | x] (finite differences)."""
    z = torch.randn(16, 3, dtype=torch.float64, generator=gen(0))
    for t in [0.0, 0.2, 0.5, 0.9, 1.0]:
        h = 1e-6
        lo, hi = max(t - h, 0.0), min(t + h, 1.0)
        fd = (ode_solution(z, hi) - ode_solution(z, lo)) / (hi - lo)
        v = gaussian_velocity(ode_solution(z, t), torch.full((16,), t, dtype=torch.float64))
        assert torch.allclose(fd, v, atol=1e-4)  # one-sided at t = 0 and 1
    assert torch.allclose(ode_solution(z, 0.0), MU + SIG * z)


def test_timestep_schedule():
    ts = timestep_schedule(10)
    assert ts.shape == (11,) and ts[0] == 1 and ts[-1] == 0
    assert torch.allclose(ts, torch.linspace(1, 0, 11, dtype=torch.float64))
    shifted = timestep_schedule(10, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted.diff() < 0).all()
    assert torch.allclose(shifted, shift_timesteps(ts, 3.0))
    assert (shifted[1:-1] > ts[1:-1]).all()


def fitted_order(sampler: str, shift: float, steps: list[int]) -> float:
    z = torch.randn(64, 3, dtype=torch.float64, generator=gen(1))
    exact = MU + SIG * z
    errs = [
        (sample(gaussian_velocity, z, sampler=sampler, num_steps=n, shift=shift) - exact).abs().max().item()
        for n in steps
    ]
    log_n = torch.tensor(steps, dtype=torch.float64).log()
    log_e = torch.tensor(errs, dtype=torch.float64).log()
    slope = ((log_n - log_n.mean()) * (log_e - log_e.mean())).sum() / ((log_n - log_n.mean()) ** 2).sum()
    return -slope.item()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_convergence_orders(shift):
    steps = [32, 64, 128, 256, 512]
    assert fitted_order("euler", shift, steps) >= 0.8
    assert fitted_order("heun", shift, steps) >= 1.8


def test_euler_stochastic_marginals():
    """20k SDE samples: mean and variance of the target, at the end and at t = 0.5 (through the callback).

    The sampler is first order (weak): at 500 steps its variance bias here is ~1% (computable in closed form
    for Gaussian data), within the tolerance below next to the ~1% sampling error (SE of a variance:
    sqrt(2 / n) relative).
    """
    n, steps = 20_000, 500
    z = torch.randn(n, 3, dtype=torch.float64, generator=gen(2))
    frames = {}

    def grab(i, t, x):
        if abs(t - 0.5) < 1e-9:
            frames[t] = x.clone()

    x = sample(
        gaussian_velocity,
        z,
        sampler="euler_stochastic",
        num_steps=steps,
        noise_scale=1.0,
        generator=gen(3),
        callback=grab,
    )
    for t, xs, mean, var in [(0.0, x, MU, SIG**2), (0.5, frames[0.5], 0.5 * MU, var_t(0.5))]:
        sd = var.sqrt()
        assert ((xs.mean(0) - mean).abs() < 4 * sd / math.sqrt(n)).all(), (t, xs.mean(0), mean)
        rel = xs.var(0) / var - 1
        assert (rel.abs() < 4 * math.sqrt(2 / n) + 0.015).all(), (t, rel)
    # it is stochastic: the endpoint forgets much of the starting noise (the ODE keeps correlation 1)
    corr = [torch.corrcoef(torch.stack([z[:, i], x[:, i]]))[0, 1].item() for i in range(3)]
    assert max(corr) < 0.8 and min(corr) > -0.1


def test_euler_stochastic_without_noise_is_euler():
    z = torch.randn(32, 3, dtype=torch.float64, generator=gen(4))
    a = sample(gaussian_velocity, z, sampler="euler", num_steps=20, shift=2.0)
    b = sample(gaussian_velocity, z, sampler="euler_stochastic", num_steps=20, shift=2.0, noise_scale=0.0)
    assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_stochastic"])
def test_seed_reproduces_and_callback(sampler):
    calls = []

    def fn(x, t, cond):
        calls.append(x.shape[0])
        return gaussian_velocity(x, t)

    def run(seed, callback=None):
        noise = sample_noise((8, 3), gen(seed), dtype=torch.float32)
        return sample(fn, noise, sampler=sampler, num_steps=6, generator=gen(seed + 100), callback=callback)

    frames = []
    a = run(5, callback=lambda i, t, x: frames.append((i, t, x.clone())))
    assert len(calls) == num_evaluations(sampler, 6)
    assert a.dtype == torch.float32
    b = run(5)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(6))
    ts = timestep_schedule(6).tolist()
    assert [f[0] for f in frames] == list(range(6)) and [f[1] for f in frames] == ts[1:]
    assert torch.equal(frames[-1][2], a)


# ---------------------------------------------------------------------------------------------------------
# classifier-free guidance




def cond_velocity(x, t, cond: TextCondition):
    """A toy model whose output depends on x, t and every part of the condition."""
    b = sum((tok * m[..., None]).sum((1, 2)) for tok, m in zip(cond.tokens, cond.masks)) + cond.pooled.sum(1)
    return -x * (1 + t[:, None]) + b[:, None].to(x.dtype) * 0.1 + 0.3


class Recorder:
    def __init__(self):
        self.conds, self.batches = [], []

    def __call__(self, x, t, cond):
        self.conds.append(cond)
        self.batches.append(x.shape[0])
        return cond_velocity(x, t, cond)


def assert_cond_equal(a: TextCondition, b: TextCondition) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert all(torch.equal(x, y) for x, y in zip(a.masks, b.masks))
    assert torch.equal(a.pooled, b.pooled)


def manual_guided_euler(noise, cond, scale, steps):
    x = noise.clone()
    unc = cond.dropped()
    ts = timestep_schedule(steps).tolist()
    for t, tn in zip(ts[:-1], ts[1:]):
        tb = torch.full((x.shape[0],), t, dtype=x.dtype)
        v_c, v_u = cond_velocity(x, tb, cond), cond_velocity(x, tb, unc)
        x = x + (tn - t) * (v_u + scale * (v_c - v_u))
    return x


def test_cfg_one_batched_call_with_dropped_condition():
    cond, noise = random_condition(4), sample_noise((4, 6), gen(7))
    rec = Recorder()
    out = sample(rec, noise, cond, sampler="euler", num_steps=5, cfg_scale=4.0)
    assert rec.batches == [8] * 5  # cond and uncond halves in one call per step
    expected = TextCondition.cat([cond, cond.dropped()])
    for c in rec.conds:
        assert_cond_equal(c, expected)
    assert torch.allclose(out, manual_guided_euler(noise, cond, 4.0, 5), atol=1e-5)


def test_cfg_scale_one_is_conditional_prediction():
    cond, noise = random_condition(4), sample_noise((4, 6), gen(8))
    rec = Recorder()
    out = sample(rec, noise, cond, sampler="heun", num_steps=5, cfg_scale=1.0)
    assert rec.batches == [4] * num_evaluations("heun", 5)
    for c in rec.conds:
        assert_cond_equal(c, cond)
    plain = sample(lambda x, t, c: cond_velocity(x, t, cond), noise, None, sampler="heun", num_steps=5)
    assert torch.equal(out, plain)
    # scale 0 is the unconditional prediction, also from a single half-size batch
    rec0 = Recorder()
    out0 = sample(rec0, noise, cond, num_steps=5, cfg_scale=0.0)
    assert rec0.batches == [4] * 5
    assert torch.equal(out0, sample(lambda x, t, c: cond_velocity(x, t, cond.dropped()), noise, num_steps=5))


def test_sample_with_config_and_errors():
    cond, noise = random_condition(4), sample_noise((4, 6), gen(9))
    cfg = SampleConfig(sampler="euler_stochastic", num_steps=4, cfg_scale=3.0, shift=2.0, noise_scale=0.5)
    a = sample_with_config(cond_velocity, noise, cond, cfg, generator=gen(10))
    b = sample(
        cond_velocity,
        noise,
        cond,
        sampler="euler_stochastic",
        num_steps=4,
        cfg_scale=3.0,
        shift=2.0,
        noise_scale=0.5,
        generator=gen(10),
    )
    assert torch.equal(a, b)
    custom = sample(cond_velocity, noise, cond, num_steps=99, cfg_scale=3.0, timesteps=timestep_schedule(4, 2.0))
    assert torch.equal(custom, sample(cond_velocity, noise, cond, num_steps=4, cfg_scale=3.0, shift=2.0))
    with pytest.raises(ValueError, match="timesteps"):
        sample(cond_velocity, noise, cond, timesteps=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="cfg_scale"):
        sample(gaussian_velocity, noise, None, cfg_scale=2.0)
    with pytest.raises(ValueError, match="sampler"):
        sample(gaussian_velocity, noise, sampler="ddim")
    with pytest.raises(ValueError, match="batch"):
        sample(cond_velocity, noise[:2], cond, cfg_scale=2.0)


def test_shift_rule_base_size_presets_and_explicit():
    """One rule: 1 at the 256 px base, sqrt(tokens / 256) above it; the 1024 preset samples with its 3.0."""
    from mmdit.config import load_config
    from mmdit.flow import image_tokens, timestep_grid, timestep_shift
    from mmdit.sampling import sampling_shift

    c512 = load_config("sd3_512")
    assert image_tokens(c512.model, 256, 256) == 256 and image_tokens(c512.model, 1024, 512) == 2048
    assert sampling_shift(c512, 256, 256) == 1.0
    assert sampling_shift(c512, 512, 512) == 2.0 and sampling_shift(c512, 1024, 1024) == 4.0
    assert timestep_shift(c512.flow, 4096) == 4.0  # training at 1024 px: the same function
    c1024 = load_config("sd3_1024")
    assert c1024.flow.shift_base_tokens == 256 and sampling_shift(c1024, 1024, 1024) == 3.0
    assert sampling_shift(load_config("sd3_1024", ["sample.shift=null"]), 1024, 1024) == 4.0
    assert sampling_shift(load_config("sd3_256"), 1024, 1024) == 1.0  # no base tokens: no shift
    noise = sample_noise((2, 3), gen(0))
    with pytest.raises(ValueError, match="sampling_shift"):
        sample_with_config(gaussian_velocity, noise, None, SampleConfig(cfg_scale=1.0))
    a = sample_with_config(gaussian_velocity, noise, None, SampleConfig(num_steps=3, cfg_scale=1.0), shift=2.0)
    assert torch.equal(a, sample(gaussian_velocity, noise, num_steps=3, shift=2.0))
    # the validation-loss grid: mid-quantiles of the training law
    grid = timestep_grid(c512.flow, 8)
    assert grid.shape == (8,) and (grid.diff() > 0).all() and abs(grid[3] + grid[4] - 1) < 1e-12
    assert torch.allclose(timestep_grid(load_config("tiny", ["flow.timestep_sampling=uniform"]).flow, 4),
                          torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64))


@pytest.mark.parametrize("shift, steps, bound", [(3.0, 10, 0.025), (3.0, 20, 0.006), (1.0, 10, 0.008)])
def test_heun_keeps_the_variance(shift, steps, bound):
    """The sample std on Gaussian data with exact velocities, at the shifts the 512/1024 presets sample with.

    The ODE map z -> x_0 is affine here, so the std it gives is x_0(z = 1) - x_0(z = 0), exactly (no
    sampling error). Heun's last step is second order too: with a plain Euler last step (shift(1/N) -> 0)
    the std of the sigma = 0.5 dimension came out 15.7 % low at N = 10, shift 3, 4.4 % at N = 20 and 1.8 % at
    N = 10, shift 1; with the corrector at t = 0, at most 1.8 %, 0.41 % and 0.59 % over the three dimensions
    (BENCHMARKS.md, "Heun vs Euler"): second order, the error falls ~4x from N = 10 to 20.
    """
    z = torch.stack([torch.zeros(3), torch.ones(3)]).double()
    x = sample(gaussian_velocity, z, sampler="heun", num_steps=steps, shift=shift)
    rel = (x[1] - x[0]) / SIG - 1
    assert (rel.abs() < bound).all(), rel
    euler = sample(gaussian_velocity, z, sampler="euler", num_steps=steps, shift=shift)
    assert ((euler[1] - euler[0]) / SIG - 1).abs().min() > 4 * bound  # Euler, first order: far worse
