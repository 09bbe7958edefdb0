"""Rectified-flow objective: interpolation, timestep distributions, shift, loss weighting, CFG dropout."""

from __future__ import annotations

import math

import pytest
import torch
from conditions import random_condition

from mmdit.conditioning import TextCondition
from mmdit.config import FlowConfig, TextEncoderConfig
from mmdit.flow import (
    cfg_dropout_keep,
    drop_condition,
    encoder_drop_probs,
    flow_loss,
    interpolate,
    logit_normal,
    logit_normal_quantile,
    loss_weight,
    mode,
    mode_transform,
    resolution_shift,
    sample_timesteps,
    shift_timesteps,
    uniform,
    velocity_target,
)

N_T = 50_000
# Dvoretzky-Kiefer-Wolfowitz: sup |F_n - F| > eps with probability <= 2 exp(-2 n eps^2) = 1e-6 here
DKW_EPS = math.sqrt(math.log(2 / 1e-6) / (2 * N_T))
QS = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_cdf_matches(samples: torch.Tensor, quantiles: torch.Tensor) -> None:
    """The empirical CDF at the distribution's q-quantiles must be q (within DKW)."""
    s = samples.double().sort().values
    ecdf = torch.searchsorted(s, quantiles.double(), right=True).double() / len(s)
    assert (ecdf - QS).abs().max().item() < DKW_EPS, (ecdf - QS).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# interpolation


def test_interpolate_endpoints_and_velocity():
    x0, eps = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    assert torch.equal(interpolate(x0, eps, torch.zeros(4)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(4)), eps)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    # per-sample t broadcast over C, H, W
    assert torch.allclose(interpolate(x0, eps, t)[2], 0.4 * x0[2] + 0.6 * eps[2])
    # x_t is linear in t: its derivative is the target
    h = 0.25
    x0d, epsd, td = x0.double(), eps.double(), t.double()
    fd = (interpolate(x0d, epsd, td + h) - interpolate(x0d, epsd, td)) / h
    assert torch.allclose(fd, velocity_target(x0d, epsd), atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# timestep distributions


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.6), (-1.0, 1.5)])
def test_logit_normal_quantiles(mean, std):
    t = logit_normal(N_T, mean, std, generator=gen(1))
    assert t.dtype == torch.float32 and t.shape == (N_T,)
    # sigmoid(mean + std * Phi^-1(q)), Phi^-1 also via erfinv
    q_ref = torch.sigmoid(mean + std * math.sqrt(2) * torch.erfinv(2 * QS - 1))
    assert torch.allclose(logit_normal_quantile(QS, mean, std), q_ref, atol=1e-9)
    assert_cdf_matches(t, q_ref)
    assert abs(torch.logit(t.double()).mean().item() - mean) < 5 * std / math.sqrt(N_T)


def test_uniform():
    t = uniform(N_T, generator=gen(2))
    assert 0 <= t.min() and t.max() < 1
    assert_cdf_matches(t, QS)


@pytest.mark.parametrize("scale", [1.29, 0.5, -0.5])
def test_mode_quantiles(scale):
    t = mode(N_T, scale, generator=gen(3))
    assert 0 <= t.min() and t.max() <= 1
    # t = f(u) with f decreasing: the q-quantile of t is f(1 - q)
    assert_cdf_matches(t, mode_transform(1 - QS, scale))


def test_mode_sanity():
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    f = mode_transform(u, 1.29)
    assert f[0] == 1 and abs(f[-1].item()) < 1e-12 and (f.diff() < 0).all()
    assert torch.allclose(mode_transform(u, 0.0), 1 - u)  # scale 0 is uniform
    # scale > 0 moves mass to the middle: fewer samples near the ends than uniform
    t = mode(N_T, 1.29, generator=gen(4))
    assert ((t < 0.1) | (t > 0.9)).double().mean() < 0.15
    with pytest.raises(ValueError):
        mode(10, 2.0)


def test_sample_timesteps_dispatch_and_shift():
    cfg = FlowConfig(timestep_sampling="logit_normal", logit_mean=0.3, logit_std=0.7)
    assert torch.equal(sample_timesteps(100, cfg, gen(5)), logit_normal(100, 0.3, 0.7, generator=gen(5)))
    uni, mod = FlowConfig(timestep_sampling="uniform"), FlowConfig(timestep_sampling="mode", mode_scale=0.8)
    assert torch.equal(sample_timesteps(100, uni, gen(5)), uniform(100, generator=gen(5)))
    assert torch.equal(sample_timesteps(100, mod, gen(5)), mode(100, 0.8, generator=gen(5)))
    shifted = FlowConfig(shift_base_tokens=256)
    with pytest.raises(ValueError, match="num_tokens"):
        sample_timesteps(10, shifted, gen(5))
    # 1024 tokens over a base of 256: shift 2, and the quantiles are the shifted logit-normal ones
    t = sample_timesteps(N_T, shifted, gen(6), num_tokens=1024)
    assert_cdf_matches(t, shift_timesteps(logit_normal_quantile(QS), 2.0))
    assert torch.equal(sample_timesteps(100, shifted, gen(7), num_tokens=256), logit_normal(100, generator=gen(7)))


def test_shift_monotone_fixes_ends_and_inverts():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for a in [0.5, 1.0, 1.7, 3.0, 6.0]:
        s = shift_timesteps(t, a)
        assert s[0] == 0 and s[-1] == 1
        assert (s.diff() > 0).all()
        assert torch.allclose(shift_timesteps(s, 1 / a), t, atol=1e-12)
        # the SNR ((1 - t) / t)^2 is divided by a^2
        mid = t[1:-1]
        snr = ((1 - mid) / mid) ** 2
        assert torch.allclose(((1 - s[1:-1]) / s[1:-1]) ** 2, snr / a**2, rtol=1e-9)
    assert (shift_timesteps(t, 3.0)[1:-1] > t[1:-1]).all()  # shift > 1 moves toward noise
    assert resolution_shift(1024, 256) == 2.0 and resolution_shift(256, 256) == 1.0
    with pytest.raises(ValueError):
        shift_timesteps(t, 0.0)


# ---------------------------------------------------------------------------------------------------------
# loss

MU = torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64)
SIG = torch.tensor([0.5, 2.0, 0.8], dtype=torch.float64)


def gaussian_velocity(x, t, cond=None):
    """E[eps - x0 | x_t] for x0 ~ N(MU, SIG^2), see tests/test_sampling.py."""
    t = t.reshape(-1, 1).to(x.dtype)
    var = (1 - t) ** 2 * SIG**2 + t**2
    return -MU + (t - (1 - t) * SIG**2) / var * (x - (1 - t) * MU)


def test_flow_loss_of_exact_posterior_mean_is_conditional_variance():
    n, t0 = 40_000, 0.35
    g = gen(8)
    x0 = MU + SIG * torch.randn(n, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = torch.full((n,), t0, dtype=torch.float64)
    loss, per_sample = flow_loss(gaussian_velocity, x0, None, t, eps)
    assert per_sample.shape == (n,) and per_sample.dtype == torch.float32
    assert torch.isclose(loss, per_sample.mean())
    # Var(v | x_t) = Var(v) - Cov(v, x_t)^2 / Var(x_t), averaged over the 3 dims
    var_xt = (1 - t0) ** 2 * SIG**2 + t0**2
    cond_var = (1 + SIG**2 - (t0 - (1 - t0) * SIG**2) ** 2 / var_xt).mean().item()
    se = per_sample.double().std().item() / math.sqrt(n)
    assert abs(loss.item() - cond_var) < 5 * se
    # an oracle that knows the target has zero loss; a gradient flows to a model's parameters
    oracle_loss, _ = flow_loss(lambda x, tt, c: eps - x0, x0, None, t, eps)
    assert oracle_loss.item() == 0.0
    w = torch.zeros(3, requires_grad=True)
    lin_loss, _ = flow_loss(lambda x, tt, c: x.float() * w, x0[:8].float(), None, t[:8].float(), eps[:8].float())
    lin_loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_loss_weighting():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert torch.equal(loss_weight(t, "none"), torch.ones_like(t))
    gamma = 5.0
    w = loss_weight(t, "snr_clip", gamma)
    assert w[0] == 0 and w[-1] == 1 and (w.diff() >= 0).all() and w.max() == 1
    t_star = 1 / (1 + math.sqrt(gamma))  # SNR(t*) = gamma
    assert (w[t >= t_star] == 1).all()
    low = t[(t > 0) & (t < t_star)]
    assert torch.allclose(loss_weight(low, "snr_clip", gamma), gamma / ((1 - low) / low) ** 2)
    # weighted loss is mean(w * per_sample); per_sample stays unweighted
    x0, eps = torch.randn(6, 4), torch.randn(6, 4)
    tt = torch.tensor([0.05, 0.1, 0.2, 0.5, 0.7, 0.95])
    loss, per = flow_loss(lambda x, t_, c: torch.zeros_like(x), x0, None, tt, eps, weighting="snr_clip")
    assert torch.allclose(per, ((eps - x0) ** 2).mean(1))
    assert torch.isclose(loss, (loss_weight(tt, "snr_clip") * per).mean())
    with pytest.raises(ValueError):
        loss_weight(t, "bogus")


# ---------------------------------------------------------------------------------------------------------
# CFG dropout




def assert_cond_equal(a: TextCondition, b: TextCondition) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert all(torch.equal(x, y) for x, y in zip(a.masks, b.masks))
    assert (a.pooled is None and b.pooled is None) or torch.equal(a.pooled, b.pooled)


def test_cfg_dropout_rates():
    n, p, q = 200_000, 0.1, [0.05, 0.3, 0.5]
    keep = cfg_dropout_keep(n, 3, p, q, gen(9))
    assert keep.shape == (n, 3) and keep.dtype == torch.bool

    def check(observed_mask: torch.Tensor, prob: float) -> None:
        rate = observed_mask.double().mean().item()
        assert abs(rate - prob) < 5 * math.sqrt(prob * (1 - prob) / n) + 1e-12, (rate, prob)

    for i in range(3):
        check(~keep[:, i], p + (1 - p) * q[i])
        for j in range(i + 1, 3):
            check(keep[:, i] & keep[:, j], (1 - p) * (1 - q[i]) * (1 - q[j]))
    check(~keep.any(1), p + (1 - p) * math.prod(q))
    check(keep.all(1), (1 - p) * math.prod(1 - x for x in q))
    # no per-encoder drop: whole rows only, at rate p
    keep0 = cfg_dropout_keep(n, 3, p, None, gen(10))
    assert (keep0.all(1) | ~keep0.any(1)).all()
    check(~keep0[:, 0], p)


def test_cfg_dropout_all_dropped_is_dropped_condition():
    cond = random_condition(6)
    assert_cond_equal(drop_condition(cond, 1.0), cond.dropped())
    assert_cond_equal(drop_condition(cond, 0.0, [1.0, 1.0, 1.0]), cond.dropped())
    assert_cond_equal(drop_condition(cond, 0.0), cond)
    # mixed: all-dropped rows equal the unconditional rows, untouched rows the original ones
    cond = random_condition(64, seed=1)
    keep = cfg_dropout_keep(64, 3, 0.3, [0.2, 0.2, 0.2], gen(11))
    dropped, out, unc = ~keep.any(1), cond.keep(keep), cond.dropped()
    kept = keep.all(1)
    assert dropped.any() and kept.any()
    for a, b, c in zip(
        out.tokens + out.masks + [out.pooled],
        unc.tokens + unc.masks + [unc.pooled],
        cond.tokens + cond.masks + [cond.pooled],
    ):
        assert torch.equal(a[dropped], b[dropped])
        assert torch.equal(a[kept], c[kept])


def test_cfg_dropout_seeded_and_validated():
    assert torch.equal(
        cfg_dropout_keep(100, 3, 0.2, [0.1, 0.2, 0.3], gen(12)), cfg_dropout_keep(100, 3, 0.2, [0.1, 0.2, 0.3], gen(12))
    )
    with pytest.raises(ValueError):
        cfg_dropout_keep(4, 3, 0.1, [0.1, 0.1])
    with pytest.raises(ValueError):
        cfg_dropout_keep(4, 2, 1.5)


def test_encoder_drop_probs_order():
    cfgs = [
        TextEncoderConfig(name="clip", kind="pooled", drop_prob=0.3),
        TextEncoderConfig(name="gemma", kind="sequence", drop_prob=0.1),
        TextEncoderConfig(name="bert", kind="sequence", drop_prob=0.2),
    ]
    assert encoder_drop_probs(cfgs) == [0.1, 0.2, 0.3]
