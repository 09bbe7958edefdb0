"""Feature-distance and prompt-following metrics: Frechet distance, CMMD, CLIP score.

Pure functions of feature tensors (no network), in float64, tested against the reference implementations
on the same inputs. FD is the Frechet distance of Heusel et al. 2017 in any feature space (DINOv2 for
FD_DINOv2, Stein et al. 2023); CMMD is the MMD of Jayasumana et al. 2024 (google-research/cmmd); CLIP score
is torchmetrics' CLIPScore, max(mean(100 cos(image, text)), 0).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

CMMD_SIGMA = 10.0  # the Gaussian kernel's bandwidth in google-research/cmmd
CMMD_SCALE = 1000.0  # its display scale


@dataclass
class FeatureStats:
    """Mean [D] and covariance [D, D] (float64, unbiased) of n feature vectors."""

    mean: Tensor
    cov: Tensor
    n: int

    @classmethod
    def of(cls, features: Tensor) -> FeatureStats:
        f = features.double()
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"need features [N >= 2, D], got {list(f.shape)}; evaluate more images (eval.num_images)")
        return cls(f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1]), int(f.shape[0]))

    def save(self, path: str | Path, meta: dict[str, str]) -> None:
        """safetensors (no pickle), written to a temporary name and renamed."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"mean": self.mean.contiguous(), "cov": self.cov.contiguous()}, str(tmp),
                  metadata={**meta, "n": str(self.n)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> tuple[FeatureStats, dict[str, str]]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            stats = cls(f.get_tensor("mean"), f.get_tensor("cov"), int(meta.get("n", 0)))
        return stats, meta


def _sqrt_psd(m: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2).

    tr((S_a S_b)^1/2) is the sum of the square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, a symmetric
    PSD matrix, which is stabler than a general matrix square root (no complex parts to drop).
    """
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature widths differ: {a.mean.shape[0]} vs {b.mean.shape[0]}; use one extractor")
    root = _sqrt_psd(a.cov.double())
    inner = root @ b.cov.double() @ root
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = a.mean.double() - b.mean.double()
    return float(diff @ diff + a.cov.trace() + b.cov.trace() - 2 * tr_sqrt)


def rank_warning(n: int, dim: int) -> str | None:
    """The warning for FD on fewer images than feature dimensions (a rank-deficient covariance), or None."""
    if n >= dim:
        return None
    return (f"FD on {n} images with {dim}-d features: the covariance is rank-deficient and the value carries an "
            f"N-dependent bias; compare only at equal N, or raise eval.num_images to >= {dim} (BENCHMARKS.md)")


def clip_score(image_embeds: Tensor, text_embeds: Tensor) -> float:
    """max(mean over pairs of 100 cos(image_i, text_i), 0): torchmetrics' CLIPScore (the mean is clamped)."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"{image_embeds.shape[0]} images but {text_embeds.shape[0]} prompts (or widths differ)")
    cos = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return max(float((100 * cos).mean()), 0.0)


def cmmd(x: Tensor, y: Tensor, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """CMMD of Jayasumana et al. 2024 between embedding sets x [N, D] and y [M, D], as google-research/cmmd.

    Each embedding is L2-normalised (the reference normalises CLIP image embeddings), then
    scale x (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)) with k(a, b) = exp(-|a - b|^2 / (2 sigma^2)):
    the reference's minimum-variance estimator, whose means include the diagonal (k = 1) terms.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need embeddings [N, D] and [M, D], got {list(x.shape)} and {list(y.shape)}")
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    y = torch.nn.functional.normalize(y.double(), dim=-1)
    gamma = 1.0 / (2 * sigma**2)

    def mean_kernel(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-gamma * torch.cdist(a, b).square()).mean()

    return float(scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y)))
