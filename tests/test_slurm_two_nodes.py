"""SLURM across two real hosts: `sbatch --nodes=2 runjob_SLURM.sh` on the cluster of `.ci/two_node_cluster.sh`.

Two network namespaces on this machine, each with its own hostname, address (10.213.7.0/24, on the test's
own veth pair only) and slurmd; slurmctld on the first. The job trains tiny_latent with 2 workers per node
and `topology.loaders_per_node=1` (rank 0 loads for rank 1 on mmdit-a, rank 2 for rank 3 on mmdit-b; DDP
between ranks 1 and 3 across the hosts), gets the time-limit USR1, checkpoints, is requeued, resumes and
finishes. Its final weights must equal those of a one-node run of the same global layout.

Needs root and `ip netns`: skips without them, unless CI is set (then it fails). The fixture builds the
cluster and tears it down afterwards, also on failure. Clients (sbatch, scontrol, scancel) run inside the
first namespace, so every packet stays within the namespaces and loopback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_distributed import base_overrides, sample_log

from mmdit.train.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
RUNJOB = REPO / "runjob_SLURM.sh"
CLUSTER = REPO / ".ci" / "two_node_cluster.sh"
NETNS = "mmdit-na"
SLURM_CONF = "/tmp/mmdit-slurm2/slurm.conf"
pytestmark = pytest.mark.slow

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}
STEPS = 24
LAYOUT_2NODES = "topology.loaders_per_node=1"
# the same global layout on one node: world of 4, rank 0 feeds rank 1 and rank 2 feeds rank 3
LAYOUT_1NODE = "topology.loader_to_model={0: [1], 2: [3]}"


class TwoNodes:
    """Runs SLURM clients inside the first host's namespace, against the two-node cluster's config."""

    def run(self, args: list[str], timeout: float = 60, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["ip", "netns", "exec", NETNS, *args]
        full_env = {**os.environ, **(env or {}), "SLURM_CONF": SLURM_CONF}
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
        if check:
            assert out.returncode == 0, f"{args} failed ({out.returncode}): {out.stderr or out.stdout}"
        return out

    def sbatch(self, args: list[str], env: dict[str, str]) -> str:
        return self.run(["sbatch", "--parsable", *args], env=env).stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        out = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        return dict(item.partition("=")[::2] for item in out.stdout.split()) if out.returncode == 0 else {}

    def node_states(self) -> str:
        return self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout

    def wait_job(self, job_id: str, until, timeout: float, what: str, log: Path) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info and until(info):
                return info
            if info.get("JobState") in FINAL_STATES - {"COMPLETED"}:
                break
            time.sleep(0.5)
        self.run(["scancel", job_id], check=False)
        pytest.fail(f"job {job_id}: waited {timeout:.0f}s for {what}; last state: {info.get('JobState')} "
                    f"reason={info.get('Reason')} restarts={info.get('Restarts')}\n{tail(log)}")


def tail(path: Path, n: int = 6000) -> str:
    return path.read_text()[-n:] if path.exists() else f"({path} not written)"


@pytest.fixture(scope="module")
def two_nodes():
    if os.geteuid() != 0:
        reason = "needs root (network namespaces, slurmd)"
    else:
        up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=180)
        if up.returncode == 0:
            reason = None
        else:
            subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, timeout=120)
            if up.returncode != 3:  # 3: cannot run here (no ip netns / no SLURM); anything else is a bug
                pytest.fail(f"{CLUSTER.name} up failed:\n{up.stdout}{up.stderr}", pytrace=False)
            reason = up.stderr.strip()
    if reason:
        hint = "run as root after `bash .ci/setup_slurm.sh`"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the two-node cluster cannot run: {reason}; {hint}", pytrace=False)
        pytest.skip(f"two-node SLURM cluster not possible here: {reason} ({hint})")
    try:
        yield TwoNodes()
    finally:
        subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, timeout=120)


def metrics_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_two_node_job_stops_requeues_resumes_like_one_node(two_nodes, tiny_models, demo_data, tmp_path):
    save = tmp_path / "two"
    overrides = [*base_overrides(tiny_models, demo_data, save, STEPS, **{"train.ema_update_every": 1}),
                 LAYOUT_2NODES]
    env = {"CONFIG": "tiny_latent", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    job = two_nodes.sbatch(["--job-name=mmdit-ci-2nodes", "--nodes=2", "--gres=gpu:2", "--cpus-per-task=2",
                            "--time=10", f"--output={tmp_path}/job-%j.out", str(RUNJOB), *overrides], env=env)
    log = tmp_path / f"job-{job}.out"
    run_dir = save / "tiny_latent"

    # -- first run: trains on both hosts; the time-limit signal after 2 steps
    info = two_nodes.wait_job(job, lambda i: i.get("JobState") == "RUNNING", 60, "RUNNING", log)
    t_running = time.time()
    deadline = time.monotonic() + 150
    t_step1 = None
    while metrics_lines(run_dir) < 2:
        if t_step1 is None and metrics_lines(run_dir) >= 1:
            t_step1 = time.time()
        if time.monotonic() > deadline or two_nodes.job_info(job).get("JobState") in FINAL_STATES:
            two_nodes.run(["scancel", job], check=False)
            state = two_nodes.job_info(job).get("JobState")
            pytest.fail(f"job {job} did not train 2 steps; state {state}\n{tail(log)}")
        time.sleep(0.2)
    t_first_steps = time.time()
    t_step1 = t_step1 or t_first_steps
    # exactly what `#SBATCH --signal=B:USR1@300` does before the time limit
    two_nodes.run(["scancel", "--batch", "--signal=USR1", job])
    t_usr1 = time.time()
    t_ckpt = None
    deadline = time.monotonic() + 150
    while True:
        info = two_nodes.job_info(job)
        if t_ckpt is None and latest_checkpoint(run_dir) is not None:
            t_ckpt = time.time()
        if int(info.get("Restarts", 0)) >= 1 and info.get("JobState") == "PENDING":
            break
        if time.monotonic() > deadline or info.get("JobState") in FINAL_STATES:
            two_nodes.run(["scancel", job], check=False)
            pytest.fail(f"job {job} was not requeued after USR1: {info.get('JobState')}\n{tail(log)}")
        time.sleep(0.2)
    first = latest_checkpoint(run_dir)
    assert first is not None, f"no checkpoint after USR1 (the stop protocol lost it)\n{tail(log)}"
    stopped_at = int(first.name.split("_")[1])
    assert 2 <= stopped_at < STEPS, (first, tail(log))
    text = log.read_text()
    assert "training step exited with code 0" in text, tail(log)
    assert "requeueing job" in text, tail(log)
    # each host worked out its own interface: the veth end that routes to the first host
    assert "mmdit-a: GLOO_SOCKET_IFNAME=mmdit-va NCCL_SOCKET_IFNAME=mmdit-va" in text, tail(log)
    assert "mmdit-b: GLOO_SOCKET_IFNAME=mmdit-vb NCCL_SOCKET_IFNAME=mmdit-vb" in text, tail(log)

    # -- requeued run: SLURM holds it ~2 min (BeginTime); start it once both nodes finished the first run
    deadline = time.monotonic() + 60
    while "comp" in two_nodes.node_states():
        assert time.monotonic() < deadline, "nodes stuck completing the first run"
        time.sleep(0.5)
    time.sleep(3)  # not within the second the old run's credential was revoked ("Job credential revoked")
    two_nodes.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    info = two_nodes.wait_job(job, lambda i: i.get("JobState") == "COMPLETED", 240, "the requeued job", log)
    assert info["ExitCode"] == "0:0", tail(log)
    text = log.read_text()
    assert re.search(r"resumed from .*" + first.name, text), tail(log)
    final = latest_checkpoint(run_dir)
    assert final.name == f"step_{STEPS:08d}", tail(log)

    # -- reference: one node, same global layout, no interruption
    ref = tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           str(REPO / "src" / "train.py"), "--config", "tiny_latent",
           *base_overrides(tiny_models, demo_data, ref, STEPS, **{"train.ema_update_every": 1}), LAYOUT_1NODE]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    ref_final = latest_checkpoint(ref / "tiny_latent")
    assert ref_final.name == final.name

    # same samples on the same model ranks: the first run's steps, then the resumed ones
    assert sample_log(run_dir, 1) == sample_log(ref / "tiny_latent", 1)
    assert sample_log(run_dir, 3) == sample_log(ref / "tiny_latent", 3)
    diffs = {}
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(final / name), load_file(ref_final / name)
        assert a.keys() == b.keys(), name
        diffs[name] = max((a[k] - b[k]).abs().max().item() for k in a)
    oa = torch.load(final / "optimizer.pt", weights_only=True)
    ob = torch.load(ref_final / "optimizer.pt", weights_only=True)
    diffs["optimizer.pt"] = max((v - ob["state"][key][field]).abs().max().item()
                                for key, state in oa["state"].items() for field, v in state.items()
                                if torch.is_tensor(v))
    timings = {"job_running_to_step1_s": round(t_step1 - t_running, 1),
               "usr1_to_checkpoint_s": round(t_ckpt - t_usr1, 1) if t_ckpt else None,
               "stopped_at": stopped_at, "max_abs_diff": diffs}
    print(f"\n[two-node timings] {json.dumps(timings)}")
    (tmp_path / "timings.json").write_text(json.dumps(timings))
    assert all(d == 0.0 for d in diffs.values()), f"two-node run differs from the one-node reference: {diffs}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))
