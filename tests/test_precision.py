"""The bf16 path on the CPU: one place decides the dtypes (mmdit.precision); CPU autocast and FSDP2's bf16
policy run here, so DDP and FSDP with bf16 compute are checked against an fp32 reference with bounds from
bf16's unit roundoff u = 2^-8, and hooks check that time and RoPE inputs are never cast; the model takes
text features in any dtype (bf16 encoders beside fp32 weights).

Bounds. A velocity passes through 4 * depth + 2 chained bf16 matmuls (patch embedding; per block qkv, output
projection and two MLP matrices; adaLN; the output layer), each rounding its inputs to relative error u;
worst case, the errors add linearly: |dv| / |v| <= (4 depth + 2) u. The backward runs the chain once more
with its own roundings, so gradients (and SGD updates, which are sums of gradients) get twice that.
"""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conditions import random_condition, randomize_

from mmdit.config import ModelConfig
from mmdit.model import MMDiT
from mmdit.precision import Precision, compute_dtype, precision_of

U = 2.0**-8  # bf16's unit roundoff (8 significant bits)
F32, BF16 = torch.float32, torch.bfloat16


def test_one_place_decides_every_dtype():
    assert precision_of("fp32", "cuda", "fsdp") == Precision(compute=F32, params=F32, reduce=F32)
    assert precision_of("bf16", "cpu", "ddp") == Precision(compute=BF16, params=F32, reduce=F32)
    assert precision_of("bf16", "cpu", "fsdp") == Precision(compute=BF16, params=BF16, reduce=F32)
    assert precision_of("auto", "cuda", "fsdp").params == BF16 and precision_of("auto", "cpu", "fsdp").params == F32
    assert compute_dtype("auto", "cuda") == BF16 and compute_dtype("fp16", "cpu") == torch.float16
    for p in ("fp32", "bf16", "auto"):
        assert precision_of(p, "cuda").coordinates == precision_of(p, "cuda").master == F32
    with pytest.raises(ValueError, match="train.precision='tf32'"):
        precision_of("tf32", "cpu")


def test_policy_leaves_forward_inputs_alone():
    from mmdit.train.parallel import mixed_precision

    policy = mixed_precision(precision_of("bf16", "cpu", "fsdp"))
    assert (policy.param_dtype, policy.reduce_dtype, policy.cast_forward_inputs) == (BF16, F32, False)
    assert mixed_precision(precision_of("fp32", "cuda", "fsdp")).param_dtype == F32  # fp32 means fp32 weights


def small_model() -> MMDiT:
    model = MMDiT(ModelConfig(depth=2, hidden_size=64, num_heads=4, text_dims=[8, 4], pooled_dim=7, in_channels=4,
                              latent_factor=8, max_res=128, max_res_orig=128))
    randomize_(model)
    return model


@pytest.mark.parametrize("text_dtype", [BF16, torch.float16])
def test_fp32_weights_take_half_precision_text(text_dtype):
    """train.precision=fp32 with bf16 encoders (their CUDA default): the features reach the projections in the
    weights' dtype; bf16 features differ from fp32 ones by their rounding only."""
    model = small_model()
    cond = random_condition(3)
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    ref = model(x, t, cond)
    rounded = cond.to("cpu", text_dtype).to("cpu", F32)
    got = model(x, t, cond.to("cpu", text_dtype))
    assert got.dtype == F32
    torch.testing.assert_close(got, model(x, t, rounded), rtol=1e-6, atol=1e-6)
    assert (got - ref).norm() < 4 * (4 * 2 + 2) * U * ref.norm()  # the inputs' rounding, through the chain


def test_bf16_weights_take_fp32_inputs():
    """What FSDP's bf16 policy does to the weights (inputs no longer cast by FSDP): x, text and pooled in fp32."""
    model = small_model()
    cond = random_condition(2)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    ref = model(x, t, cond)
    model.to(BF16)
    model.condition.time.time_scale.data = model.condition.time.time_scale.data.float()
    got = model(x, t, cond).float()
    assert 0 < (got - ref).norm() < (4 * 2 + 2) * U * ref.norm()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """2 gloo ranks train the same model on the same batches in four modes (tests/precision_ranks.py)."""
    from precision_ranks import rank_worker

    out = tmp_path_factory.mktemp("precision") / "results.pt"
    mp.spawn(rank_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp-fp32", "ddp-bf16", "fsdp-fp32", "fsdp-bf16"])
def test_time_and_rope_stay_fp32_under_every_policy(ranks, mode):
    """Hooks inside the forward: the timestep and time_scale are fp32 and the RoPE angles arrive as the model
    built them (fp64 tables) whatever the policy; weights are bf16 only under FSDP's bf16 policy, and
    precision=fp32 under FSDP gives fp32 weights. (With FSDP's default cast_forward_inputs=True, t and the
    angles arrived in bf16, and fp32 FSDP rounded the angles to fp32.)"""
    from precision_ranks import fresh_model

    precision = mode.split("-")[1]
    seen = ranks[mode]["dtypes"]
    angles = fresh_model().rope_angles(4, 4, torch.device("cpu")).dtype
    assert seen["t"] == seen["time_scale"] == ["torch.float32"], seen
    assert seen["rope"] == [str(angles)] and angles in (torch.float32, torch.float64), seen
    weights = "torch.bfloat16" if mode == "fsdp-bf16" else "torch.float32"
    assert seen["block_weights"] == [weights], seen
    assert seen["block_activations"] == ["torch.bfloat16" if precision == "bf16" else "torch.float32"], seen


@pytest.mark.slow
def test_bf16_ddp_and_fsdp_train_like_fp32_within_bf16_bounds(ranks):
    """3 SGD steps on 2 ranks: fp32 FSDP equals fp32 DDP; bf16 DDP (autocast) and bf16 FSDP (bf16 weights +
    autocast) stay within the bounds of the module docstring: the losses within (4 depth + 2) u, the
    updates within 2 (4 depth + 2) u of the fp32 update (measured: ~1.1 u; ~4.8 u when FSDP rounded t and the
    RoPE angles)."""
    from precision_ranks import model_config

    chain = 4 * model_config().depth + 2
    ref, init = ranks["ddp-fp32"], ranks["initial"]

    def flat(weights: dict) -> torch.Tensor:
        return torch.cat([w.flatten() for w in weights.values()])

    update = flat(ref["weights"]) - flat(init)
    for mode in ("fsdp-fp32", "ddp-bf16", "fsdp-bf16"):
        got = ranks[mode]
        rel_loss = [abs(a - b) / b for a, b in zip(got["losses"], ref["losses"])]
        rel_update = ((flat(got["weights"]) - flat(ref["weights"])).norm() / update.norm()).item()
        print(f"{mode}: loss {max(rel_loss) / U:.3f} u, update {rel_update / U:.3f} u")
        if mode == "fsdp-fp32":
            assert max(rel_loss) < 1e-6 and rel_update < 1e-5, (rel_loss, rel_update)
            continue
        assert max(rel_loss) < chain * U, (mode, rel_loss)
        assert 0 < rel_update < 2 * chain * U, (mode, rel_update)


@pytest.mark.slow
def test_fp32_training_with_bf16_encoders_trains_evaluates_and_samples(tiny_models, demo_data, tmp_path):
    """train.precision=fp32 beside encoders.dtype=bf16 (the encoders' CUDA default): the training step, the
    validation loss, the eval images and the validation samples all take the bf16 features (one process)."""
    from test_trainer import train_once

    run = tmp_path / "tiny_latent"
    train_once([
        f"encoders.text.0.name={tiny_models['gemma2']}", f"encoders.text.1.name={tiny_models['modernbert']}",
        f"encoders.text.2.name={tiny_models['clip']}", f"encoders.vae={tiny_models['vae']}",
        f"data.parquet_folder={demo_data['phase']}", f"data.bucket_indices_path={demo_data['index']}",
        "data.batch_size=4", f"train.save_dir={tmp_path}", "train.log_every=1", "train.total_steps=2",
        "encoders.dtype=bf16", "train.precision=fp32", "sample.num_steps=2",
        "train.validate_every=2", "train.validation_prompts=[a red circle]", "train.validation_size=[32,32]",
        f"eval.parquet_folder={demo_data['phase']}", f"eval.index={demo_data['index']}", "eval.loss_every=2",
        "eval.images_every=2", "eval.image_metrics=[shapes]", "eval.num_images=2", "eval.loss_samples=4",
        "eval.num_timesteps=2", "eval.batch_size=4", "eval.loss_weights=[ema]",
    ])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {k: v for r in rows for k, v in r.items()}
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r) and "loss" in logged
    assert any(k.startswith("val/") for k in logged) and any(k.startswith("eval/shapes/") for k in logged), logged
    assert (run / "validation" / "step_00000002.png").exists()
