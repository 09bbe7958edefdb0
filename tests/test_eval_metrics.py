"""FD and CLIP score against exact answers, and the feature extractors loaded offline by the real code."""

from __future__ import annotations

import pytest
import torch

from mmdit.eval.metrics import FeatureStats, clip_score, frechet_distance


def test_fd_closed_form_and_self_distance():
    # two Gaussians with diagonal covariances: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a = FeatureStats(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.diag(torch.tensor([4.0, 1.0])).double(), 10)
    b = FeatureStats(torch.tensor([3.0, 1.0], dtype=torch.float64), torch.diag(torch.tensor([1.0, 9.0])).double(), 10)
    assert frechet_distance(a, b) == pytest.approx(9 + (2 - 1) ** 2 + (1 - 3) ** 2, abs=1e-9)
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) @ torch.randn(
        16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = FeatureStats.of(feats)
    assert abs(frechet_distance(s, s)) < 1e-8
    noisy = [frechet_distance(s, FeatureStats.of(feats + sigma * torch.randn(
        feats.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64))) for sigma in (0.1, 1.0, 3.0)]
    assert 0 < noisy[0] < noisy[1] < noisy[2]
    with pytest.raises(ValueError, match="N >= 2"):
        FeatureStats.of(feats[:1])


def test_stats_round_trip(tmp_path):
    s = FeatureStats.of(torch.randn(20, 3, dtype=torch.float64))
    s.save(tmp_path / "s.safetensors", {"extractor": "x"})
    back, meta = FeatureStats.load(tmp_path / "s.safetensors")
    assert torch.equal(back.mean, s.mean) and torch.equal(back.cov, s.cov) and back.n == 20
    assert meta["extractor"] == "x"


def test_clip_score_definition():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    txt = torch.tensor([[3.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    assert clip_score(img, txt) == pytest.approx((100 + 0 + 100 / 2**0.5) / 3)  # negative cosines count as 0


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    from mmdit.eval.tiny_extractors import build_tiny_extractors

    return build_tiny_extractors(tmp_path_factory.mktemp("extractors"))


def test_extractors_load_offline_through_the_real_code(extractors, tiny_models):
    from mmdit.encoders import EncoderNotFoundError
    from mmdit.eval.features import ClipFeatures, DinoFeatures, ExtractorError

    dino, clip = DinoFeatures(extractors["dino"], "cpu"), ClipFeatures(extractors["clip"], "cpu")
    images = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f = dino(images)
    assert f.shape == (3, 32) and f.dtype == torch.float64 and torch.allclose(f[:1], dino(images[:1]), atol=1e-5)
    assert clip.images(images).shape == (3, 16) and clip.texts(["a red circle", "a", "b c"]).shape == (3, 16)
    with pytest.raises(ExtractorError, match="not DINOv2"):
        DinoFeatures(extractors["clip"], "cpu")
    with pytest.raises(ExtractorError, match="full CLIP"):
        ClipFeatures(tiny_models["clip"], "cpu")  # a text-only CLIP: the encoders' one
    with pytest.raises(EncoderNotFoundError, match="does not exist"):
        DinoFeatures("./no/such/dinov2", "cpu")


def _constructed_clip():
    """A tiny CLIP whose weights make colour words and solid-colour images align, so the direction must hold.

    Attention is uniform (q, k = 0) with v and out-projections the identity, MLPs off (fc2 = 0): the pooled
    token of each tower becomes the mean of the (normalised) inputs. Images: mean 0 / std 1 normalisation and a
    patch embedding that reads the mean of channel c into feature c; text: the word "red"/"green"/"blue" embeds
    as feature 0/1/2, every other token as 0. Both towers end in LayerNorm(e_c) for colour c.
    """
    from transformers import CLIPModel

    from mmdit.eval.tiny_extractors import PATCH, tiny_clip_config, tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    hidden = 8
    model = CLIPModel(tiny_clip_config(tok, hidden=hidden, projection=hidden)).eval()
    eye = torch.eye(hidden)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name or "layrnorm" in name:  # HF spells pre_layrnorm
                if name.endswith("weight"):
                    p.fill_(1.0)
            elif name.endswith(("v_proj.weight", "out_proj.weight", "text_projection.weight",
                                "visual_projection.weight")):
                p.copy_(eye)
        conv = model.vision_model.embeddings.patch_embedding.weight  # [hidden, 3, 14, 14]
        for c in range(3):
            conv[c, c] = 1.0 / PATCH**2
        emb = model.text_model.embeddings.token_embedding.weight
        for c, word in enumerate(["red", "green", "blue"]):
            emb[tok.convert_tokens_to_ids(word), c] = 1.0
    return model


def test_clip_score_higher_for_matching_prompts(tmp_path):
    import json

    from mmdit.eval.features import ClipFeatures
    from mmdit.eval.tiny_extractors import build_tiny_clip

    folder = build_tiny_clip(tmp_path / "clip", model=_constructed_clip())
    cfg_file = tmp_path / "clip" / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    cfg_file.write_text(json.dumps(cfg))
    clip = ClipFeatures(folder, "cpu")
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)
    images = colours[:, :, None, None].expand(3, 3, 32, 48).contiguous()
    prompts = ["a red circle", "a green square", "a blue star"]
    matching = clip_score(clip.images(images), clip.texts(prompts))
    shuffled = clip_score(clip.images(images), clip.texts(prompts[1:] + prompts[:1]))
    assert matching == pytest.approx(100.0, abs=1e-3) and shuffled == pytest.approx(0.0, abs=1e-3)
