"""Is the data path keeping up? Each model rank's wait fraction, each loader's busy fraction, one warning.

A model rank's *wait fraction* is the share of wall-clock time its training thread spent waiting for its
next batch; a loader's *busy fraction* is the share of its time spent building batches rather than
waiting for a model rank to take them (it travels in each batch header). Read them together:

* model ranks wait, loaders busy ~100 %: the loaders are the bottleneck; give each model rank more
  loader ranks (the warning names the ratio to try);
* model ranks do not wait, loaders busy well below 100 %: loader GPUs idle; fewer loaders would do;
* model ranks wait although loaders are idle: the transfer is the bottleneck (see bench/streaming.py).

After a warm-up, the first window of ``window_steps`` optimizer steps in which the model ranks waited more
than ``threshold`` of the time gives one warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass
class RankBalance:
    """One model rank's view over a log interval."""

    rank: int
    wait_s: float
    elapsed_s: float
    loader: int | None  # its loader rank (None: it loads its own data in background workers)
    loader_busy: float  # that loader's busy fraction, from the newest header
    loss_sum: float = 0.0  # its training losses over the interval (the logged loss averages every rank's)
    loss_count: int = 0


def gather_balance(mine: RankBalance, group, num_model_ranks: int) -> list[RankBalance]:
    """Every model rank's :class:`RankBalance` (one small all-gather over the model ranks per log step)."""
    if group is None or num_model_ranks == 1:
        return [mine]
    out: list = [None] * num_model_ranks
    dist.all_gather_object(out, mine, group=group)
    return out


def mean_loss(ranks: list[RankBalance]) -> float:
    """The training loss of the interval averaged over every model rank's micro-steps."""
    return sum(r.loss_sum for r in ranks) / max(1, sum(r.loss_count for r in ranks))


def balance_metrics(ranks: list[RankBalance]) -> dict[str, float]:
    """Metrics for the log: every model rank's wait fraction and every loader's busy fraction."""
    values = {f"data_wait_frac/rank{r.rank}": r.wait_s / max(1e-9, r.elapsed_s) for r in ranks}
    values.update({f"loader_busy_frac/rank{r.loader}": r.loader_busy for r in ranks if r.loader is not None})
    return values


@dataclass
class BalanceMonitor:
    """Accumulates wait over windows of steps and words the one warning (see the module docstring)."""

    num_loaders: int
    num_models: int
    threshold: float = 0.05
    window_steps: int = 100
    warmup_until: int = 10  # the step before which waits are start-up (10 steps after the start or resume)
    warned: bool = False
    _wait: float = 0.0
    _elapsed: float = 0.0
    _steps: int = 0
    _busy: list = field(default_factory=list)

    def update(self, step: int, steps: int, ranks: list[RankBalance]) -> str | None:
        """Add a log interval of ``steps`` optimizer steps ending at ``step``; the warning, once, or None."""
        if self.warned or step - steps < self.warmup_until:  # the first batches include start-up
            return None
        self._wait += max(r.wait_s for r in ranks)
        self._elapsed += max(r.elapsed_s for r in ranks)
        self._busy += [r.loader_busy for r in ranks if r.loader is not None]
        self._steps += steps
        if self._steps < self.window_steps:
            return None
        wait = self._wait / self._elapsed if self._elapsed > 0 else 0.0
        busy = sum(self._busy) / len(self._busy) if self._busy else None
        self._wait = self._elapsed = 0.0
        self._steps = 0
        self._busy = []
        if wait <= self.threshold:
            return None
        self.warned = True
        return advice(wait, busy, self.num_loaders, self.num_models, step)


def advice(wait: float, busy: float | None, num_loaders: int, num_models: int, step: int) -> str:
    """The warning: how long model ranks waited, and the loader:model ratio that would feed them."""
    head = f"model ranks waited for data {wait:.0%} of the time in the steps before {step}"
    if num_loaders == 0:
        return (f"{head}: their background workers cannot keep up; raise data.num_workers, or give them "
                "loader ranks (topology.loaders_per_node / topology.loader_to_model)")
    needed = math.ceil(num_loaders / max(1e-6, 1.0 - wait))  # loaders at full speed feed 1 - wait of the demand
    per_loader = num_models / needed
    if busy is not None and busy < 0.8:
        return (f"{head}, but their loaders were busy only {busy:.0%}: the transfer, not encoding, is the "
                "bottleneck (bench/streaming.py measures it)")
    return (f"{head} (loaders busy {busy:.0%}): {num_loaders} loader rank(s) cannot feed {num_models} model "
            f"ranks. Try about {needed} loader ranks, one per {per_loader:.1f} model ranks "
            "(topology.loaders_per_node / topology.loader_to_model)")
