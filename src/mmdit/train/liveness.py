"""Liveness: every rank beats a counter in torchrun's store; a rank whose counter stops is dead.

Waiting and dying are kept apart (see :mod:`mmdit.train.stopping` for why): the process groups wait for
a busy peer without a time limit, and this module bounds how long a *dead* peer goes unnoticed. Each
rank's :class:`Liveness` thread adds 1 to ``mmdit/beat/<rank>`` every ``heartbeat_s`` and reads every
other rank's counter. A counter that has not moved for ``dead_after_s`` names a rank that died without
closing its sockets (a lost host, a frozen machine, a kernel panic) or is frozen; the watcher logs which
one, for how long, and ends its own process with :data:`EXIT_PEER_DEAD`, so torchrun ends the job and
SLURM can requeue it. A rank that ends normally sets ``mmdit/done/<rank>`` first and is not watched any
more. A process killed on a live host closes its sockets and its peers' gloo calls raise at once; the
heartbeat is the bound when nothing closes.

The thread only touches the store (a few bytes per peer per beat), never a process group, so it keeps
beating while its own rank is busy in a long save, a compile or an evaluation.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from ..threads import start_thread

log = logging.getLogger(__name__)
EXIT_PEER_DEAD = 75  # this rank ended itself because a peer stopped beating


class Liveness:
    """The heartbeat of this rank and the watch over all others (one daemon thread)."""

    def __init__(self, store, rank: int, world_size: int, roles: dict[int, str], heartbeat_s: float,
                 dead_after_s: float, on_dead=None):
        self.store, self.rank, self.world_size, self.roles = store, rank, world_size, roles
        self.heartbeat_s, self.dead_after_s = heartbeat_s, dead_after_s
        self.on_dead = on_dead or _exit_peer_dead
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Liveness:
        self._thread = start_thread(self._run, "liveness")
        return self

    def _run(self) -> None:
        peers = [r for r in range(self.world_size) if r != self.rank]
        last = {r: (-1, time.monotonic()) for r in peers}  # rank -> (counter, when it last moved)
        while not self._stop.is_set():
            try:
                self.store.add(f"mmdit/beat/{self.rank}", 1)
                now = time.monotonic()
                for r in list(peers):
                    count = self.store.add(f"mmdit/beat/{r}", 0)
                    if count != last[r][0]:
                        last[r] = (count, now)
                    elif now - last[r][1] > self.dead_after_s:
                        if self.store.check([f"mmdit/done/{r}"]):
                            peers.remove(r)  # ended normally
                            continue
                        self._dead(f"{self.roles.get(r, 'rank')} {r} has sent no heartbeat for "
                                   f"{now - last[r][1]:.0f} s (topology.dead_peer_s={self.dead_after_s:g}): its "
                                   "process or host is gone or frozen")
                        return
            except Exception as err:  # the store is hosted by torchrun on the first node
                if self._stop.is_set():
                    return
                self._dead(f"lost torchrun's store (the first node's agent): {err}")
                return
            self._stop.wait(self.heartbeat_s)

    def _dead(self, reason: str) -> None:
        self.on_dead(f"rank {self.rank}: {reason}; ending this rank so that the job stops")

    def stop(self) -> None:
        """This rank ends normally: peers stop watching it; the thread ends."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.store.set(f"mmdit/done/{self.rank}", "1")
        except Exception:  # the job is ending; nobody is left to tell
            pass
        if self._thread is not None and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * self.heartbeat_s + 1)


def _exit_peer_dead(message: str) -> None:
    """A blocked gloo or NCCL call cannot be interrupted from another thread: end the process."""
    log.error("%s", message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_DEAD)
