"""Export (``python -m mmdit export``): a Hub-style folder that loads with MMDiT.from_pretrained offline and
samples what the step folder samples; full and sharded step folders; the gated-model error; progress bars."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_inference import make_checkpoint, tiny_dirs  # noqa: F401 - the fixture

from mmdit.checkpoint_loading import CheckpointNotFoundError, is_pretrained_folder, resolve_checkpoint
from mmdit.config import read_config
from mmdit.export import consolidate, export_pretrained
from mmdit.inference import Pipeline
from mmdit.model import MMDiT
from mmdit.train import checkpoint as ckpt
from mmdit.train.optim import EMA, make_optimizer
from mmdit.train.sharded_checkpoint import is_sharded, save_sharded

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def step(tiny_dirs, tmp_path_factory) -> Path:  # noqa: F811
    return make_checkpoint(tmp_path_factory.mktemp("runs") / "run", tiny_dirs, vae=True, step=7)


def images(source, **kwargs) -> np.ndarray:
    pipe = Pipeline.from_checkpoint(source, device="cpu", **kwargs)
    out = pipe.generate(["a red circle", "a blue square"], width=64, height=64, num_steps=3, seed=3)
    return np.stack([np.asarray(im) for im in out])


def sharded_copy(step: Path, run_dir: Path) -> Path:
    """The same weights as a one-process sharded (DCP) checkpoint."""
    cfg = read_config(step / "config.yaml")
    model = MMDiT(cfg.model)
    model.load_state_dict(load_file(step / "model.safetensors"))
    ema = EMA(model)
    ema.load_state_dict(load_file(step / "ema.safetensors"))
    opt = make_optimizer(model, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_sharded(run_dir, 7, model=model, optimizer=opt, ema=ema, scheduler_state=sched.state_dict(),
                        scaler_state={}, trainer_state={"step": 7, "samples_seen": 99}, config=cfg, keep_last=0,
                        group=None, main_rank=0, is_main=True)


@pytest.mark.parametrize("ema", [True, False])
def test_export_loads_offline_and_samples_like_the_step(step, tmp_path, ema):
    out = export_pretrained(step, tmp_path / "export", ema=ema)
    assert {"config.json", "model.safetensors", "mmdit_config.yaml", "README.md"} <= {p.name for p in out.iterdir()}
    assert is_pretrained_folder(out) and resolve_checkpoint(out) == out
    which = "ema" if ema else "model"
    net = MMDiT.from_pretrained(str(out))  # HF_HUB_OFFLINE=1 (conftest): a local folder, no hub
    saved = load_file(step / f"{which}.safetensors")
    assert net.cfg == read_config(step / "config.yaml").model
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    assert np.array_equal(images(out), images(step, weights=which))
    card = (out / "README.md").read_text()
    assert "step 7" in card and f"**{which}**" in card and "tiny" in card.lower()


def test_from_pretrained_is_strict(step, tmp_path):
    """A weights file lacking a tensor is an error, not a silently zero-initialised layer."""
    from safetensors.torch import save_file

    out = export_pretrained(step, tmp_path / "export")
    weights = load_file(out / "model.safetensors")
    del weights["final.linear.weight"]
    save_file(weights, out / "model.safetensors")
    with pytest.raises(RuntimeError, match="final.linear.weight"):
        MMDiT.from_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    config["cfg"]["stream_count"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="stream_count"):
        MMDiT.from_pretrained(str(out))


def test_sharded_step_exports_and_consolidates(step, tmp_path):
    shard_step = sharded_copy(step, tmp_path / "sharded_run")
    assert is_sharded(shard_step) and ckpt.is_complete(shard_step)
    # a sharded step folder samples as the full one did, and exports the same weights
    assert np.array_equal(images(shard_step), images(step))
    out = export_pretrained(shard_step, tmp_path / "export", ema=True)
    assert all(torch.equal(v, load_file(step / "ema.safetensors")[k]) for k, v in load_file(
        out / "model.safetensors").items())
    written = consolidate(shard_step)
    assert [p.name for p in written] == ["model.safetensors", "ema.safetensors"]
    assert ckpt.is_complete(shard_step)
    loaded = ckpt.load_checkpoint(shard_step)
    saved = load_file(step / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in loaded.model_state.items())


def test_export_cli_and_errors(step, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "mmdit", "export", "--checkpoint", str(step), "--output",
                         str(tmp_path / "cli"), "--ema"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert is_pretrained_folder(tmp_path / "cli")
    incomplete = tmp_path / "step_00000001"
    incomplete.mkdir()
    bad = subprocess.run([sys.executable, "-m", "mmdit", "export", "--checkpoint", str(incomplete), "--output",
                          str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "incomplete" in bad.stderr and "Traceback" not in bad.stderr
    # a hub id that is not in the offline cache: one error naming it
    with pytest.raises(CheckpointNotFoundError, match="nobody-here/no-such-model"):
        resolve_checkpoint("nobody-here/no-such-model")


def test_gated_model_error_names_the_model_and_the_command():
    import httpx
    from huggingface_hub.errors import GatedRepoError

    from mmdit.hub_access import LOGIN_COMMAND, gated_model_error

    request = httpx.Request("GET", "https://huggingface.co/google/gemma-2-2b/resolve/main/config.json")
    gated = GatedRepoError("403 gated", response=httpx.Response(403, request=request))
    try:  # what transformers raises: an OSError from the hub's error
        raise OSError("You are trying to access a gated repo.") from gated
    except OSError as err:
        error = gated_model_error("google/gemma-2-2b", err, "text encoder 0")
    assert error is not None and "google/gemma-2-2b" in str(error) and LOGIN_COMMAND in str(error)
    assert "https://huggingface.co/google/gemma-2-2b" in str(error)
    assert gated_model_error("google/gemma-2-2b", FileNotFoundError("no such folder")) is None


def test_progress_bars_only_where_asked():
    from transformers.utils import logging as hf_logging

    from mmdit.hub_access import quiet_progress_bars

    assert hf_logging.is_progress_bar_enabled()
    quiet_progress_bars(show=True)
    assert hf_logging.is_progress_bar_enabled()
    try:
        quiet_progress_bars(show=False)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
