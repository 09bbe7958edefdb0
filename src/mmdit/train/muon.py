"""Muon for the blocks' weight matrices, AdamW for the rest, behind one optimizer (``train.optimizer=muon``).

Parameters are split by name (:func:`split_parameters`): a 2-D parameter matching ``train.muon.params`` goes
to ``torch.optim.Muon``; embeddings, norms, biases, scalars and the final layer go to AdamW (matrices with
``train.weight_decay``, the rest without); each parameter lands in exactly one group, checked. The
:class:`MuonAdamW` container is a ``torch.optim.Optimizer`` whose ``param_groups`` are the two optimizers' own
group dicts, so GradScaler, gradient clipping and one ``LambdaLR`` with a schedule per group (Muon's from
``train.muon.*``) work unchanged. Its state dict is keyed by parameter name, so a resume is exact and a
model whose parameters changed is refused by name. DDP only: Newton-Schulz needs the whole matrix, which a
DDP rank holds after the all-reduce (FSDP is refused at config load).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig

GROUPS = ("muon", "adamw_decay", "adamw_no_decay")


def split_parameters(model: nn.Module, patterns: list[str]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{group: [(name, parameter), ...]}`` for the trainable parameters; raises unless each lands in
    exactly one group and Muon gets at least one."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            groups["muon"].append((name, p))
        elif p.dim() >= 2:
            groups["adamw_decay"].append((name, p))
        else:
            groups["adamw_no_decay"].append((name, p))
    check_partition(model, groups)
    if not groups["muon"]:
        raise ValueError(f"train.muon.params={patterns} matches no 2-D parameter of the model; use name patterns "
                         "such as 'blocks.*'")
    return groups


def check_partition(model: nn.Module, groups: dict[str, list[tuple[str, nn.Parameter]]]) -> None:
    """Every trainable parameter in exactly one group (by identity and by name)."""
    placed: dict[int, list[str]] = {}
    for group, members in groups.items():
        for _, p in members:
            placed.setdefault(id(p), []).append(group)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if id(p) not in placed]
    twice = [n for n, p in trainable.items() if len(placed.get(id(p), [])) > 1]
    if missing or twice:
        raise ValueError(f"optimizer groups: parameters in no group {missing[:4]}, in several {twice[:4]}")


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` + ``torch.optim.AdamW`` stepping together; see the module docstring."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        groups = split_parameters(model, list(cfg.muon.params))
        self.names = {id(p): n for members in groups.values() for n, p in members}
        mc = cfg.muon
        fused = next(model.parameters()).is_cuda or None
        self.adamw = torch.optim.AdamW(
            [{"params": [p for _, p in groups["adamw_decay"]], "weight_decay": cfg.weight_decay, "kind": "adamw"},
             {"params": [p for _, p in groups["adamw_no_decay"]], "weight_decay": 0.0, "kind": "adamw"}],
            lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)
        self.muon = torch.optim.Muon(
            [{"params": [p for _, p in groups["muon"]], "kind": "muon"}],
            lr=mc.lr if mc.lr is not None else cfg.lr, momentum=mc.momentum, nesterov=mc.nesterov,
            weight_decay=mc.weight_decay if mc.weight_decay is not None else cfg.weight_decay,
            ns_steps=mc.ns_steps, adjust_lr_fn=mc.adjust_lr)
        # the base class sets up hooks and bookkeeping; the groups then are the two optimizers' own dicts
        super().__init__([p for members in groups.values() for _, p in members], {})
        self.param_groups = [*self.adamw.param_groups, *self.muon.param_groups]

    @property
    def parts(self) -> dict[str, torch.optim.Optimizer]:
        return {"adamw": self.adamw, "muon": self.muon}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """``{part: {"state": {param name: state}, "param_groups": [{..., "params": [names]}]}}``."""
        out = {}
        for key, opt in self.parts.items():
            order = [self.names[id(p)] for g in opt.param_groups for p in g["params"]]
            sd = opt.state_dict()
            groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
            out[key] = {"state": {order[int(i)]: s for i, s in sd["state"].items()}, "param_groups": groups}
        return out

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.parts):
            raise ValueError(f"optimizer state with parts {sorted(state)[:4]}, this run train.optimizer=muon needs "
                             f"{sorted(self.parts)}: the checkpoint was written with another train.optimizer; "
                             "resume with the recorded one (or start a new stage with train.init_from)")
        for key, opt in self.parts.items():
            order = [self.names[id(p)] for g in opt.param_groups for p in g["params"]]
            index = {n: i for i, n in enumerate(order)}
            saved = state[key]
            listed = [n for g in saved["param_groups"] for n in g["params"]]
            if listed != order:
                unknown = sorted(set(listed) ^ set(order))
                raise ValueError(f"optimizer {key}: the checkpoint's parameters differ from this model's "
                                 f"({unknown[:4]} ...; or another train.muon.params): restore the recorded model")
            groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
            opt.load_state_dict({"state": {index[n]: s for n, s in saved["state"].items()}, "param_groups": groups})
        self.param_groups = [*self.adamw.param_groups, *self.muon.param_groups]  # loading made new group dicts


def cpu_has_bf16_matmul(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX): torch's Newton-Schulz always
    runs in bf16, which CPUs without those units emulate ~19x slower than fp32 (BENCHMARKS.md, issue 24)."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:  # not Linux: say no, the safe answer for a CPU run
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})
