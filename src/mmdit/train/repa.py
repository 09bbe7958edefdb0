"""REPA (Yu et al. 2024): the image tokens after block ``train.repa.block`` go through a trainable projector
and are pulled towards a frozen teacher's patch features: loss = -mean over tokens of cos(projector(h), y),
added to the flow loss times ``train.repa.weight``.

The targets y arrive with the batch, already on the token grid (:mod:`mmdit.encoders.vision`: the teacher runs
on the loader ranks, into the precompute cache, or in a model rank's own data workers). The projector is the
trainer's, not the model's: it has its own AdamW (the ``train.*`` lr, betas, weight decay and schedule), its
gradients are averaged over the model ranks and clipped together with the model's
(:class:`~.parallel.ParallelModel`), it is saved as ``repa.pt`` in every checkpoint and never exported; it has
no EMA (nothing samples with it). With token routing the aligned block may see only the routed tokens: then
only those are aligned, against their own targets (:func:`aligned_targets`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, ConfigError, RepaConfig
from ..encoders.vision import teacher_dim
from ..model.routing import gather_tokens, route_span
from .optim import lr_factor, param_groups


class Projector(nn.Module):
    """REPA's 3-layer MLP: hidden -> projector_dim -> projector_dim -> teacher width, SiLU between."""

    def __init__(self, hidden: int, projector_dim: int, teacher_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                                 nn.SiLU(), nn.Linear(projector_dim, teacher_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):  # as the model's own linears (and REPA's SiT)
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.mlp(tokens.to(self.mlp[0].weight.dtype))  # FSDP's bf16 tokens meet fp32 weights

    def macs_per_token(self) -> int:
        return sum(m.weight.numel() for m in self.mlp if isinstance(m, nn.Linear))


def repa_loss(projected: Tensor, target: Tensor) -> Tensor:
    """Minus the mean cosine similarity over every token of every sample ([B, N, D] each), in fp32."""
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()


def repa_active(cfg: RepaConfig, micro: int, accumulation: int) -> bool:
    """Whether micro-step ``micro`` has the term: the micro-steps of the first ``until_step`` optimizer steps (all
    with 0). Loaders and model ranks both decide by it, so the teacher stops running when the term stops."""
    return cfg.enabled and (cfg.until_step == 0 or micro < cfg.until_step * accumulation)


def teacher_width(cfg: Config) -> int:
    """The width of the teacher's features, which the projector ends in: recorded in the cache's manifest with
    ``data.source=cache`` (the teacher need not exist where the cache is read), else from its config."""
    if cfg.data.source == "cache":
        from ..cache.format import read_manifest

        teacher = read_manifest(cfg.data.cache_dir).get("teacher")
        if teacher is None:
            raise ConfigError(f"train.repa.enabled=true but the cache in data.cache_dir={cfg.data.cache_dir!r} holds "
                              "no REPA targets; re-run python -m mmdit precompute with train.repa.enabled=true")
        return int(teacher["dim"])
    return teacher_dim(cfg.train.repa.encoder)


def aligned_targets(targets: Tensor, cfg: Config, route: Tensor | None) -> Tensor:
    """The targets of the tokens the aligned block computed: all of them, or with routing on and the block in
    the routed span, only the routed ones ``route`` [B, K] (in their order)."""
    if route is not None and cfg.train.repa.block in route_span(cfg.model):
        return gather_tokens(targets, route)
    return targets


class RepaHead:
    """The projector, its optimizer, and the window of logged REPA losses, on ``device``."""

    def __init__(self, cfg: Config, teacher_dim: int, device: torch.device):
        self.cfg, self.rc = cfg, cfg.train.repa
        self.projector = Projector(cfg.model.dim, self.rc.projector_dim, teacher_dim).to(device)
        tc = cfg.train
        self.optimizer = torch.optim.AdamW(param_groups(self.projector, tc.weight_decay), lr=tc.lr,
                                           betas=tuple(tc.betas), fused=device.type == "cuda" or None)
        self.window_sum, self.window_n = torch.zeros((), device=device), 0

    def active(self, micro: int) -> bool:
        return repa_active(self.rc, micro, self.cfg.train.accumulation_steps)

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """The REPA term of one micro-step (unweighted); recorded for the log."""
        if tokens.shape[:2] != targets.shape[:2]:
            raise RuntimeError(f"REPA: {tokens.shape[1]} image tokens after block {self.rc.block}, but the batch "
                               f"carries targets for {targets.shape[1]}: the teacher's grid is not the token grid")
        value = repa_loss(self.projector(tokens), targets)
        self.window_sum = self.window_sum + value.detach()
        self.window_n += 1
        return value

    def train_flops(self, tokens: int) -> float:
        """Forward + backward FLOPs of the projector over ``tokens`` tokens (counted as model FLOPs)."""
        return 3 * 2 * self.projector.macs_per_token() * tokens

    def set_lr(self, step: int) -> None:
        """The lr of optimizer step ``step`` (0-based): ``train.lr`` times the AdamW groups' schedule."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.train.lr * lr_factor(step, self.cfg.train)

    def report(self, group, num_ranks: int) -> dict[str, float]:
        """``repa_loss``: the mean of the window's REPA terms over every model rank (empty when it was off);
        every model rank calls it (a collective when there are several)."""
        if not self.window_n:
            return {}
        total = torch.stack([self.window_sum.float(), torch.full_like(self.window_sum, self.window_n)])
        if group is not None and num_ranks > 1:
            torch.distributed.all_reduce(total, group=group)
        self.window_sum, self.window_n = torch.zeros_like(self.window_sum), 0
        return {"repa_loss": float(total[0] / total[1])}

    def state_dict(self) -> dict:
        """``repa.pt`` of a checkpoint: the projector's weights and its optimizer state."""
        return {"projector": self.projector.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict, path) -> None:
        """Restore both; the config keeps its lr, betas and weight decay (as for the model's optimizer)."""
        try:
            self.projector.load_state_dict(state["projector"])
        except RuntimeError as err:
            raise RuntimeError(f"{path}/repa.pt holds a projector of other shapes (train.repa.projector_dim, the "
                               f"teacher's width or model.hidden_size changed): {str(err).splitlines()[0]}") from err
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": state["optimizer"]["state"], "param_groups": groups})
