"""Background threads that leave the cores to the training step: their torch ops use one intra-op thread.

A torch op that runs in parallel on a thread other than the main one gets its own OpenMP team (libgomp keeps
one per calling thread). Once there are more OpenMP threads in the process than cores, libgomp stops spinning
at its barriers and puts the waiting threads to sleep, so every parallel op of the training step pays a
futex wake-up per barrier. One small parallel op in a data thread, once, is enough: the CPU demo's step fell
from 110-132 to 52-67 images/s on 2 cores (BENCHMARKS.md, issue 24, "the demo speed gap"). On a GPU the step
does not use OpenMP, but a CPU loader rank's encoders do.

So every helper thread of ours (the batch source, the read/decode pools, the heartbeat, the end listener) sets
its own intra-op threads to one before it does anything. ``torch.set_num_threads`` is per thread for OpenMP
(and MKL), but it also sets the default that a thread adopts at its first parallel op: the creating thread
takes its own count first, in :func:`start_thread` and :func:`thread_pool`, so that it keeps it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch


def one_intraop_thread() -> None:
    """Make the calling (helper) thread's torch ops single-threaded."""
    torch.set_num_threads(1)


def _keep_callers_threads() -> None:
    torch.get_num_threads()  # fixes the calling thread's count before a helper lowers the default


def start_thread(target, name: str) -> threading.Thread:
    """A started daemon thread running ``target()`` with one intra-op thread."""
    _keep_callers_threads()

    def run() -> None:
        one_intraop_thread()
        target()

    thread = threading.Thread(target=run, daemon=True, name=name)
    thread.start()
    return thread


def thread_pool(max_workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose workers run torch ops with one intra-op thread."""
    _keep_callers_threads()
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name, initializer=one_intraop_thread)
