"""Stopping a training job, and waiting in one: a protocol in the data stream, not a flag in each process.

**Stop requests.** SIGTERM or SIGUSR1 (SLURM's time-limit warning, a preemption, ``scancel``, a user) may
reach any subset of the job's processes: SLURM signals every process of a step, a node may be signalled
alone, a user may signal one rank. Whoever gets it, the job ends the same way:

1. A signal only records the request in that process's :class:`StopRequest`. Helper processes (inductor's
   compile workers) are started with both signals ignored (:func:`start_compile_workers`), so a signal
   sent to every process of the step cannot kill them in the middle of a (re)compile. The training path
   has no other child processes: data workers are threads.
2. A loader rank that was asked to stop keeps serving, and sets ``FLAG_STOP_REQUESTED`` on every batch
   it sends from then on (:mod:`mmdit.train.transport`).
3. At each optimizer step the model ranks agree, with one all-reduce, whether any of them was asked to
   stop or received a flagged batch (:func:`agree_step`, which also checks that the gradients are
   finite). The step in progress always completes, so a stop never lands inside gradient accumulation:
   the checkpoint is at a step boundary and the resumed run is bit-exact with an uninterrupted one.
4. The final save comes first: every model rank takes part (the first writes, the others hand it their
   RNG states; under FSDP each writes its shard), before anything that depends on the loaders. A loader
   that dies during the stop therefore cannot cost the checkpoint. No validation or evaluation runs on
   a stop step, and nothing heavy runs after the save (the weight digest only when asked).
5. Then every model rank sends the micro-step E it ended at to its loader (:func:`send_end_request`) and
   drains its stream up to the loader's end message; batches already sent beyond E are dropped (the
   resumed run starts with them). A stream that broke instead (its loader died) is abandoned with an
   error in the log, and that rank exits 1 after the complete checkpoint.
6. A loader learns E from its model ranks (:class:`EndListener`; all of them send the same E), builds no
   batch at or past E, sends the end message to each of its model ranks, and collects the remaining
   control messages. Every rank then meets in one barrier over the whole world and only then exits 0, so
   no node's torchrun ends the SLURM step while a checkpoint is being written.

**Waiting without timing out, dying within a bound.** A week-long run waits for peers that are alive but
busy: a model rank saving 19 GB, compiling, or evaluating for longer than any sensible timeout; a loader's
send that a model rank takes only after its save; the loader's end listener, which waits for the whole
run; loaders at the final barrier through the last evaluation. gloo applies a group's timeout to every
send and receive, however long it was meant to be posted, and a receive that times out closes the pair
for every later message (and cannot be re-posted: pytorch#32363), so no finite group timeout is right for
these waits and polling a gloo receive is impossible. So waiting and dying are separated:

* ``topology.timeout_s`` bounds only the set-up (every rank must join within it). After the first
  barrier every process group (world, data, model; gloo and NCCL) waits without a limit
  (:data:`mmdit.train.runtime.UNBOUNDED`): a busy peer is never mistaken for a dead one.
* A dead peer is found by two means. A process that dies on a live host closes its sockets, and its
  peers' gloo calls raise at once ("lost the connection to ... (did it die?)"); torchrun notices its own
  dead worker and ends the node's others. A peer that vanishes without closing anything (a lost host, a
  frozen node) stops its heartbeat in torchrun's store (:mod:`mmdit.train.liveness`, a daemon thread that
  touches only the store, so it beats on through saves and compiles): within ``topology.dead_peer_s``
  (60 s) every rank that watches it logs its rank and role and ends itself, and torchrun ends the job.
  A rank that is alive but stuck in a deadlock is not detected by either; SLURM's time limit ends it.
  torchft's liveness-apart-from-work design and torchtitan's set-up-then-steady timeouts are the models;
  a separate control group with its own long timeout would still close its pair after that timeout.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

from ..threads import start_thread
from .transport import CONTROL_TAG

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def start_compile_workers() -> None:
    """Start inductor's compile-worker pool with the stop signals ignored, before :meth:`StopRequest.install`.

    An ignored signal stays ignored across fork and exec, so the pool's sidecar process and the workers it
    forks cannot be killed by a USR1 / TERM that SLURM sends to every process of the step; the trainer's own
    handler is installed afterwards and only the trainer decides how to stop. The pool is shut down by
    message, not by signal, at exit. A no-op where inductor compiles in-process (one compile thread).
    """
    from torch._inductor.async_compile import AsyncCompile

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        AsyncCompile.warm_pool()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
        self._thread = start_thread(self._run, "end-listener")

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
