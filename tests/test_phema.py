"""Post-hoc EMA (EDM2): the maths against exact answers, the tracker's telescoping identity, and the
reconstruction against a power-function EMA of that length computed directly, within a proven bound."""

import numpy as np
import pytest
import torch

from mmdit.config import ConfigError, load_config
from mmdit.reconstruct_ema import reconstruct, select_snapshots
from mmdit.train.phema import (
    MAX_STD,
    exp_to_std,
    power_function_beta,
    power_function_correlation,
    profile_residual,
    solve_posthoc_coefficients,
    std_to_exp,
)
from mmdit.train.phema_tracker import PowerFunctionEMA, list_snapshots


def test_std_and_exponent_exact_values():
    # std^2 = (g + 1) / ((g + 2)^2 (g + 3)): g = 0 is the uniform average (1/12), g = 1 gives 2 / 36, g = 2 3 / 80
    assert exp_to_std(0.0) == pytest.approx(np.sqrt(1 / 12), rel=1e-15)
    assert exp_to_std(1.0) == pytest.approx(np.sqrt(1 / 18), rel=1e-15)
    assert exp_to_std(2.0) == pytest.approx(np.sqrt(3 / 80), rel=1e-15)
    assert std_to_exp(np.sqrt(1 / 18)) == pytest.approx(1.0, rel=1e-10)
    assert std_to_exp(np.sqrt(3 / 80)) == pytest.approx(2.0, rel=1e-10)
    for g in (0.5, 3.0, 6.94, 16.97, 100.0):
        assert std_to_exp(exp_to_std(g)) == pytest.approx(g, rel=1e-9)
    assert std_to_exp(np.array([[0.05, 0.10]])).shape == (1, 2)
    with pytest.raises(ValueError, match="must lie in"):
        std_to_exp(MAX_STD + 1e-3)


def discrete_weights(times: np.ndarray, std: float) -> np.ndarray:
    """Weight of each step's parameters in the tracked EMA at times[-1], by running the beta recursion."""
    w = np.zeros(len(times))
    prev = 0.0
    for k, t in enumerate(times):
        beta = power_function_beta(std, t, t - prev)
        w *= beta
        w[k] += 1 - beta
        prev = t
    return w


def test_tracked_ema_is_the_power_function_on_the_step_intervals():
    """The betas telescope: step k's weight is (t_k^(g+1) - t_(k-1)^(g+1)) / T^(g+1), for any batch sizes."""
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.integers(1, 40, size=300)).astype(np.float64)
    for std in (0.05, 0.10, 0.2):
        g = std_to_exp(std)
        expected = np.diff(np.concatenate([[0.0], times]) ** (g + 1)) / times[-1] ** (g + 1)
        np.testing.assert_allclose(discrete_weights(times, std), expected, rtol=1e-9, atol=1e-15)
    assert power_function_beta(0.1, 32, 32) == 0.0  # the first update copies the weights


def test_correlation_against_numerical_integration():
    def profile(t_end, std, tau):
        g = std_to_exp(std)
        return np.where(tau <= t_end, (g + 1) * tau ** g / t_end ** (g + 1), 0.0)

    n = 2_000_000
    for (ta, sa), (tb, sb) in [((100.0, 0.05), (100.0, 0.05)), ((60.0, 0.10), (100.0, 0.05)),
                               ((100.0, 0.05), (37.0, 0.2))]:
        end = max(ta, tb)
        tau = (np.arange(n) + 0.5) * end / n
        numeric = np.sum(profile(ta, sa, tau) * profile(tb, sb, tau)) * end / n
        assert power_function_correlation(ta, sa, tb, sb) == pytest.approx(numeric, rel=1e-6)
        assert power_function_correlation(ta, sa, tb, sb) == pytest.approx(power_function_correlation(tb, sb, ta, sa),
                                                                           rel=1e-14)


def test_solve_returns_the_snapshot_itself_when_the_target_is_one():
    t = np.array([100.0, 100.0, 200.0, 200.0, 300.0, 300.0])
    s = np.array([0.05, 0.10] * 3)
    coefs = solve_posthoc_coefficients(t, s, 300.0, [0.10, 0.05])
    np.testing.assert_allclose(coefs[:, 0], [0, 0, 0, 0, 0, 1], atol=1e-8)
    np.testing.assert_allclose(coefs[:, 1], [0, 0, 0, 0, 1, 0], atol=1e-8)
    assert profile_residual(t, s, 300.0, [0.10], coefs[:, :1]) == pytest.approx(0.0, abs=1e-6)
    # a length between the tracked ones: sums to 1, and more snapshots fit it better
    sparse = profile_residual(t, s, 300.0, [0.07], solve_posthoc_coefficients(t, s, 300.0, [0.07]))[0]
    dense_t = np.repeat(np.arange(1, 31) * 10.0, 2)
    dense_s = np.tile([0.05, 0.10], 30)
    dense_c = solve_posthoc_coefficients(dense_t, dense_s, 300.0, [0.07])
    assert dense_c.sum() == pytest.approx(1.0, abs=1e-12)
    dense = profile_residual(dense_t, dense_s, 300.0, [0.07], dense_c)[0]
    own = np.sqrt(power_function_correlation(300.0, 0.07, 300.0, 0.07))
    assert dense < sparse and dense < 0.01 * own


def test_reconstruction_matches_a_directly_tracked_ema_within_its_bound(tmp_path):
    """Weights on a random walk (varying batch sizes), profiles 0.05 and 0.10 snapshotted every 10 steps: the
    reconstruction of 0.07 differs from a 0.07 EMA tracked alongside by at most (profile residual) x (L2 norm
    of the trajectory about its mean), Cauchy-Schwarz on the piecewise-constant trajectory, plus fp32 rounding;
    and the error is tiny against the distance between the 0.07 and 0.05 EMAs."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    tracked = PowerFunctionEMA(model, [0.05, 0.10])
    direct = PowerFunctionEMA(model, [0.07, 0.05])
    gen = np.random.default_rng(1)
    images, trajectory, steps = 0, [], 400
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01 + 0.002)  # a drift, as a training run has
        delta = int(gen.integers(8, 33))
        images += delta
        trajectory.append((delta, torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])))
        tracked.update(model, images, step)
        direct.update(model, images, step)
        if step % 10 == 0:
            tracked.write_snapshots(tmp_path, "fp32")
    snaps, at = select_snapshots(list_snapshots(tmp_path), None, None)
    assert at == images and len(snaps) == 80
    (rec,), coefs, residual = reconstruct(snaps, at, [0.07])
    flat = lambda state: torch.cat([state[k].reshape(-1) for k in ("weight", "bias")]).double()  # noqa: E731
    want = flat(direct.profiles["std0.070"])
    err = float((flat(rec) - want).norm())
    dt = torch.tensor([d for d, _ in trajectory], dtype=torch.float64)
    theta = torch.stack([w for _, w in trajectory]).double()
    mean = (dt[:, None] * theta).sum(0) / dt.sum()
    spread = float(((dt[:, None] * (theta - mean) ** 2).sum()).sqrt())
    rounding = (np.abs(coefs).sum() + steps) * 1.2e-7 * float(theta[-1].norm())  # fp32, relative to the weights
    assert err <= residual[0] * spread + rounding
    apart = float((want - flat(direct.profiles["std0.050"])).norm())
    assert err < 1e-3 * apart, (err, apart)  # measured: 6e-5


def test_snapshots_fp16_and_config_checks(tmp_path):
    model = torch.nn.Linear(4, 4)
    ema = PowerFunctionEMA(model, [0.05])
    ema.update(model, 10, 1)
    (path,) = ema.write_snapshots(tmp_path, "fp16")
    assert path.name == "std0.050-img000000000010.safetensors"
    assert list_snapshots(tmp_path)[0] == {"path": path, "std": 0.05, "images": 10, "step": 1}
    with pytest.raises(ValueError, match="not after the last one"):
        ema.update(model, 10, 2)
    with pytest.raises(ConfigError, match="train.phema.stds"):
        load_config("tiny_latent", ["train.phema.stds=[0.3]"])
    assert not load_config("tiny_latent").train.phema.enabled  # off by default
