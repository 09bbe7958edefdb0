"""Sampler accuracy with exact velocities: the sample std of Gaussian data (std 0.5) after N steps.

    python bench/heun_gaussian.py                  # the table of BENCHMARKS.md, "Heun vs Euler"

For x0 ~ N(0, sigma^2) the flow's velocity is known in closed form (tests/test_sampling.py derives it) and the
ODE map z -> x_0 is affine, so a sampler's std is x_0(z = 1) - x_0(z = 0): exact, no sampling error. Rows:
``euler`` and ``heun`` as :func:`mmdit.sampling.sample` runs them, and two other ends of Heun measured to
choose the last step: a plain Euler last step (Karras et al. 2022; what ``heun`` did before issue 22), and
Heun down to t_min = 1e-3 followed by one Euler step to 0. Seconds; no model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from mmdit.sampling import sample, timestep_schedule  # noqa: E402

SIGMA = 0.5


def velocity(x: torch.Tensor, t, cond=None) -> torch.Tensor:
    """E[eps - x0 | x_t = x] for x0 ~ N(0, SIGMA^2)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    return (t - (1 - t) * SIGMA**2) / ((1 - t) ** 2 * SIGMA**2 + t**2) * x


def heun_ending_with_euler(ts: list[float]) -> float:
    """Heun on every step but the last, which is an Euler step (the last interval of ``ts`` ends at 0)."""
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t)
        x_pred = x + (t_next - t) * v
        x = x + (t_next - t) * 0.5 * (v + velocity(x_pred, t_next)) if t_next > 0 else x_pred
    return float(x[1] - x[0])


def std_of(sampler: str, steps: int, shift: float) -> float:
    z = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    x = sample(velocity, z, sampler=sampler, num_steps=steps, shift=shift)
    return float(x[1] - x[0])


def table(steps: list[int], shifts: list[float], t_min: float = 1e-3) -> list[dict]:
    rows = []
    for shift in shifts:
        for n in steps:
            ts = timestep_schedule(n, shift).tolist()
            squeezed = [t_min + (1 - t_min) * t for t in ts] + [0.0]  # Heun to t_min, then Euler to 0
            stds = {"euler": std_of("euler", n, shift), "heun": std_of("heun", n, shift),
                    "heun, Euler last step": heun_ending_with_euler(ts),
                    f"heun to {t_min:g}, then Euler": heun_ending_with_euler(squeezed)}
            rows.append({"shift": shift, "N": n, **{k: 100 * (v / SIGMA - 1) for k, v in stds.items()}})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="10,20,50")
    p.add_argument("--shifts", default="1,3")
    args = p.parse_args(argv)
    rows = table([int(s) for s in args.steps.split(",")], [float(s) for s in args.shifts.split(",")])
    names = [k for k in rows[0] if k not in ("shift", "N")]
    print("| shift | N | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['shift']:g} | {r['N']} | " + " | ".join(f"{r[k]:+.2f} %" for k in names) + " |")


if __name__ == "__main__":
    main()
