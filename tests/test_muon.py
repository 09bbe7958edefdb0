"""Muon + AdamW (train.optimizer=muon): the parameter groups, the per-group schedules, the same update as
torch.optim.Muon alone, a state dict keyed by name that resumes exactly, and the FSDP refusal."""

import copy

import pytest
import torch

from mmdit.config import ConfigError, load_config
from mmdit.model import MMDiT
from mmdit.train.muon import MuonAdamW, split_parameters
from mmdit.train.optim import make_optimizer, make_scheduler


def tiny(overrides=()):
    """One block: Newton-Schulz runs in bf16, slow on CPUs without bf16 matmul units (~0.2 s a matrix here)."""
    cfg = load_config("tiny_latent", ["train.optimizer=muon", "model.depth=1", *overrides])
    torch.manual_seed(0)
    return cfg, MMDiT(cfg.model)


def test_every_parameter_in_exactly_one_group():
    cfg, model = tiny()
    groups = split_parameters(model, cfg.train.muon.params)
    names = {g: {n for n, _ in members} for g, members in groups.items()}
    assert sum(len(v) for v in names.values()) == len(list(model.parameters()))
    assert "blocks.0.image.qkv.weight" in names["muon"] and "blocks.0.text.adaLN.weight" in names["muon"]
    # embeddings, the final layer and the conditioning MLPs stay on AdamW (with decay), 1-D things without
    assert {"patch_embed.weight", "final.linear.weight", "condition.time.mlp.0.weight"} <= names["adamw_decay"]
    assert {"blocks.0.image.qkv.bias", "blocks.0.image.q_norm.weight", "condition.time.time_scale"} <= names[
        "adamw_no_decay"]
    assert all(p.dim() == 2 and n.startswith("blocks.") for n, p in groups["muon"])
    with pytest.raises(ValueError, match="matches no 2-D parameter"):
        split_parameters(model, ["nothing.*"])


def test_groups_follow_their_own_lr_and_schedule():
    cfg, model = tiny(["train.lr=1e-3", "train.warmup_steps=4", "train.muon.lr=0.02", "train.muon.warmup_steps=0",
                       "train.muon.lr_schedule=cosine", "train.total_steps=10", "train.lr_schedule=constant"])
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    lrs = {g["kind"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"adamw": pytest.approx(1e-3 / 4), "muon": pytest.approx(0.02)}
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = {g["kind"]: g["lr"] for g in opt.param_groups}
    assert lrs["adamw"] == pytest.approx(1e-3)
    assert lrs["muon"] == pytest.approx(0.02 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.5)).item()))
    assert opt.muon.param_groups[0]["lr"] == lrs["muon"]  # the container's groups are the optimizer's own


def step_once(model: torch.nn.Module, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_same_update_as_torch_muon_and_adamw_alone():
    cfg, model = tiny(["train.weight_decay=0.01"])
    reference = copy.deepcopy(model)
    opt = MuonAdamW(model, cfg.train)
    groups = split_parameters(reference, cfg.train.muon.params)
    muon = torch.optim.Muon([p for _, p in groups["muon"]], lr=cfg.train.lr, weight_decay=0.01, momentum=0.95,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [p for _, p in groups["adamw_decay"]], "weight_decay": 0.01},
                               {"params": [p for _, p in groups["adamw_no_decay"]], "weight_decay": 0.0}],
                              lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    for seed in range(2):
        step_once(model, opt, seed)
        g = torch.Generator().manual_seed(seed)
        for p in reference.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        muon.step()
        adamw.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_state_dict_by_name_resumes_exactly(tmp_path):
    cfg, model = tiny()
    opt = MuonAdamW(model, cfg.train)
    step_once(model, opt, 0)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert "blocks.0.image.qkv.weight" in state["muon"]["state"]
    assert "final.linear.weight" in state["adamw"]["state"]
    resumed_model = copy.deepcopy(model)
    resumed = MuonAdamW(resumed_model, cfg.train)
    resumed.load_state_dict(state)
    for seed in (1, 2):
        step_once(model, opt, seed)
        step_once(resumed_model, resumed, seed)
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name
    adamw_state = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="another train.optimizer"):
        resumed.load_state_dict(adamw_state)


def test_fsdp_is_refused_at_config_load():
    with pytest.raises(ConfigError, match="train.optimizer=muon with train.parallel=fsdp"):
        load_config("tiny_latent", ["train.optimizer=muon", "train.parallel=fsdp"])
    assert load_config("tiny_latent").train.optimizer == "adamw"  # off by default


def test_bf16_matrix_units_are_read_from_the_cpu_flags(tmp_path):
    from mmdit.train.muon import cpu_has_bf16_matmul

    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_vnni\n")
    assert not cpu_has_bf16_matmul(str(info))  # AVX-512 alone emulates bf16
    info.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_bf16_matmul(str(info))
    info.write_text("flags : fpu avx2 amx_tile amx_bf16\n")
    assert cpu_has_bf16_matmul(str(info))
    assert not cpu_has_bf16_matmul(str(tmp_path / "missing"))
