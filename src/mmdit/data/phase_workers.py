"""Run create_phase's shards in worker processes where a dying worker costs one shard, not the run.

``multiprocessing.Pool`` hangs for ever when a worker is killed (the kernel's OOM killer, a segfault
in a codec); ``ProcessPoolExecutor`` breaks as a whole. Here each worker has its own pipe, so the
parent always knows which shard a dead worker held: that shard is reported as failed, a fresh worker
takes its place, and the other shards carry on. Re-running create_phase retries the failed shards.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:500]


def _serve(fn: Callable[[Any], Any], conn: Connection) -> None:
    """Worker loop: receive ``(index, task)``, send ``(index, ok, result or error text)``; stop on None."""
    while True:
        message = conn.recv()
        if message is None:
            return
        index, task = message
        try:
            conn.send((index, True, fn(task)))
        except Exception as err:  # a failed shard is reported; the worker goes on with the next one
            conn.send((index, False, _describe(err)))


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    n_proc: int,
    on_done: Callable[[int, Any], None],
) -> dict[int, str]:
    """Run ``fn(task)`` for every task in ``n_proc`` spawned processes (in this one when ``n_proc <= 1``).

    ``on_done(index, result)`` is called in this process as each task succeeds. Returns
    ``{index: reason}`` for each task that raised or whose worker died.
    """
    failures: dict[int, str] = {}
    if n_proc <= 1:
        for index, task in enumerate(tasks):
            try:
                result = fn(task)
            except Exception as err:
                failures[index] = _describe(err)
                continue
            on_done(index, result)
        return failures

    context = multiprocessing.get_context("spawn")  # pyarrow's threads make fork unsafe
    pending = list(range(len(tasks)))[::-1]
    workers: dict[Connection, list] = {}  # parent end -> [process, index of the task it holds or None]

    def start() -> Connection:
        parent, child = context.Pipe()
        process = context.Process(target=_serve, args=(fn, child), daemon=True)
        process.start()
        child.close()
        workers[parent] = [process, None]
        return parent

    def feed(conn: Connection) -> None:
        index = pending.pop() if pending else None
        workers[conn][1] = index
        conn.send(None if index is None else (index, tasks[index]))

    try:
        for _ in range(min(n_proc, len(tasks))):
            feed(start())
        while any(index is not None for _, index in workers.values()):
            busy = {conn: entry for conn, entry in workers.items() if entry[1] is not None}
            wait(list(busy) + [process.sentinel for process, _ in busy.values()])
            for conn, (process, index) in busy.items():
                message = None
                try:
                    if conn.poll():
                        message = conn.recv()
                except (EOFError, OSError):
                    message = None
                if message is not None:
                    done, ok, payload = message
                    if ok:
                        on_done(done, payload)
                    else:
                        failures[done] = payload
                    feed(conn)
                elif not process.is_alive():
                    process.join()
                    failures[index] = f"worker process died (exit code {process.exitcode}) while converting it"
                    conn.close()
                    del workers[conn]
                    if pending:
                        feed(start())
    finally:
        for conn in workers:
            try:
                conn.send(None)
            except OSError:
                pass
        for conn, (process, _) in workers.items():
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join()
            conn.close()
    return failures
