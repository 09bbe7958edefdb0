"""A model rank's metric window: what one log interval trained, and the time that was not training.

Throughput (images/s, tokens/s, MFU, HFU) and the data-wait fraction are over *training time only*: a
save, validation images, an evaluation or a post-hoc EMA snapshot is timed by :meth:`MetricWindow.paused`,
logged as its own duration (``time/<what>_s``) and subtracted; the job's first step (compile, allocator,
first batches) is logged as ``time/first_step_s`` and the window starts after it. Losses are kept on the
device and read once, at the report.
"""

from __future__ import annotations

import contextlib
import time

import torch

from .faults import inject_delay


class MetricWindow:
    def __init__(self, device: torch.device, wait_s: float, step: int):
        self.device = device
        self.pauses: dict[str, float] = {}  # time/<what>_s of this window
        self.reset(wait_s, step)

    def reset(self, wait_s: float, step: int, keep_loss: bool = False) -> None:
        """Start a new window at ``step`` (``wait_s``: the source's wait counter now)."""
        if not keep_loss:
            self.loss, self.n = torch.zeros((), device=self.device), 0
            self.pauses = {}
        self.images = self.tokens = 0
        self.flops = self.hw_flops = 0.0  # floats, or device tensors where they depend on the batch's text
        self.wait_start, self.step, self.t, self.paused_s = wait_s, step, time.perf_counter(), 0.0

    def add(self, loss: torch.Tensor, images: int, tokens: int, flops, hw_flops) -> None:
        """One micro-step: its loss (on the device), images, image tokens and FLOPs."""
        self.loss = self.loss + loss
        self.n += 1
        self.images += images
        self.tokens += tokens
        self.flops = self.flops + flops
        self.hw_flops = self.hw_flops + hw_flops

    @contextlib.contextmanager
    def paused(self, what: str):
        """Time work that is not training: logged as ``time/<what>_s``, left out of the window."""
        t0 = time.perf_counter()
        inject_delay(what)  # the long-run tests make it slower than every timeout (mmdit.train.faults)
        yield
        seconds = time.perf_counter() - t0
        self.paused_s += seconds
        self.pauses[f"time/{what}_s"] = self.pauses.get(f"time/{what}_s", 0.0) + seconds

    def end_warmup(self, wait_s: float, step: int) -> None:
        """After the job's first step: log its duration, keep its loss, start the throughput window."""
        first = self.elapsed()
        self.reset(wait_s, step, keep_loss=True)
        self.pauses["time/first_step_s"] = first

    def elapsed(self) -> float:
        """Training seconds in the window (pauses left out)."""
        return max(1e-9, time.perf_counter() - self.t - self.paused_s)

    def throughput(self, num_model_ranks: int, peak: float) -> dict[str, float]:
        """images/s, tokens/s over all model ranks, and MFU / HFU against ``peak`` (none right after warm-up)."""
        if not self.images:
            return {}
        elapsed = self.elapsed()
        values = {"images_per_s": self.images * num_model_ranks / elapsed,
                  "tokens_per_s": self.tokens * num_model_ranks / elapsed}
        if peak:
            values["mfu"] = float(self.flops) / elapsed / peak
            values["hfu"] = float(self.hw_flops) / elapsed / peak  # with the recompute of checkpointed blocks
        return values
