"""Post-hoc EMA and Muon in real training runs: the reconstruction against an EMA of that length tracked in
the same run, the ``python -m mmdit ema`` sweep and checkpoint, and exact resume under DDP with real ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmdit.train.checkpoint import latest_checkpoint, list_checkpoints, read_trainer_state
from mmdit.train.phema_tracker import list_snapshots

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def common(tiny_models: dict, data: dict, save_dir: Path, steps: int) -> list[str]:
    values = {
        "encoders.text.0.name": tiny_models["gemma2"], "encoders.text.1.name": tiny_models["modernbert"],
        "encoders.text.2.name": tiny_models["clip"], "encoders.vae": tiny_models["vae"],
        "data.parquet_folder": data["phase"], "data.bucket_indices_path": data["index"],
        "data.batch_size": 4, "train.save_dir": save_dir, "train.total_steps": steps, "train.log_every": 1,
        "train.warmup_steps": 0, "train.lr_schedule": "constant", "train.lr": 3e-3, "train.precision": "fp32",
    }
    return [f"{k}={v}" for k, v in values.items()]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def train(overrides: list[str], nproc: int = 1) -> None:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    run([*launcher, str(ROOT / "src" / "train.py"), "--config", "tiny_latent", *overrides])


def flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].double().reshape(-1) for k in sorted(state)])


def test_reconstruction_matches_the_ema_tracked_in_the_run(tiny_models, demo_data, tmp_path):
    """0.05 and 0.10 snapshotted every 3 of 24 steps; 0.07 tracked alongside. The reconstruction of 0.07 from
    the first two is within (profile residual) x (L2 spread of the weight trajectory, read from a checkpoint
    per step) of the tracked one, and far closer to it than the tracked 0.05 is; the sweep picks by the
    validation loss that ``mmdit evaluate`` reports for the written checkpoint."""
    train([*common(tiny_models, demo_data, tmp_path, 24), "train.phema.enabled=true",
           "train.phema.stds=[0.05,0.10,0.07]", "train.phema.snapshot_every=3", "train.phema.snapshot_dtype=fp32",
           "train.save_every=1", "train.keep_last=100"])
    run_dir = tmp_path / "tiny_latent"
    snaps = list_snapshots(run_dir)
    assert len(snaps) == 3 * 8 and {s["step"] for s in snaps} == set(range(3, 25, 3))
    out = tmp_path / "phema_out"
    ema = [sys.executable, "-m", "mmdit", "ema", "--run", str(run_dir), "--from_stds", "0.05,0.10"]
    summary = json.loads(run([*ema, "--stds", "0.07", "--output", str(out)]).stdout)
    assert summary["snapshots"] == 16
    rec = flat(load_file(latest_checkpoint(out) / "ema.safetensors"))
    final = max(s["images"] for s in snaps)
    tracked = {s["std"]: flat(load_file(str(s["path"]))) for s in snaps if s["images"] == final}
    err = float((rec - tracked[0.07]).norm())
    # the trajectory: the weights after every step and the images each step added
    ckpts = list_checkpoints(run_dir)
    assert len(ckpts) == 24
    theta = torch.stack([flat(load_file(c / "model.safetensors")) for c in ckpts])
    seen = np.array([read_trainer_state(c)["samples_seen"] for c in ckpts], dtype=np.float64)
    assert seen[-1] == final
    dt = torch.tensor(np.diff(np.concatenate([[0.0], seen])))
    mean = (dt[:, None] * theta).sum(0) / dt.sum()
    spread = float((dt[:, None] * (theta - mean) ** 2).sum().sqrt())
    residual = summary["stds"]["0.0700"]["profile_residual"]
    # fp32 rounding: each of the 24 lerps and each snapshot's share of the sum, relative to the weights
    rounding = (summary["stds"]["0.0700"]["sum_abs_coef"] + 24) * 1.2e-7 * float(theta[-1].norm())
    assert err <= residual * spread + rounding, (err, residual * spread, rounding)
    assert err < 0.05 * float((tracked[0.05] - tracked[0.07]).norm()), err  # measured: 0.012
    # the sweep by validation loss, and the chosen weights as a checkpoint that evaluate reads
    evals = [f"eval.index={demo_data['index']}", "eval.loss_samples=8", "eval.num_timesteps=2", "eval.batch_size=4"]
    sweep = json.loads(run([*ema, "--stds", "0.03,0.07,0.15", "--eval_set", demo_data["phase"], "--output",
                            str(tmp_path / "chosen"), *evals]).stdout)
    losses = {float(k): v["val_loss"] for k, v in sweep["stds"].items()}
    assert sweep["chosen_std"] == min(losses, key=losses.get)
    assert len(set(losses.values())) == 3  # different weights, different losses
    chosen = latest_checkpoint(tmp_path / "chosen")
    assert chosen.name == "step_00000024"
    run([sys.executable, "-m", "mmdit", "evaluate", "--checkpoint", str(chosen), "--eval_set", demo_data["phase"],
         "--no_images", "--index", demo_data["index"], "--loss_samples", "8", "--num_timesteps", "2",
         "--batch_size", "4"])
    row = json.loads((tmp_path / "chosen" / "eval" / "step_00000024_ema.json").read_text())
    assert row["val/loss"] == pytest.approx(losses[sweep["chosen_std"]], rel=1e-6)


def test_muon_and_phema_resume_exactly_under_ddp(tiny_models, demo_data, tmp_path):
    """2 model ranks (torchrun, gloo), Muon + post-hoc EMA: 4 steps straight == 2, stop, resume 2 more, in the
    weights, EMA, optimizer state (keyed by name), the post-hoc EMA profiles and their snapshots."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["train.optimizer=muon", "train.muon.lr=0.02", "train.muon.adjust_lr=original", "model.depth=1",
             "train.phema.enabled=true", "train.phema.snapshot_every=1", "train.save_every=1000",
             "train.weights_digest=true"]
    train([*common(tiny_models, demo_data, straight, 4), *extra], nproc=2)
    train([*common(tiny_models, demo_data, resumed, 2), *extra], nproc=2)
    train([*common(tiny_models, demo_data, resumed, 4), *extra, "train.resume=auto"], nproc=2)
    a, b = latest_checkpoint(straight / "tiny_latent"), latest_checkpoint(resumed / "tiny_latent")
    assert a.name == b.name == "step_00000004"
    for name in ("model.safetensors", "ema.safetensors", "phema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert read_trainer_state(a)["phema"] == read_trainer_state(b)["phema"]
    oa, ob = (torch.load(p / "optimizer.pt", weights_only=True) for p in (a, b))
    assert set(oa) == {"adamw", "muon"} and "blocks.0.image.qkv.weight" in oa["muon"]["state"]
    for part in oa:
        for param, state in oa[part]["state"].items():
            for field, value in state.items():
                assert torch.equal(value, ob[part]["state"][param][field]), (part, param, field)
    sa, sb = list_snapshots(straight / "tiny_latent"), list_snapshots(resumed / "tiny_latent")
    assert [{**s, "path": s["path"].name} for s in sa] == [{**s, "path": s["path"].name} for s in sb]
    assert len(sa) == 8  # 2 stds x every step (the file's metadata order varies: compare the tensors)
    for s, t in zip(sa, sb):
        wa, wb = load_file(s["path"]), load_file(t["path"])
        assert all(torch.equal(wa[k], wb[k]) for k in wa), s["path"].name
    ranks = [json.loads((straight / "tiny_latent" / f"summary_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # DDP + Muon kept the ranks in sync


def test_phema_sharded_under_fsdp_resumes_exactly(tiny_models, demo_data, tmp_path):
    """FSDP (2 ranks): the profiles are sharded like the weights and gathered for the snapshots. 4 steps straight
    == 2 + resume 2 bit for bit; a run that starts under DDP and resumes under FSDP (the full profiles
    sharded on load) tracks the same profiles to fp32 rounding."""
    extra = ["train.phema.enabled=true", "train.phema.snapshot_every=1", "train.phema.snapshot_dtype=fp32",
             "train.save_every=1000", "model.depth=1"]
    fsdp = "train.parallel=fsdp"
    straight, resumed, switched = tmp_path / "straight", tmp_path / "resumed", tmp_path / "switched"
    train([*common(tiny_models, demo_data, straight, 4), *extra, fsdp], nproc=2)
    train([*common(tiny_models, demo_data, resumed, 2), *extra, fsdp], nproc=2)
    train([*common(tiny_models, demo_data, resumed, 4), *extra, fsdp, "train.resume=auto"], nproc=2)
    train([*common(tiny_models, demo_data, switched, 2), *extra], nproc=2)
    train([*common(tiny_models, demo_data, switched, 4), *extra, fsdp, "train.resume=auto"], nproc=2)
    sa, sb, sc = (list_snapshots(d / "tiny_latent") for d in (straight, resumed, switched))
    names = [s["path"].name for s in sa]
    assert len(sa) == 8 and names == [s["path"].name for s in sb] == [s["path"].name for s in sc]
    for s, t, u in zip(sa, sb, sc):
        wa, wb, wc = (load_file(x["path"]) for x in (s, t, u))
        assert wa.keys() == wb.keys() == wc.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), s["path"].name
        assert max(float((wa[k] - wc[k]).abs().max()) for k in wa) < 1e-5, s["path"].name
