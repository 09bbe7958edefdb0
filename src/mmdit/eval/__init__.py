"""Held-out evaluation: validation loss at fixed timesteps, FD_DINOv2, CMMD, CLIP score, and the time to a
target validation loss (DESIGN.md, "Evaluation").

``Evaluator`` runs them inside the training loop on all model ranks; ``python -m mmdit evaluate`` runs them
on any checkpoint and plots a run's metrics against steps.
"""

from .metrics import FeatureStats, clip_score, cmmd, frechet_distance

__all__ = ["FeatureStats", "clip_score", "cmmd", "frechet_distance"]
