"""The maths of post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", sec. 3 and appendix C), as pure float64 functions.

A power-function EMA profile of exponent ``gamma`` averages the weights seen up to time ``t`` with the density
``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``[0, t]``; its relative standard deviation ``std`` (the
EMA length as a fraction of ``t``) is the user-facing knob. Tracked during training with
``beta = (1 - delta / t)^(gamma + 1)``, the product of the betas telescopes, so the discrete EMA gives the
step ending at ``t_k`` exactly ``(t_k^(gamma+1) - t_(k-1)^(gamma+1)) / t^(gamma+1)``: the continuous profile
applied to the piecewise-constant weight trajectory. Post-hoc reconstruction finds the combination of stored
snapshots whose profile is closest, in L2, to the wanted one (a least-squares solve on profile inner products).
Time may be counted in any unit (we use images seen); only ratios of times enter.
"""

from __future__ import annotations

import numpy as np

MAX_STD = float(np.sqrt(1.0 / 12.0))  # gamma -> 0: the uniform average over [0, t], the longest profile


def exp_to_std(exp) -> np.ndarray:
    """Relative standard deviation of the power-function profile of exponent ``exp`` (EDM2 eq. 123)."""
    exp = np.float64(exp)
    return np.sqrt((exp + 1) / ((exp + 2) ** 2 * (exp + 3)))


def std_to_exp(std) -> np.ndarray:
    """The exponent gamma whose profile has relative standard deviation ``std``: the largest real root of
    ``(g + 2)^2 (g + 3) = (g + 1) / std^2`` (EDM2 eq. 126). ``std`` must lie in (0, sqrt(1/12))."""
    std = np.asarray(std, dtype=np.float64)
    if np.any(std <= 0) or np.any(std >= MAX_STD):
        raise ValueError(f"EMA std {std.tolist()} must lie in (0, {MAX_STD:.4f}) (relative to the training time)")
    inv = std.reshape(-1) ** -2
    roots = [np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]) for s in inv]
    return np.array([r[np.abs(r.imag) < 1e-9].real.max() for r in roots]).reshape(std.shape)


def power_function_beta(std, t_next, t_delta) -> np.ndarray:
    """The decay that moves a profile of ``std`` from time ``t_next - t_delta`` to ``t_next`` (EDM2 eq. 127);
    0 at the first update (``t_delta == t_next``): the average starts as the weights themselves."""
    return (1.0 - np.float64(t_delta) / np.float64(t_next)) ** (std_to_exp(std) + 1.0)


def power_function_correlation(a_time, a_std, b_time, b_std) -> np.ndarray:
    """Inner products ``integral p_a(tau) p_b(tau) dtau`` of two power-function profiles ending at ``a_time``
    and ``b_time`` (EDM2 eq. 151); broadcasts."""
    a_time, b_time = np.float64(a_time), np.float64(b_time)
    a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
    first_ends = a_time < b_time
    ratio_exp = np.where(first_ends, b_exp, -a_exp)  # (t_short / t_long) ^ (exponent of the longer one)
    num = (a_exp + 1) * (b_exp + 1) * (a_time / b_time) ** ratio_exp
    return num / ((a_exp + b_exp + 1) * np.maximum(a_time, b_time))


def solve_posthoc_coefficients(in_time, in_std, out_time, out_std) -> np.ndarray:
    """Coefficients ``[num_in, num_out]``: output profile j ~ sum_i X[i, j] * snapshot i, the L2-closest
    combination (normal equations), each column normalised to sum to 1 (EDM2 algorithm 3)."""
    in_time, in_std = np.broadcast_arrays(np.float64(in_time), np.float64(in_std))
    out_time, out_std = np.broadcast_arrays(np.float64(out_time), np.float64(out_std))
    rows = lambda x: x.reshape(-1, 1)  # noqa: E731
    cols = lambda x: x.reshape(1, -1)  # noqa: E731
    gram = power_function_correlation(rows(in_time), rows(in_std), cols(in_time), cols(in_std))
    cross = power_function_correlation(rows(in_time), rows(in_std), cols(out_time), cols(out_std))
    coefs = np.linalg.solve(gram, cross)
    return coefs / coefs.sum(axis=0, keepdims=True)


def profile_residual(in_time, in_std, out_time, out_std, coefs: np.ndarray) -> np.ndarray:
    """L2 norm of (reconstructed profile - wanted profile) per output: by Cauchy-Schwarz, the reconstruction
    of any weight differs from the true EMA by at most this times the L2 norm of (its trajectory - any
    constant) over [0, out_time]."""
    in_time, in_std = np.broadcast_arrays(np.float64(in_time), np.float64(in_std))
    out_time, out_std = np.broadcast_arrays(np.float64(out_time), np.float64(out_std))
    rows = lambda x: x.reshape(-1, 1)  # noqa: E731
    cols = lambda x: x.reshape(1, -1)  # noqa: E731
    gram = power_function_correlation(rows(in_time), rows(in_std), cols(in_time), cols(in_std))
    cross = power_function_correlation(rows(in_time), rows(in_std), cols(out_time), cols(out_std))
    own = power_function_correlation(out_time.reshape(-1), out_std.reshape(-1), out_time.reshape(-1),
                                     out_std.reshape(-1))
    sq = np.einsum("ij,ik,kj->j", coefs, gram, coefs) - 2 * np.einsum("ij,ij->j", coefs, cross) + own
    return np.sqrt(np.maximum(sq, 0.0))
