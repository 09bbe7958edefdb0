"""Stopping a training job: a protocol that lives in the data stream, not a flag in each process.

A stop request (SIGTERM or SIGUSR1: SLURM's time-limit warning, a preemption, ``scancel``, a user) may
reach any subset of the job's processes: SLURM signals every process of a step, a node may be signalled
alone, a user may signal one rank. Whoever gets it, the job ends the same way:

1. A signal only records the request in that process's :class:`StopRequest`.
2. A loader rank that was asked to stop keeps serving, and sets ``FLAG_STOP_REQUESTED`` on every batch
   it sends from then on (:mod:`mmdit.train.transport`).
3. At each optimizer step the model ranks agree, with one all-reduce, whether any of them was asked to
   stop or received a flagged batch (:func:`agree_step`, which also checks that the gradients are
   finite). The step in progress always completes, so a stop never lands inside gradient accumulation:
   the checkpoint is at a step boundary and the resumed run is bit-exact with an uninterrupted one.
4. Having agreed to end at micro-step E (after a stop, or at the end of the run), every model rank sends E
   to its loader (:func:`send_end_request`) and drains its stream up to the loader's end message; batches
   the loader had already sent beyond E are dropped (the resumed run starts with them).
5. A loader learns E from its model ranks (:class:`EndListener`; all of them send the same E), builds no
   batch at or past E, sends the end message to each of its model ranks, and collects the remaining
   control messages.
6. Every rank takes part in the final save (the first model rank writes it, the others hand it their RNG
   states) and then in one barrier over the whole world, and only then exits 0. So no rank exits, and no
   node's torchrun ends the SLURM step, while the checkpoint is being written.

A rank that dies instead (SIGKILL, an exception) breaks the data stream or a collective of its peers,
which then raise and exit non-zero: torchrun ends the job, and ``train.resume=auto`` continues from the
last complete checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

from .transport import CONTROL_TAG

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set by SIGTERM / SIGUSR1 (see the module docstring); read at step boundaries and by loaders."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def agree_step(grad_norm: torch.Tensor, stop_local: bool, group, num_model_ranks: int) -> tuple[bool, bool]:
    """One all-reduce over the model ranks per optimizer step, the step's one host sync: whether every
    rank's gradients are finite (else all skip the step together) and whether any rank asked to stop
    (``stop_local``: a signal, or a batch its loader flagged)."""
    flags = torch.stack([torch.isfinite(grad_norm).all().float(),
                         torch.tensor(0.0 if stop_local else 1.0, device=grad_norm.device)])
    if group is not None and num_model_ranks > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    finite, carry_on = flags.tolist()
    return finite == 1.0, carry_on == 0.0


def send_end_request(loader: int, end_micro: int, group) -> dist.Work:
    """A model rank tells its loader the micro-step to end at (wait on the handle after draining)."""
    try:
        return dist.isend(torch.tensor([end_micro], dtype=torch.int64), dst=loader, group=group, tag=CONTROL_TAG)
    except RuntimeError as err:
        raise RuntimeError(f"lost the connection to loader rank {loader} (did it die?): {err}") from err


class EndListener:
    """A loader's background receive of the end micro-step from each of its model ranks."""

    def __init__(self, model_ranks: tuple[int, ...], group) -> None:
        self.model_ranks = model_ranks
        self.group = group
        self.end: int | None = None  # set once the first model rank has answered
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="end-listener")
        self._thread.start()

    def _run(self) -> None:
        try:
            for rank in self.model_ranks:
                buf = torch.empty(1, dtype=torch.int64)
                dist.recv(buf, src=rank, group=self.group, tag=CONTROL_TAG)
                value = int(buf)
                if self.end is not None and value != self.end:
                    raise RuntimeError(f"model ranks disagree on the last micro-step: {self.end} vs {value} "
                                       f"(from rank {rank})")
                self.end = value
        except BaseException as err:  # raised in the loader's main thread by wait()
            self._error = err

    def wait(self) -> int:
        """Block until every model rank has answered; the agreed end micro-step."""
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"lost the control channel to model ranks {list(self.model_ranks)}: "
                               f"{self._error}") from self._error
        assert self.end is not None
        return self.end
