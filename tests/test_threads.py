"""Helper threads run their torch ops on one intra-op thread and start no second OpenMP team (mmdit.threads).

A second team in a process with as many OpenMP threads as cores put the training step's barriers to sleep:
the CPU demo's step lost a third of its speed to one parallel op in the data thread (BENCHMARKS.md)."""

import os
import threading
from types import SimpleNamespace

import pytest
import torch

from mmdit.threads import start_thread, thread_pool
from mmdit.train.batches import BatchSource


@pytest.fixture
def two_main_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _parallel_op_grows(out: dict) -> None:
    """In the calling thread: how many OS threads one parallel op adds to the process."""
    x = torch.randn(1_000_000)
    before = _os_threads()
    (x * 2.0).sum()
    out["added"] = _os_threads() - before
    out["intraop"] = torch.get_num_threads()


def test_a_helper_thread_starts_no_second_openmp_team(two_main_threads):
    bare: dict = {}
    thread = threading.Thread(target=_parallel_op_grows, args=(bare,))
    thread.start()
    thread.join()
    if bare["added"] == 0:
        pytest.skip("this torch build starts no OpenMP team per thread (not libgomp?)")
    ours: dict = {}
    start_thread(lambda: _parallel_op_grows(ours), "test-helper").join()
    assert ours == {"added": 0, "intraop": 1}
    assert torch.get_num_threads() == 2  # the main thread keeps its count


def test_pool_workers_and_the_batch_source_use_one_intraop_thread(two_main_threads):
    with thread_pool(2, "test-pool") as pool:
        assert set(pool.map(lambda _: torch.get_num_threads(), range(4))) == {1}
    seen = []

    def fill(step):
        seen.append(torch.get_num_threads())
        return SimpleNamespace(step=step, ready=None)

    source = BatchSource(fill, 0, 3, streamed=False)
    assert source.get(0).step == 0
    source.close()
    assert set(seen) == {1}
    assert torch.get_num_threads() == 2
