"""Trainer behaviour in one process: topology rules, non-finite steps, LR schedule, EMA, validation, init_from."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdit.config import ConfigError, TopologyConfig, TrainConfig, load_config
from mmdit.train.checkpoint import latest_checkpoint
from mmdit.train.optim import EMA, lr_factor, param_groups
from mmdit.train.resume import plan_resume
from mmdit.train.runtime import Runtime
from mmdit.train.topology import build_topology
from mmdit.train.trainer import NonFiniteError, Trainer
from mmdit.train.transport import HEADER_SIZE, Batch, Header, header_of

ROOT = Path(__file__).resolve().parents[1]


def test_per_node_rule_matches_the_seed_map():
    """4 nodes x 8 GPUs, first 2 of each node load: the seed README's loader_to_model_gpu."""
    topo = build_topology(TopologyConfig(loaders_per_node=2), 32, 8)
    assert topo.loader_to_model[0] == (2, 3, 4) and topo.loader_to_model[1] == (5, 6, 7)
    assert topo.loader_to_model[25] == (29, 30, 31)
    assert len(topo.model_ranks) == 24 and topo.model_index(2) == 0


@pytest.mark.parametrize("mapping,world,message", [
    ({0: [1, 2]}, 4, "ranks [3] are neither loaders nor fed by one"),
    ({0: [1], 1: [2]}, 3, "listed both as a loader and a model rank"),
    ({0: [1, 5]}, 3, "outside the world of 3"),
    ({0: [1], 2: [1]}, 3, "fed by loaders 0 and 2"),
])
def test_bad_topology_is_one_clear_message(mapping, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_topology(TopologyConfig(loader_to_model=mapping), world, world)


def test_header_round_trip():
    from mmdit.conditioning import TextCondition

    batch = Batch(7, torch.arange(3), torch.zeros(3, 16, 4, 6, dtype=torch.bfloat16),
                  TextCondition([torch.zeros(3, 5, 48), torch.zeros(3, 9, 32)],
                                [torch.ones(3, 5, dtype=torch.bool), torch.ones(3, 9, dtype=torch.bool)],
                                torch.zeros(3, 24)), corrupt=2)
    h = header_of(batch)
    encoded = h.encode()
    assert encoded.shape == (HEADER_SIZE,) and Header.decode(encoded) == h
    # (length, width, real tokens) per encoder
    assert (h.step, h.batch, h.height, h.width, h.text_shapes, h.pooled_dim) == (
        7, 3, 4, 6, ((5, 48, 15), (9, 32, 27)), 24)
    assert (h.latent_dtype, h.text_dtypes, h.pooled_dtype) == (torch.bfloat16, (torch.float32,) * 2, torch.float32)


def test_warmup_then_cosine():
    cfg = TrainConfig(total_steps=100, warmup_steps=10, lr_schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.0)
    assert lr_factor(50, TrainConfig(total_steps=100, warmup_steps=10)) == 1.0


def test_no_weight_decay_on_norms_scalars_biases():
    from mmdit.model import MMDiT

    cfg = load_config("tiny_latent").model
    model = MMDiT(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "condition.time.time_scale" in exempt and "condition.text.0.scale" in exempt
    assert all(names[id(p)].endswith("weight") for p in decay["params"])


def test_ema_update_is_exact():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 0.9)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * model.weight)


def single_rank(cfg) -> Runtime:
    return Runtime(0, 1, 0, torch.device("cpu"), build_topology(cfg.topology, 1, 1))


def test_nonfinite_steps_are_skipped_then_halt(tmp_path):
    cfg = load_config("tiny_latent", [f"train.save_dir={tmp_path}", "train.max_nonfinite_in_row=3"])
    trainer = Trainer(cfg, single_rank(cfg), plan_resume(cfg, tmp_path / "tiny_latent", 1))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for i in range(2):
        for p in trainer.model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        _, finite, stop = trainer._optimizer_step()
        assert not stop
        assert not finite and trainer.skipped == i + 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        trainer._optimizer_step()


def train_once(overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), "--config", "tiny_latent", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def test_validation_images_and_init_from(tiny_models, demo_data, tmp_path):
    """A plain single process (no torchrun): trains, writes validation grids, then a new stage starts from it."""
    common = [
        f"encoders.text.0.name={tiny_models['gemma2']}", f"encoders.text.1.name={tiny_models['modernbert']}",
        f"encoders.text.2.name={tiny_models['clip']}", f"encoders.vae={tiny_models['vae']}",
        f"data.parquet_folder={demo_data['phase']}", f"data.bucket_indices_path={demo_data['index']}",
        "data.batch_size=4", f"train.save_dir={tmp_path}", "train.log_every=1", "sample.num_steps=3",
    ]
    train_once([*common, "train.total_steps=4", "train.validate_every=2",
                "train.validation_prompts=[a red circle, a blue square]", "train.validation_size=[32,48]"])
    stage1 = latest_checkpoint(tmp_path / "tiny_latent")
    grids = sorted((tmp_path / "tiny_latent" / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step_00000002.png", "step_00000004.png"]
    from PIL import Image

    assert Image.open(grids[0]).size == (2 * 48, 32)
    result = train_once([*common, "train.run_name=stage2", "train.total_steps=1", f"train.init_from={stage1}",
                         "model.max_res=128"])
    assert "initialised weights from" in result.stderr
    stage2 = load_file(latest_checkpoint(tmp_path / "stage2") / "model.safetensors")
    ema1 = load_file(stage1 / "ema.safetensors")
    # one step at the warm-up learning rate moved the weights away from where they started, but only a little
    diffs = [float((stage2[k] - ema1[k]).abs().max()) for k in ema1]
    assert 0 < max(diffs) < 0.05


def test_model_registers_no_buffers():
    """DDP is built without buffer broadcasting in mind: a buffer added to the model would need it."""
    from mmdit.model import MMDiT

    assert list(MMDiT(load_config("tiny_latent").model).buffers()) == []


def test_training_loop_logs_held_out_metrics(tiny_models, demo_data, tmp_path):
    """eval.* set: the loop logs the validation loss (EMA and raw) and the image metrics when due."""
    import json

    from mmdit.eval.tiny_extractors import build_tiny_extractors

    extractors = build_tiny_extractors(tmp_path / "extractors")
    train_once([
        f"encoders.text.0.name={tiny_models['gemma2']}", f"encoders.text.1.name={tiny_models['modernbert']}",
        f"encoders.text.2.name={tiny_models['clip']}", f"encoders.vae={tiny_models['vae']}",
        f"data.parquet_folder={demo_data['phase']}", f"data.bucket_indices_path={demo_data['index']}",
        "data.batch_size=4", f"train.save_dir={tmp_path}", "train.total_steps=4", "train.log_every=1",
        f"eval.parquet_folder={demo_data['phase']}", f"eval.index={demo_data['index']}", "eval.loss_every=2",
        "eval.images_every=4", "eval.loss_samples=8", "eval.num_images=4", "eval.num_timesteps=2",
        "eval.batch_size=4", f"eval.dino={extractors['dino']}", f"eval.clip={extractors['clip']}",
        "sample.num_steps=2", "train.peak_flops=1e12",
    ])
    rows = [json.loads(line) for line in (tmp_path / "tiny_latent" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if any(k.startswith("val/") for k in r)}
    assert sorted(evals) == [2, 4], rows
    assert "val/ema/loss" in evals[2] and "val/model/loss" in evals[2], evals[2]  # eval.loss_weights: both
    assert evals[2]["val/ema/loss"] != evals[4]["val/ema/loss"]  # the weights trained in between
    assert "eval/fd_dinov2" in evals[4] and "eval/clip_score" in evals[4] and "eval/fd_dinov2" not in evals[2]
    assert all(evals[s]["eval/seconds"] > 0 for s in (2, 4))  # what each evaluation cost, logged with it
    assert [evals[s]["images_seen"] for s in (2, 4)] == [8, 16]  # for the time to a target
    assert evals[4]["eval/fd_num_images"] == 4 and evals[4]["eval/cmmd"] >= 0
    timed = [r for r in rows if "images_per_s" in r]  # step 1 is the warm-up: its time is logged apart
    assert len(timed) == 3 and "time/first_step_s" in rows[0] and "mfu" not in rows[0]
    assert all(0 < r["mfu"] <= r["hfu"] for r in timed)
