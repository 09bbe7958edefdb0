"""train.parallel=fsdp with real ranks (torchrun + gloo, fp32): FSDP2 trains like DDP on the same batches,
sharded checkpoints resume bit-exactly, a run switches between DDP and FSDP at a resume, and a damaged
sharded checkpoint is never resumed from.

The runs are shared between the assertions (one fixture, seven short launches, ~1 min on 2 cores).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_distributed import LOADER, base_overrides, run_ok, sample_log, summaries

from mmdit.config import read_config
from mmdit.model import MMDiT
from mmdit.train.checkpoint import MARKER, is_complete, latest_checkpoint, resolve_resume
from mmdit.train.sharded_checkpoint import SHARDED_DIR, consolidated_weights, is_sharded

pytestmark = pytest.mark.slow
FSDP = "train.parallel=fsdp"
RESUME = "train.resume=auto"


def weights(step_dir: Path, which: str) -> dict[str, torch.Tensor]:
    """Full weights of either kind of checkpoint."""
    if is_sharded(step_dir):
        return consolidated_weights(step_dir, which, MMDiT(read_config(step_dir / "config.yaml").model))
    return load_file(step_dir / f"{which}.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tiny_models, demo_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp-runs")

    def args(name: str, steps: int, *extra: str, **values) -> list[str]:
        return [*base_overrides(tiny_models, demo_data, root / name, steps, **values), *extra]

    run_ok(2, args("ddp", 4))
    # with a loader rank: it stays outside the model ranks' mesh; a save every step checks keep_last (2)
    run_ok(3, args("fsdp", 4, FSDP, LOADER, **{"train.save_every": 1}))
    run_ok(2, args("fsdp_half", 2, FSDP))
    run_ok(2, args("ddp_half", 2))
    run_ok(2, args("fsdp_bf16", 4, FSDP, **{"train.precision": "bf16"}))  # bf16 weights gathered, autocast
    for name, source in (("fsdp_fsdp", "fsdp_half"), ("fsdp_ddp", "fsdp_half"), ("ddp_fsdp", "ddp_half")):
        shutil.copytree(root / source, root / name)
    run_ok(2, args("fsdp_fsdp", 4, FSDP, RESUME))
    run_ok(2, args("fsdp_ddp", 4, RESUME))
    run_ok(2, args("ddp_fsdp", 4, FSDP, RESUME))
    return {p.name: p / "tiny_latent" for p in root.iterdir()}


def test_fsdp_trains_like_ddp(runs):
    ddp, fsdp = latest_checkpoint(runs["ddp"]), latest_checkpoint(runs["fsdp"])
    assert ddp.name == fsdp.name == "step_00000004"
    assert not is_sharded(ddp) and is_sharded(fsdp)
    # every model rank wrote its shard; the manifest lists them all
    manifest = json.loads((fsdp / MARKER).read_text())
    assert {f"{SHARDED_DIR}/__0_0.distcp", f"{SHARDED_DIR}/__1_0.distcp", f"{SHARDED_DIR}/.metadata"} <= set(
        manifest["files"])
    for which in ("model", "ema"):
        assert max_diff(weights(ddp, which), weights(fsdp, which)) < 1e-5, which
    # the same batches, the same losses
    loss = {k: [json.loads(x)["loss"] for x in (runs[k] / "metrics.jsonl").read_text().splitlines()]
            for k in ("ddp", "fsdp")}
    assert loss["ddp"] == pytest.approx(loss["fsdp"], rel=1e-5)
    assert [r["ids"] for r in sample_log(runs["ddp"], 0)] == [r["ids"] for r in sample_log(runs["fsdp"], 1)]
    # the digest of the gathered weights is the same on both model ranks
    s = summaries(runs["fsdp"])
    assert s[1]["weights_sha256"] == s[2]["weights_sha256"]
    # keep_last=2 applies to sharded checkpoints
    assert sorted(p.name for p in runs["fsdp"].glob("step_*")) == ["step_00000003", "step_00000004"]


def test_sharded_resume_is_bit_exact(runs):
    straight, resumed = latest_checkpoint(runs["fsdp"]), latest_checkpoint(runs["fsdp_fsdp"])
    assert resumed.name == "step_00000004" and is_sharded(resumed)
    for which in ("model", "ema"):
        a, b = weights(straight, which), weights(resumed, which)
        assert all(torch.equal(a[k], b[k]) for k in a), which


@pytest.mark.parametrize("name, sharded, reference", [("fsdp_ddp", False, "ddp"), ("ddp_fsdp", True, "fsdp")])
def test_resume_switches_between_ddp_and_fsdp(runs, name, sharded, reference):
    """A checkpoint of one kind resumes under the other, and the run goes on as the other kind trains."""
    step = latest_checkpoint(runs[name])
    assert step.name == "step_00000004" and is_sharded(step) == sharded
    assert is_sharded(runs[name] / "step_00000002") != sharded  # it started from the other kind
    for which in ("model", "ema"):
        assert max_diff(weights(step, which), weights(latest_checkpoint(runs[reference]), which)) < 1e-5, which


def test_damaged_sharded_checkpoint_is_never_resumed(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["fsdp"], run)
    newest, older = run / "step_00000004", run / "step_00000003"
    assert resolve_resume(run, "auto") == newest
    shard = newest / SHARDED_DIR / "__1_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated: a write that never finished
    assert not is_complete(newest)
    assert resolve_resume(run, "auto") == older
    shard.unlink()  # one rank's shard missing
    assert resolve_resume(run, "auto") == older
    (older / SHARDED_DIR / ".metadata").unlink()  # DCP never finished: no metadata
    assert resolve_resume(run, "auto") is None


def test_fsdp_needs_a_process_group():
    from mmdit.config import ConfigError
    from mmdit.train.parallel import check_parallel

    check_parallel("ddp", distributed=False)
    with pytest.raises(ConfigError, match="train.parallel=fsdp needs a torchrun job"):
        check_parallel("fsdp", distributed=False)


def test_bf16_fsdp_trains_like_fp32_ddp_within_bf16_bounds(runs):
    """The trainer with train.precision=bf16 under FSDP (units gathered in bf16, autocast, fp32 reduction and
    master weights) on the batches of the fp32 DDP run: the first loss is the same (the zero-initialised output
    layer predicts 0 in any precision), the next ones within (4 depth + 2) u of fp32 (bf16's unit roundoff
    u = 2^-8 through the chain of bf16 matmuls, tests/test_precision.py)."""
    cfg = read_config(latest_checkpoint(runs["fsdp_bf16"]) / "config.yaml")
    assert cfg.train.precision == "bf16" and cfg.train.parallel == "fsdp"
    loss = {k: [json.loads(x)["loss"] for x in (runs[k] / "metrics.jsonl").read_text().splitlines()]
            for k in ("ddp", "fsdp_bf16")}
    rel = [abs(a - b) / b for a, b in zip(loss["fsdp_bf16"], loss["ddp"], strict=True)]
    print("bf16 FSDP vs fp32 DDP, relative loss difference in u:", [f"{r / 2**-8:.3f}" for r in rel])
    assert rel[0] < 1e-6 and 0 < max(rel) < (4 * cfg.model.depth + 2) * 2**-8, rel
