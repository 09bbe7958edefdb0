"""Checkpoints: bit-exact round trip, keep_last, atomicity under a real SIGKILL, weights-only loading."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdit.config import Config
from mmdit.train import checkpoint as ckpt
from mmdit.train.checkpoint import (
    CheckpointError,
    MissingCheckpointFile,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    resolve_resume,
    save_checkpoint,
)
from mmdit.train.rng_state import capture_rng_state, restore_rng_state

REPO = Path(__file__).resolve().parents[1]


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16),
                                        torch.nn.Linear(16, 8))
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight  # shared storage
        self.register_buffer("scale_bf16", torch.randn(3).to(torch.bfloat16))

    def forward(self, idx):
        return self.head(self.body(self.embed(idx)))


def trained():
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        idx = torch.randint(0, 11, (4, 5))
        loss = model(idx).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched, scaler


def states(model, opt, sched, scaler, **trainer_extra):
    model_state = model.state_dict()
    model_state["transposed"] = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous
    ema = {k: v.detach().clone() * 0.5 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    return dict(model_state=model_state, ema_state=ema, optimizer_state=opt.state_dict(),
                scheduler_state=sched.state_dict(), scaler_state=scaler.state_dict(),
                trainer_state={"data_cursor": 1234, "wandb_id": "abc", **trainer_extra})


def save(run_dir, step, keep_last=3, **kw):
    model, opt, sched, scaler = trained()
    return save_checkpoint(run_dir, step, **states(model, opt, sched, scaler, **kw), config=Config(),
                           keep_last=keep_last)


def assert_same(a, b, where="state"):
    """Recursive bit-exact equality (tensors: same dtype, shape and bits)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_round_trip_is_bit_exact(tmp_path):
    model, opt, sched, scaler = trained()
    gen_np = np.random.default_rng(7)
    gen_t = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(2), np.random.randn()  # np.random.randn: cached gaussian
    rng = capture_rng_state({"np": gen_np, "torch": gen_t})
    want = (random.random(), np.random.rand(3), torch.rand(3), gen_np.random(3), torch.rand(3, generator=gen_t))
    extra = {"rng": [rng, rng], "cursor_tensor": torch.tensor([1, 2], dtype=torch.int64),
             "array": np.arange(4, dtype=np.int16), "scalar": np.float32(0.5), "tuple": (1, "a")}
    s = states(model, opt, sched, scaler, **extra)
    path = save_checkpoint(tmp_path / "run", 12, **s, config=Config(), keep_last=2)
    assert path == tmp_path / "run" / "step_00000012"

    c = load_checkpoint(path)
    assert c.step == 12 and c.path == path
    assert_same(c.model_state, s["model_state"], "model")
    assert_same(c.ema_state, s["ema_state"], "ema")
    assert_same(c.optimizer_state, s["optimizer_state"], "optimizer")
    assert_same(c.scheduler_state, s["scheduler_state"], "scheduler")
    assert_same(c.scaler_state, s["scaler_state"], "scaler")
    ts = c.trainer_state
    assert ts["data_cursor"] == 1234 and ts["wandb_id"] == "abc" and ts["step"] == 12
    assert_same(ts["cursor_tensor"], extra["cursor_tensor"])
    assert ts["array"].dtype == np.int16 and (ts["array"] == extra["array"]).all()
    assert ts["scalar"] == 0.5 and ts["tuple"] == [1, "a"]
    assert c.config == Config()
    json.loads((path / "trainer_state.json").read_text())  # plain JSON on disk

    # the loaded states drive training on exactly as the originals do
    model2 = Tied()
    model2.load_state_dict({k: v for k, v in c.model_state.items() if k != "transposed"})
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 10))  # build, then load
    opt2.load_state_dict(c.optimizer_state)
    sched2.load_state_dict(c.scheduler_state)
    assert model2.head.weight.data_ptr() == model2.embed.weight.data_ptr()
    for m, o, sch in ((model, opt, sched), (model2, opt2, sched2)):
        torch.manual_seed(5)
        loss = m(torch.randint(0, 11, (4, 5))).square().mean()
        o.zero_grad()
        loss.backward()
        o.step()
        sch.step()
    assert_same(model.state_dict(), model2.state_dict(), "after one more step")
    assert sched2.get_last_lr() == sched.get_last_lr()

    # RNG: restoring the saved state replays the same numbers
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    gen_np2, gen_t2 = np.random.default_rng(0), torch.Generator()
    restore_rng_state(ts["rng"][1], {"np": gen_np2, "torch": gen_t2})
    got = (random.random(), np.random.rand(3), torch.rand(3), gen_np2.random(3), torch.rand(3, generator=gen_t2))
    assert got[0] == want[0]
    assert (got[1] == want[1]).all() and (got[3] == want[3]).all()
    assert torch.equal(got[2], want[2]) and torch.equal(got[4], want[4])

    # (s["model_state"] aliases the live model, which trained on above: compare with the loaded copy)
    assert_same(load_weights(path, "model"), c.model_state, "load_weights model")
    assert_same(load_weights(path), s["ema_state"], "load_weights ema")
    assert_same(load_weights(tmp_path / "run", "ema"), s["ema_state"], "run dir -> newest")
    assert_same(load_weights(path / "ema.safetensors"), s["ema_state"], "a .safetensors file")


def test_optional_states_and_missing_file(tmp_path):
    model, opt, sched, scaler = trained()
    path = save_checkpoint(tmp_path, 1, model_state=model.state_dict(), ema_state=None, optimizer_state=None,
                           scheduler_state=None, scaler_state=None, trainer_state={}, config=Config(), keep_last=0)
    c = load_checkpoint(path)
    assert c.ema_state is None and c.optimizer_state is None and c.scaler_state is None
    with pytest.raises(MissingCheckpointFile, match="ema.safetensors"):
        load_weights(path, "ema")

    good = save(tmp_path, 2)
    (good / "optimizer.pt").unlink()
    with pytest.raises(MissingCheckpointFile, match="optimizer.pt"):
        load_checkpoint(good)
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        resolve_resume(tmp_path, str(good))
    assert latest_checkpoint(tmp_path) == path  # the broken one is skipped


def test_config_from_an_older_schema_still_loads(tmp_path):
    path = save(tmp_path, 1)
    with open(path / "config.yaml", "a") as f:
        f.write("removed_section:\n  old_key: 1\n")
    c = load_checkpoint(path)
    assert c.config is None and c.model_state


def test_keep_last_and_resave(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep_last=2, marker=step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]
    assert latest_checkpoint(tmp_path).name == "step_00000005"
    # saving the same step again replaces it
    save(tmp_path, 5, keep_last=2, marker="again")
    assert load_checkpoint(tmp_path / "step_00000005").trainer_state["marker"] == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]
    # numeric, not lexical, order past 8 digits
    save(tmp_path, 123_456_789, keep_last=2)
    assert latest_checkpoint(tmp_path).name == "step_123456789"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000005", "step_123456789"]


def test_latest_ignores_temp_and_incomplete_dirs(tmp_path):
    good = save(tmp_path, 2)
    # a finished-looking temp dir of a newer step (killed just before its rename) and an unmarked step dir
    tmp = tmp_path / "step_00000009.tmp-4242"
    tmp.mkdir()
    for f in good.iterdir():
        (tmp / f.name).write_bytes(f.read_bytes())
    unmarked = tmp_path / "step_00000008"
    unmarked.mkdir()
    for f in good.iterdir():
        if f.name != "COMPLETE":
            (unmarked / f.name).write_bytes(f.read_bytes())
    assert latest_checkpoint(tmp_path) == good
    assert resolve_resume(tmp_path, "auto") == good
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(tmp_path, str(unmarked))
    save(tmp_path, 3)  # the next save cleans up the leftover temp dir
    assert not tmp.exists()
    assert latest_checkpoint(tmp_path).name == "step_00000003"


def test_interrupted_replacement_is_put_back(tmp_path):
    good = save(tmp_path, 4)
    aside = tmp_path / "step_00000004.old-999999"
    good.rename(aside)  # killed between "move the old one aside" and "rename the new one in"
    assert latest_checkpoint(tmp_path) is None
    save(tmp_path, 5)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]


def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume(run, "auto") is None
    assert resolve_resume(run, "none") is None and resolve_resume(run, "") is None
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(run, str(tmp_path / "nope"))
    p = save(run, 7)
    assert resolve_resume(run, "auto") == p
    assert resolve_resume(run, str(p)) == p
    assert resolve_resume(run, "step_00000007") == p  # a name inside the run dir
    assert resolve_resume(tmp_path / "other", str(run)) == p  # another run's directory: its newest


class Evil:
    """Unpickling this would create a file: proof that loading ran arbitrary code."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_loading_refuses_pickled_objects(tmp_path):
    path = save(tmp_path, 1)
    pwned = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "payload": Evil(pwned)}, path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        load_checkpoint(path)
    assert not pwned.exists()


CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from mmdit.config import Config
    from mmdit.train.checkpoint import save_checkpoint
    run_dir = sys.argv[1]
    big = {f"w{i}": torch.randn(1024, 1024) for i in range(8)}  # 32 MB
    kw = dict(ema_state=big, optimizer_state={"state": {}, "param_groups": []}, scheduler_state={},
              scaler_state={}, trainer_state={}, config=Config(), keep_last=3)
    save_checkpoint(run_dir, 1, model_state=big, **kw)
    print("saved 1", flush=True)
    real_fsync = os.fsync
    def slow_fsync(fd):  # a slow file system: each fsync takes a while
        real_fsync(fd)
        time.sleep(0.5)
    os.fsync = slow_fsync
    step = 2
    while True:
        save_checkpoint(run_dir, step, model_state=big, **kw)
        step += 1
""")


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "saved 1"
        deadline = time.monotonic() + 60
        tmp_dirs: list[Path] = []
        while time.monotonic() < deadline:
            tmp_dirs = [p for p in run.glob("step_00000002.tmp-*") if (p / "model.safetensors").exists()]
            if tmp_dirs:
                break
            time.sleep(0.02)
        assert tmp_dirs, "the second save never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert tmp_dirs[0].exists() and not (run / "step_00000002").exists()  # killed mid-save

    good = resolve_resume(run, "auto")
    assert good == run / "step_00000001"
    assert load_checkpoint(good).step == 1

    model, opt, sched, scaler = trained()
    new = save_checkpoint(run, 2, **states(model, opt, sched, scaler), config=Config(), keep_last=3)
    assert resolve_resume(run, "auto") == new
    assert not tmp_dirs[0].exists()
    assert sorted(p.name for p in run.iterdir()) == ["step_00000001", "step_00000002"]
