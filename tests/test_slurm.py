"""SLURM for real: jobs through sbatch on a one-node cluster (`.ci/setup_slurm.sh` sets one up as root).

Without a usable cluster these tests skip, unless the environment variable CI is set: then they fail
with the reason (CI runs `.ci/setup_slurm.sh` first, so a missing cluster there is a bug).
No accounting is configured, so `sacct` does not work: job states come from `scontrol show job`
(finished jobs stay visible for MinJobAge=300 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNJOB = REPO / "runjob_SLURM.sh"
pytestmark = pytest.mark.slow

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


def _slurm_problem() -> str | None:
    """Why SLURM cannot run jobs here, or None when it can."""
    missing = [b for b in ("sbatch", "sinfo", "scontrol", "scancel") if shutil.which(b) is None]
    if missing:
        return f"SLURM commands not found: {missing}"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out (slurmctld not answering)"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip() or out.stdout.strip()}"
    states = out.stdout.split()
    if not any(s.rstrip("~#!%$@^-") in ("idle", "mix", "alloc", "comp") for s in states):
        return f"no SLURM node is up (node states: {states or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = _slurm_problem()
    if problem:
        hint = "run `sudo bash .ci/setup_slurm.sh` to start a one-node cluster"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but SLURM is not usable: {problem}; {hint}", pytrace=False)
        pytest.skip(f"SLURM not usable: {problem} ({hint})")


def sbatch(args: list[str], env: dict[str, str] | None = None) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, f"sbatch {args} failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return {}
    info = {}
    for item in out.stdout.split():
        key, _, value = item.partition("=")
        info[key] = value
    return info


def wait_job(job_id: str, until, timeout: float, what: str) -> dict[str, str]:
    """Poll `scontrol show job` until ``until(info)``; on timeout, cancel the job and fail."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info and until(info):
            return info
        if info.get("JobState") in FINAL_STATES - {"COMPLETED"}:
            break
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    pytest.fail(f"job {job_id}: waited {timeout:.0f}s for {what}; last state: "
                f"{info.get('JobState')} reason={info.get('Reason')} restarts={info.get('Restarts')}")


def test_slurm_runs_a_job(slurm, tmp_path):
    out = tmp_path / "job-%j.out"
    job = sbatch(["--job-name=mmdit-ci-wrap", "--gres=gpu:1", "--cpus-per-task=1", "--time=2",
                  f"--output={out}", "--wrap", "echo gpus=$SLURM_GPUS_ON_NODE; hostname"])
    info = wait_job(job, lambda i: i.get("JobState") == "COMPLETED", 120, "COMPLETED")
    assert info["ExitCode"] == "0:0"
    text = (tmp_path / f"job-{job}.out").read_text()
    assert "gpus=1" in text, text


FAKE_TRAINER = textwrap.dedent('''
    """Stands in for src/train.py: records its environment; on SIGUSR1 or SIGTERM "saves" and exits 0."""
    import json, os, signal, sys, time
    out = os.environ["FAKE_OUT"]
    restart = "train.resume=auto" in sys.argv
    tag = ("resumed" if restart else "first") + "-rank" + os.environ["RANK"]
    stop = []
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda sig, frame: stop.append(sig))
    info = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                           "OMP_NUM_THREADS", "SLURM_RESTART_COUNT", "GLOO_SOCKET_IFNAME",
                                           "NCCL_SOCKET_IFNAME")}
    info["argv"] = sys.argv[1:]
    with open(f"{out}/{tag}.started", "w") as f:
        json.dump(info, f)
    if restart:
        sys.exit(0)
    deadline = time.time() + 120
    while not stop and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # "writing the checkpoint"
    with open(f"{out}/{tag}.saved", "w") as f:
        f.write(signal.Signals(stop[0]).name if stop else "no signal")
    sys.exit(0 if stop else 1)
''')


def test_runjob_requeues_after_time_limit_signal(slurm, tmp_path):
    """runjob_SLURM.sh: torchrun over srun, overrides passed through; the time-limit USR1 reaches the
    trainer workers (torchrun ignores it, so it neither dies nor SIGKILLs them: they get time to save and
    exit 0), then the job is requeued and resumes with train.resume=auto."""
    trainer = tmp_path / "fake_train.py"
    trainer.write_text(FAKE_TRAINER)
    env = {"TRAIN_SCRIPT": str(trainer), "NPROC_PER_NODE": "2", "CONFIG": "tiny", "FAKE_OUT": str(tmp_path),
           "SHUTDOWN_TIMEOUT": "60"}
    job = sbatch(["--job-name=mmdit-ci-requeue", "--gres=gpu:1", "--cpus-per-task=1", "--time=10",
                  f"--output={tmp_path}/job-%j.out", str(RUNJOB), "train.lr=1e-3"], env=env)
    log = tmp_path / f"job-{job}.out"

    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("first-rank*.started"))) < 2:
        if time.monotonic() > deadline or job_info(job).get("JobState") in FINAL_STATES:
            subprocess.run(["scancel", job], timeout=30)
            pytest.fail(f"trainer workers did not start; log:\n{log.read_text() if log.exists() else '(none)'}")
        time.sleep(0.2)
    # exactly what `#SBATCH --signal=B:USR1@300` does before the time limit
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
    wait_job(job, lambda i: int(i.get("Restarts", 0)) >= 1 and i.get("JobState") == "PENDING", 120, "the requeue")
    # SLURM holds a requeued job ~2 minutes (BeginTime); let it start sooner, but not within the second the
    # old run's credential was revoked (slurmd would refuse the launch: "Job credential revoked")
    deadline = time.monotonic() + 60
    while "comp" in subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "node stuck completing the first run"
        time.sleep(0.5)
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30)
    info = wait_job(job, lambda i: i.get("JobState") == "COMPLETED", 180, "the requeued job to complete")
    assert info["ExitCode"] == "0:0"

    text = log.read_text()
    for rank in (0, 1):
        first = json.loads((tmp_path / f"first-rank{rank}.started").read_text())
        assert first["WORLD_SIZE"] == "2" and first["LOCAL_RANK"] == str(rank), first
        assert first["argv"] == ["--config", "tiny", "train.lr=1e-3"], first
        assert (tmp_path / f"first-rank{rank}.saved").read_text() == "SIGUSR1", text
        # the socket interface is the one that reaches MASTER_ADDR (the node itself here: loopback)
        assert first["GLOO_SOCKET_IFNAME"] and first["GLOO_SOCKET_IFNAME"] == first["NCCL_SOCKET_IFNAME"], first
        resumed = json.loads((tmp_path / f"resumed-rank{rank}.started").read_text())
        assert resumed["argv"] == ["--config", "tiny", "train.lr=1e-3", "train.resume=auto"], resumed
        assert resumed["SLURM_RESTART_COUNT"] == "1", resumed
    assert "requeueing job" in text, text
    # the rendezvous port lies below the ephemeral range (32768-60999 on Linux by default)
    port = int(re.search(r"master=\S+:(\d+)", text).group(1))
    assert port == 20000 + int(job) % 10000, text


def test_runjob_refuses_a_rendezvous_port_in_the_ephemeral_range(tmp_path):
    """No cluster needed: the check runs before anything starts, and the error names the value and the fix."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    out = subprocess.run(["bash", str(RUNJOB)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MASTER_PORT": str(low + 1), "TRAIN_SCRIPT": "/nonexistent.py"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"MASTER_PORT={low + 1} is inside the ephemeral port range {low}-{high}" in out.stderr, out.stderr


def run_train_job(tmp_path: Path, overrides: list[str], name: str) -> str:
    """sbatch runjob_SLURM.sh (2 workers: a loader rank and a model rank), wait for the end, return its log."""
    job = sbatch([f"--job-name={name}", "--gres=gpu:2", "--cpus-per-task=2", "--time=10",
                  f"--output={tmp_path}/{name}-%j.out", str(RUNJOB), *overrides],
                 env={"CONFIG": "tiny", "NPROC_PER_NODE": "2"})
    log = tmp_path / f"{name}-{job}.out"
    deadline = time.monotonic() + 400
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job)
        if info.get("JobState") in FINAL_STATES:
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job], timeout=30)
    text = log.read_text() if log.exists() else "(no log)"
    assert info.get("JobState") == "COMPLETED", f"job {job}: {info.get('JobState')}\n{text[-4000:]}"
    assert info["ExitCode"] == "0:0", text[-4000:]
    return text


def test_runjob_slurm_trains_and_resumes(slurm, demo_data, tmp_path):
    """The real thing: `sbatch runjob_SLURM.sh` trains the tiny CPU preset with a loader rank, leaves a
    checkpoint, and a second job continues from it."""
    from mmdit.train.checkpoint import latest_checkpoint

    overrides = [f"data.parquet_folder={demo_data['phase']}", f"data.bucket_indices_path={demo_data['index']}",
                 "data.batch_size=4", f"train.save_dir={tmp_path}", "train.run_name=slurm", "train.save_every=2",
                 "train.log_every=1", "train.warmup_steps=0", "train.precision=fp32",
                 "topology.loader_to_model={0: [1]}"]
    run_train_job(tmp_path, [*overrides, "train.total_steps=4"], "mmdit-ci-train")
    assert latest_checkpoint(tmp_path / "slurm").name == "step_00000004"
    text = run_train_job(tmp_path, [*overrides, "train.total_steps=6", "train.resume=auto"], "mmdit-ci-resume")
    assert "resumed from" in text and "step_00000004" in text, text[-4000:]
    assert latest_checkpoint(tmp_path / "slurm").name == "step_00000006"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
