"""Fault injection with real torchrun ranks: stop signals at any point and to any process, kills, layout changes.

Each configuration (pixel-space ``tiny`` and latent ``tiny_latent``, accumulation 1 and 4; one loader rank
feeding two model ranks) trains one uninterrupted reference run and one chain of runs that is interrupted
at points drawn from a fixed seed (mid-accumulation included) and resumed with ``train.resume=auto``
after each. Every stop must leave a checkpoint at the stop step with every rank exiting 0; every kill must
end the job non-zero within 60 s, naming the dead rank; and the chain must end bit-identical (model, EMA,
optimizer state) to the reference, having trained on exactly the same samples at every micro-step.

Signals go to processes the way SLURM sends them: to every process of the job (torchrun and each worker;
torchrun starts its workers in sessions of their own, so a process-group kill would not reach them) or to
one process alone.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdit.data.indices import BucketIndex
from mmdit.data.segments import SegmentedSchedule
from mmdit.train.checkpoint import latest_checkpoint, list_checkpoints, read_trainer_state

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "src" / "train.py"
LOADER = "topology.loader_to_model={0: [1, 2]}"
TOTAL = 16  # optimizer steps of every chain and reference run
pytestmark = pytest.mark.slow


def overrides(preset: str, tiny_models: dict, data: dict, save_dir: Path, accum: int, **extra) -> list[str]:
    values = {
        "data.parquet_folder": data["phase"], "data.bucket_indices_path": data["index"], "data.batch_size": 2,
        "train.save_dir": save_dir, "train.run_name": "run", "train.total_steps": TOTAL, "train.log_every": 1,
        "train.save_every": 2, "train.keep_last": 10, "train.warmup_steps": 0, "train.lr_schedule": "constant",
        "train.lr": 2e-3, "train.precision": "fp32", "train.log_samples": True, "train.ema_update_every": 1,
        "train.accumulation_steps": accum,
    }
    if preset == "tiny_latent":
        values.update({"encoders.text.0.name": tiny_models["gemma2"], "encoders.text.1.name": tiny_models["modernbert"],
                       "encoders.text.2.name": tiny_models["clip"], "encoders.vae": tiny_models["vae"]})
    else:  # the pixel-space demo preset, made small, with the tiny encoders instead of MiniLM
        values.update({
            "encoders.text": f"[{{name: {tiny_models['gemma2']}, kind: sequence, max_length: 16}}, "
                             f"{{name: {tiny_models['clip']}, kind: pooled, max_length: 16}}]",
            "model.text_dims": "[48]", "model.pooled_dim": 24, "model.depth": 2, "model.hidden_size": 64,
            "model.num_heads": 2, "model.max_res": 64, "model.max_res_orig": 64,
        })
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


class Job:
    """One torchrun job in a session of its own, its output in a file."""

    def __init__(self, preset: str, args: list[str], log: Path, nproc: int = 3, run_dir: Path | None = None,
                 ignore_usr1: bool = False):
        self.log = log
        self.earlier_lines = len(micro_log(run_dir, 1)) if run_dir is not None else 0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
               str(TRAIN), "--config", preset, *args]
        with open(log, "w") as out:
            # ignore_usr1: as runjob_SLURM.sh starts torchrun (an ignored signal stays ignored across exec)
            ignore = (lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN)) if ignore_usr1 else None
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=ignore)

    def workers(self) -> dict[int, int]:
        """Global rank -> pid of torchrun's worker processes."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
            except (OSError, IndexError, ValueError):
                continue
            if "RANK" in env:
                found[int(env["RANK"])] = int(entry.name)
        return found

    def signal(self, target: str, sig: int) -> None:
        """``all``: torchrun and every worker (as SLURM signals a step); ``rank<N>``: that worker alone."""
        workers = self.workers()
        assert len(workers) == 3, f"expected 3 workers, found {workers}"
        pids = [self.proc.pid, *workers.values()] if target == "all" else [workers[int(target[4:])]]
        for pid in pids:
            os.kill(pid, sig)

    def wait(self, timeout: float = 180) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in self.workers().values():
                os.kill(pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"job did not end within {timeout}s:\n{self.log.read_text()[-4000:]}")
        return rc, self.log.read_text()


def micro_log(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / f"samples_rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_micro(job: Job, run_dir: Path, micro: int, timeout: float = 120) -> None:
    """Until model rank 1 of this job has started micro-step ``micro`` (its sample log gets a line as each
    micro-step starts; lines of earlier jobs in the same run directory do not count)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = micro_log(run_dir, 1)[job.earlier_lines:]
        if log and log[-1]["micro"] >= micro:
            return
        if job.proc.poll() is not None:
            pytest.fail(f"job ended before micro-step {micro}:\n{job.log.read_text()[-4000:]}")
        time.sleep(0.05)
    pytest.fail(f"micro-step {micro} not reached in {timeout}s:\n{job.log.read_text()[-4000:]}")


def ids_by_micro(run_dir: Path) -> dict[tuple[int, int], list]:
    """(model rank, micro-step) -> sample ids, the last run's entry winning (a resume redoes micro-steps)."""
    out = {}
    for rank in (1, 2):
        for row in micro_log(run_dir, rank):
            out[(rank, row["micro"])] = row["ids"]
    return out


def assert_same_state(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        bad = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not bad, f"{name} differs in {bad[:5]}"
    oa = torch.load(a / "optimizer.pt", weights_only=True)
    ob = torch.load(b / "optimizer.pt", weights_only=True)
    for key, state in oa["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][key][field])), (key, field)


# what each configuration's chain does: three stops of every process (the minimum), plus two more
# interruptions that differ per configuration: between them the chains stop one non-main model rank alone and
# the loader alone, and SIGKILL the loader and a model rank (two chains, not four: CI time is a budget)
CASES = {
    "latent-accum4": ("tiny_latent", 4, ["term:rank2", "kill:rank0"]),
    "pixel-accum1": ("tiny", 1, ["term:rank0", "kill:rank2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_chain_equals_uninterrupted_run(case, tiny_models, demo_data, tmp_path):
    preset, accum, extra = CASES[case]
    rng = random.Random(case)  # the interruption points are drawn from a fixed seed
    events = ["term:all", "term:all", "term:all", *extra]
    rng.shuffle(events)
    ref_job = Job(preset, [*overrides(preset, tiny_models, demo_data, tmp_path / "ref", accum), LOADER],
                  tmp_path / "ref.log")
    rc, out = ref_job.wait()
    assert rc == 0, out[-4000:]
    reference = latest_checkpoint(tmp_path / "ref" / "run")
    assert reference.name == f"step_{TOTAL:08d}"

    run_dir = tmp_path / "chain" / "run"
    args = overrides(preset, tiny_models, demo_data, tmp_path / "chain", accum, **{"train.resume": "auto"})
    start_step = 0
    for i, event in enumerate(events):
        kind, target = event.split(":")
        job = Job(preset, [*args, LOADER], tmp_path / f"chain{i}.log", run_dir=run_dir)
        # a micro-step 1-2 optimizer steps in, at a random position inside the accumulation window
        micro = (start_step + rng.randint(1, 2)) * accum + rng.randrange(accum)
        wait_for_micro(job, run_dir, micro)
        t0 = time.monotonic()
        job.signal(target, signal.SIGTERM if kind == "term" else signal.SIGKILL)
        rc, out = job.wait()
        elapsed = time.monotonic() - t0
        context = f"{event} at micro-step {micro}:\n{out[-5000:]}"
        if kind == "term":
            for rank in range(3):
                assert f"[rank {rank}] exiting with code 0" in out, context
            if target != "all":  # torchrun itself was not signalled
                assert rc == 0, context
            stopped = int(re.search(r"checkpoint of step (\d+) written", out).group(1))
            assert latest_checkpoint(run_dir).name == f"step_{stopped:08d}", context
            assert stopped * accum > micro, context  # the step that was running when the signal came completed
            state = read_trainer_state(latest_checkpoint(run_dir))
            assert state["data_cursor"] == stopped * accum and state["step"] == stopped, context
            assert stopped < TOTAL, f"the stop came too late to test anything: {context}"
            start_step = stopped
        else:
            assert rc != 0, context
            assert elapsed < 60, context
            dead = int(target[4:])
            # torchrun's summary names the killed worker; the survivors say whom they lost
            assert re.search(rf"rank\s*:\s*{dead} \(local_rank: {dead}\)\s*\n\s*exitcode\s*:\s*-9", out), context
            lost = f"loader rank {dead} (did it die?)" if dead == 0 else f"model rank {dead} (did it die?)"
            assert lost in out or dead != 0, f"no survivor names the dead loader: {context}"
            start_step = int(latest_checkpoint(run_dir).name.split("_")[1])  # the last periodic checkpoint
    final = Job(preset, [*args, LOADER], tmp_path / "final.log")
    rc, out = final.wait()
    assert rc == 0, out[-4000:]
    assert latest_checkpoint(run_dir).name == f"step_{TOTAL:08d}"
    assert_same_state(latest_checkpoint(run_dir), reference)
    assert ids_by_micro(run_dir) == ids_by_micro(tmp_path / "ref" / "run")


def test_layout_change_is_refused_then_continues_from_the_cursor(tiny_models, demo_data, tmp_path):
    """2 model ranks for 4 steps, then 1 model rank: refused with the differing keys, accepted with the
    override; the new run trains the rest of the epoch's rows, none of them twice, none the old run had."""
    args = overrides("tiny_latent", tiny_models, demo_data, tmp_path, 1, **{"train.total_steps": 4})
    rc, out = Job("tiny_latent", [*args, LOADER], tmp_path / "a.log").wait()
    assert rc == 0, out[-4000:]
    run_dir = tmp_path / "run"
    one_model = "topology.loader_to_model={0: [1]}"
    more = overrides("tiny_latent", tiny_models, demo_data, tmp_path, 1, **{"train.total_steps": 12})
    rc, out = Job("tiny_latent", [*more, one_model], tmp_path / "b.log", nproc=2).wait()
    assert rc != 0
    assert "config error: resuming" in out and "model_ranks: 2 -> 1" in out, out[-4000:]
    assert "train.allow_layout_change=true" in out and "training failed" not in out, out[-4000:]  # no traceback
    assert latest_checkpoint(run_dir).name == "step_00000004"  # nothing was written
    first = {(r, row["micro"]): row["ids"] for r in (1, 2) for row in micro_log(run_dir, r)}

    rc, out = Job("tiny_latent", [*more, one_model, "train.allow_layout_change=true"], tmp_path / "c.log",
                  nproc=2).wait()
    assert rc == 0, out[-4000:]
    assert "resuming" in out and "with a new data layout" in out
    state = read_trainer_state(latest_checkpoint(run_dir))
    assert state["step"] == 12 and state["data_layout"]["model_ranks"] == 1
    segments = state["schedule_segments"]
    assert [s["start"] for s in segments] == [0, 4] and state["samples_seen"] == 4 * 2 * 2 + 8 * 2
    second = [row for row in micro_log(run_dir, 1) if row["micro"] >= 4]
    assert [row["micro"] for row in second] == list(range(4, 12))
    schedule = SegmentedSchedule(BucketIndex.load(demo_data["index"], demo_data["phase"]), segments)
    for row in second:  # exactly the order the recorded segments define
        assert row["ids"] == schedule.batch_at(row["micro"]).per_rank_ids[0].tolist()
    before = [i for ids in first.values() for i in ids]
    after = [i for row in second for i in row["ids"]]
    assert len(set(before)) == len(before) and len(set(after)) == len(after)
    assert not set(before) & set(after)  # no sample of the epoch repeated across the change
    assert len(list_checkpoints(run_dir)) >= 2
