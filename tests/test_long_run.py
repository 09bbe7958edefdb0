"""A week-long run in compressed time: every timeout of the job scaled down, and a run that lasts many times
longer than each, crossing periodic saves, evaluations, validation images and log windows, with a save and
an evaluation made slower than every timeout (``MMDIT_INJECT_DELAY``). Then, on the same run directory:

* a resume from an older checkpoint while newer ones exist (a new lineage), stopped by SIGTERM to every
  process with the loader SIGKILLed right after: the stop still writes its checkpoint, ``keep_last`` keeps
  it, and ``resume=auto`` continues that lineage to the end, equal to the straight run;
* a resume with a lower LR and another weight decay: the optimizer steps with the new values;
* USR1 to every process (as ``scancel --signal=USR1`` sends it) while inductor's compile workers exist:
  they survive it and the stop completes.

Real torchrun ranks (one loader feeding two model ranks), real signals; no assertion waits for a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_preemption import LOADER, Job, assert_same_state, overrides, wait_for_micro

from mmdit.train.checkpoint import is_complete, latest_checkpoint, read_trainer_state
from mmdit.train.lineage import read_current

pytestmark = pytest.mark.slow
TIMEOUTS = {"topology.timeout_s": 8, "topology.heartbeat_s": 0.5, "topology.dead_peer_s": 4}
DELAY = 9  # seconds a save and an evaluation take: longer than every timeout above
STEPS = 20


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step_{step:08d}"


def soak_args(tiny_models, demo_data, save_dir: Path, **extra) -> list[str]:
    values = {**TIMEOUTS, "train.total_steps": STEPS, "train.save_every": 5, "train.keep_last": 3,
              "train.log_every": 2, "train.log_samples": True, **extra}
    return overrides("tiny", tiny_models, demo_data, save_dir, 1, **values)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def soak(tiny_models, demo_data, tmp_path_factory) -> dict:
    """The straight run: 20 steps past every scaled-down timeout, with slow saves and evaluations."""
    root = tmp_path_factory.mktemp("soak")
    extra = {"eval.parquet_folder": demo_data["phase"], "eval.index": demo_data["index"], "eval.loss_every": 10,
             "eval.images_every": 10, "eval.loss_samples": 8, "eval.num_images": 4, "eval.num_timesteps": 2,
             "eval.batch_size": 4, "eval.image_metrics": "[shapes]", "eval.loss_weights": "[ema]",
             "train.validate_every": 10, "train.validation_prompts": "[a red circle]",
             "train.validation_size": "[32,32]", "sample.num_steps": 2}
    os.environ["MMDIT_INJECT_DELAY"] = f"save={DELAY},eval={DELAY}"
    try:
        t0 = time.monotonic()
        rc, out = Job("tiny", [*soak_args(tiny_models, demo_data, root, **extra), LOADER], root / "soak.log").wait(600)
        wall = time.monotonic() - t0
    finally:
        del os.environ["MMDIT_INJECT_DELAY"]
    run_dir = root / "run"
    final = step_dir(run_dir, STEPS)
    if final.is_dir():  # kept aside: the lineage test below replaces step 20 in place
        shutil.copytree(final, root / "straight")
    return {"rc": rc, "out": out, "wall": wall, "run_dir": run_dir, "straight": root / "straight", "root": root}


def test_soak_crosses_every_timeout_many_times(soak):
    out = soak["out"]
    assert soak["rc"] == 0, out[-5000:]
    for rank in range(3):
        assert f"[rank {rank}] exiting with code 0" in out, out[-5000:]
    assert soak["wall"] > 6 * max(TIMEOUTS.values()), f"the run must outlast every timeout 6x: {soak['wall']:.0f}s"
    assert "has sent no heartbeat" not in out and "timeout" not in out.lower(), out[-5000:]
    run_dir = soak["run_dir"]
    assert [p.name for p in sorted(run_dir.glob("step_*"))] == [f"step_{s:08d}" for s in (10, 15, 20)]  # keep_last 3
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "lr" in r]
    saves = [r for r in train if r.get("time/save_s", 0) >= DELAY]
    assert len(saves) >= 3, train  # the periodic saves at 5, 10, 15, each logged as its own duration
    assert any(r.get("time/eval_s", 0) >= DELAY for r in train), train
    assert any("time/first_step_s" in r for r in train), train
    # throughput windows leave the pauses out: a window with a 9 s save is no slower than the others
    quiet = sorted(r["images_per_s"] for r in train
                   if "images_per_s" in r and not any(k.startswith("time/") for k in r))
    median = quiet[len(quiet) // 2]
    for r in saves:
        assert r["images_per_s"] > 0.3 * median, (r, median)
    evals = [r for r in records if "val/ema/loss" in r]
    assert [r["step"] for r in evals] == [10, 20], records  # the last evaluation runs before the final save


def test_branch_stop_with_dead_loader_then_auto_resume(soak, tiny_models, demo_data):
    """Resume step 10 while 15 and 20 exist, stop it (the loader killed right after the signal), resume=auto."""
    assert soak["rc"] == 0
    root, run_dir = soak["root"], soak["run_dir"]
    first_lineage = read_current(run_dir)["id"]
    args = overrides("tiny", tiny_models, demo_data, root, 1, **{**TIMEOUTS, "train.total_steps": STEPS,
                     "train.save_every": 1000, "train.keep_last": 2, "train.log_samples": True})
    branch = Job("tiny", [*args, LOADER, f"train.resume={step_dir(run_dir, 10)}"], root / "branch.log",
                 run_dir=run_dir)
    wait_for_micro(branch, run_dir, 12)
    branch.signal("all", signal.SIGTERM)
    os.kill(branch.workers()[0], signal.SIGKILL)  # the loader dies during the stop
    rc, out = branch.wait()
    assert rc != 0, out[-5000:]  # a loader died: the job failed ...
    assert "although newer checkpoints exist (step_00000015, step_00000020)" in out, out[-5000:]
    stopped = int(re.search(r"checkpoint of step (\d+) written", out).group(1))  # ... but the stop saved
    assert 10 < stopped < STEPS, out[-5000:]
    assert is_complete(step_dir(run_dir, stopped)), out[-5000:]
    lineage = read_current(run_dir)
    assert lineage["id"] != first_lineage and lineage["parent"] == "step_00000010"
    assert read_trainer_state(step_dir(run_dir, stopped))["lineage"]["id"] == lineage["id"]
    assert all(is_complete(step_dir(run_dir, s)) for s in (10, 15, 20))  # keep_last spares the other branch

    rc, out = Job("tiny", [*args, LOADER, "train.resume=auto"], root / "continue.log", run_dir=run_dir).wait()
    assert rc == 0, out[-5000:]
    assert f"resumed from {step_dir(run_dir, stopped)}" in out, out[-5000:]  # not the old branch's step 20
    final = latest_checkpoint(run_dir)
    assert final.name == f"step_{STEPS:08d}" and read_trainer_state(final)["lineage"]["id"] == lineage["id"]
    assert is_complete(step_dir(run_dir, stopped))  # keep_last=2 within the lineage: both of its checkpoints
    assert_same_state(final, soak["straight"])  # the chain equals the straight run


def test_resume_takes_lr_and_weight_decay_from_the_config(soak, tiny_models, demo_data, tmp_path):
    assert soak["rc"] == 0
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(soak["straight"], run_dir / "step_00000020")
    args = overrides("tiny", tiny_models, demo_data, tmp_path, 1, **{**TIMEOUTS, "train.total_steps": STEPS + 1,
                     "train.lr": 1e-5, "train.weight_decay": 0.5, "train.resume": "auto"})
    rc, out = Job("tiny", [*args, LOADER], tmp_path / "lr.log").wait()
    assert rc == 0, out[-5000:]
    assert "lr 0.002 -> 1e-05 from the config" in out and "weight_decay 0 -> 0.5 from the config" in out, out[-5000:]
    after = step_dir(run_dir, STEPS + 1)
    groups = torch.load(after / "optimizer.pt", weights_only=True)["param_groups"]
    assert [g["lr"] for g in groups] == [1e-5, 1e-5] and [g["weight_decay"] for g in groups] == [0.5, 0.0]
    old, new = load_file(run_dir / "step_00000020" / "model.safetensors"), load_file(after / "model.safetensors")
    step = max((new[k] - old[k]).abs().max().item() for k in old)
    # an AdamW step moves a weight by about lr (x a few); the checkpoint's lr 2e-3 would move them 200x more
    assert 0 < step < 20 * 1e-5, step


def test_usr1_to_every_process_spares_the_compile_workers(tiny_models, demo_data, tmp_path):
    """The signal comes once the workers exist, before the first step's compile needs them."""
    args = overrides("tiny", tiny_models, demo_data, tmp_path, 1, **{**TIMEOUTS, "train.total_steps": 200,
                     "train.compile": True, "train.save_every": 1000, "train.log_samples": True})
    job = Job("tiny", [*args, "topology.loader_to_model={0: [1]}"], tmp_path / "usr1.log", nproc=2, ignore_usr1=True)
    deadline = time.monotonic() + 120
    helpers: list[int] = []
    while not helpers:  # the model rank starts its compile workers before training
        assert time.monotonic() < deadline and job.proc.poll() is None, job.log.read_text()[-4000:]
        time.sleep(0.2)
        workers = job.workers()
        helpers = [p for w in workers.values() for p in descendants(w) if "compile_worker" in cmdline(p)]
    workers = job.workers()
    others = [p for w in workers.values() for p in descendants(w)
              if cmdline(p) and "compile_worker" not in cmdline(p)]  # the pool's forks share its command line
    assert not others, [cmdline(p) for p in others]  # no other helper process (data workers are threads)
    everyone = [job.proc.pid, *workers.values(), *[p for w in workers.values() for p in descendants(w)]]
    for pid in everyone:  # as scancel --signal=USR1 does: every process of the step
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    time.sleep(1)
    assert all(Path(f"/proc/{p}").exists() for p in helpers), "a compile worker died of USR1"
    rc, out = job.wait(600)  # the first step compiles, with those workers, then the stop is agreed
    assert "[rank 1] exiting with code 0" in out and "[rank 0] exiting with code 0" in out, out[-5000:]
    stopped = int(re.search(r"checkpoint of step (\d+) written", out).group(1))
    assert is_complete(step_dir(tmp_path / "run", stopped)) and stopped < 200


def test_a_frozen_loader_is_found_by_its_heartbeat_and_named(tiny_models, demo_data, tmp_path):
    """SIGSTOP freezes the loader with its sockets open (a hung host): nothing fails by itself, so only the
    heartbeat can tell. Its model ranks must name it and end within topology.dead_peer_s."""
    args = overrides("tiny", tiny_models, demo_data, tmp_path, 1, **{**TIMEOUTS, "train.total_steps": 10_000,
                     "train.save_every": 1000, "train.log_samples": True})
    job = Job("tiny", [*args, LOADER], tmp_path / "frozen.log")
    wait_for_micro(job, tmp_path / "run", 2)
    loader = job.workers()[0]
    os.kill(loader, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        while "has sent no heartbeat" not in job.log.read_text():
            assert time.monotonic() - t0 < 60, job.log.read_text()[-4000:]
            time.sleep(0.2)
        found = time.monotonic() - t0
    finally:
        os.kill(loader, signal.SIGKILL)  # torchrun's SIGTERM cannot reach a stopped process
    rc, out = job.wait()
    assert rc != 0
    assert re.search(r"rank [12]: loader rank 0 has sent no heartbeat for \d+ s", out), out[-4000:]
    assert found < 30, found  # dead_peer_s (4 s) plus a beat: far below the 60 s loop bound, even on a busy host
