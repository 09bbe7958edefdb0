"""FD, CMMD and CLIP score against exact answers and the reference implementations (torchmetrics, scipy's
pytorch-fid formula, google-research/cmmd), and the feature extractors loaded offline by the real code."""

from __future__ import annotations

import pytest
import torch

from mmdit.eval.metrics import FeatureStats, clip_score, cmmd, frechet_distance, rank_warning


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


def test_clip_score_clamps_the_mean_not_each_pair():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    txt = torch.tensor([[3.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    assert clip_score(img, txt) == pytest.approx((100 - 100 + 100 / 2**0.5) / 3)  # a negative cosine counts
    assert clip_score(img[1:2], txt[1:2]) == 0.0  # the mean is clamped at 0


def _pytorch_fid_reference(a: torch.Tensor, b: torch.Tensor) -> float:
    """pytorch-fid's / dgm-eval's formula: np.cov, scipy.linalg.sqrtm of the product, real part of the trace."""
    import numpy as np
    from scipy import linalg

    mu1, mu2 = a.numpy().mean(0), b.numpy().mean(0)
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("n", [300, 1000])
def test_fd_equals_the_reference_formula_on_fixed_features(n):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    b = 0.8 * torch.randn(n, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g,
                                                                                dtype=torch.float64) + 0.3
    ours = frechet_distance(FeatureStats.of(a), FeatureStats.of(b))
    assert ours == pytest.approx(_pytorch_fid_reference(a, b), rel=1e-4)


def test_fd_warns_below_the_feature_width():
    assert rank_warning(256, 1024) is not None and "256 images" in rank_warning(256, 1024)
    assert rank_warning(2048, 1024) is None


def _cmmd_reference(x, y, sigma=10, scale=1000):
    """google-research/cmmd's distance.mmd transcribed to numpy, on embeddings normalised as its embedding.py."""
    import numpy as np

    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    xx, yy = np.diag(x @ x.T), np.diag(y @ y.T)
    gamma = 1 / (2 * sigma**2)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + xx[:, None] + xx[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + xx[:, None] + yy[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + yy[:, None] + yy[None, :])))
    return scale * (k_xx + k_yy - 2 * k_xy)


def test_cmmd_exact_answers_and_reference():
    import math

    # one point each, orthogonal unit vectors (any length: they are normalised): |x - y|^2 = 2
    x, y = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    assert cmmd(x, y) == pytest.approx(1000 * (2 - 2 * math.exp(-2 / 200)), rel=1e-12)
    assert cmmd(x, x) == 0.0
    # two and one: k_xx mean = (1 + 1 + 2 exp(-2/200)) / 4, k_xy = exp(-1/200) (cos 60 degrees)
    x2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y1 = torch.tensor([[1.0, 1.0]])
    k_xx, k_xy = (2 + 2 * math.exp(-0.01)) / 4, math.exp(-(2 - 2 ** 0.5) / 200)
    assert cmmd(x2, y1) == pytest.approx(1000 * (k_xx + 1 - 2 * k_xy), rel=1e-12)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 16, generator=g) + 1, torch.randn(30, 16, generator=g) + 1.2
    assert cmmd(a, b) == pytest.approx(_cmmd_reference(a.double().numpy(), b.double().numpy()), rel=1e-9)
    with pytest.raises(ValueError, match="embeddings"):
        cmmd(a, b[:, :8])


def test_real_feature_cache_is_keyed_by_everything_that_changes_features(tmp_path):
    import numpy as np

    from mmdit.eval.evaluator import real_cache_file

    recipe = {"extractor": "facebook/dinov2-large", "revision": "abc", "dtype": "float32", "device": "cuda",
              "resize": "pil_bicubic_224x224", "normalize": "[]"}
    ids = np.arange(8)
    base, meta = real_cache_file(tmp_path, "fd", recipe, ids, b"index")
    assert meta["n"] == "8" and meta["dtype"] == "float32" and base.parent == tmp_path / "eval_stats"
    changed = [real_cache_file(tmp_path, "fd", {**recipe, k: "other"}, ids, b"index")[0] for k in recipe]
    changed += [real_cache_file(tmp_path, "fd", recipe, ids[:4], b"index")[0],
                real_cache_file(tmp_path, "fd", recipe, ids + 1, b"index")[0],
                real_cache_file(tmp_path, "fd", recipe, ids, b"another index")[0],
                real_cache_file(tmp_path, "cmmd", recipe, ids, b"index")[0]]
    assert len({base, *changed}) == len(changed) + 1


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
    assert dino.model.dtype == torch.float32 and clip.model.dtype == torch.float32  # fp32 features always
    assert dino.recipe()["resize"] == "pil_bicubic_28x28" and dino.recipe()["revision"].startswith("local-")
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


def _dgm_eval_preprocess(images: torch.Tensor, side: int) -> torch.Tensor:
    """dgm-eval's DINOv2 transform: PIL image, Resize((side, side), BICUBIC) (PIL's resize), ToTensor, ImageNet
    Normalize (transcribed without torchvision)."""
    import numpy as np
    from PIL import Image

    from mmdit.eval.tiny_extractors import IMAGENET_MEAN, IMAGENET_STD

    out = []
    for im in images:
        pil = Image.fromarray(im.permute(1, 2, 0).numpy(), "RGB").resize((side, side), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float().div(255)
        out.append((x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])
    return torch.stack(out)


def test_dino_features_follow_dgm_eval(extractors):
    from transformers import AutoModel

    from mmdit.eval.features import DinoFeatures

    images = torch.randint(0, 256, (4, 3, 45, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    model = AutoModel.from_pretrained(extractors["dino"]).eval()
    with torch.no_grad():
        reference = model(pixel_values=_dgm_eval_preprocess(images, 28)).pooler_output.double()
    assert torch.allclose(DinoFeatures(extractors["dino"], "cpu")(images), reference, rtol=1e-5, atol=1e-6)


LONG = ("a red circle on the left of a blue square above a green triangle beside a yellow star " * 6).strip()


def test_clip_score_equals_torchmetrics(extractors):
    """Ours = torchmetrics.functional.multimodal.clip_score on the same CLIP, images of odd sizes, and captions
    longer than CLIP's 77 tokens (torchmetrics slices input_ids, dropping the EOS)."""
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score
    from transformers import CLIPModel, CLIPProcessor

    from mmdit.eval.features import ClipFeatures

    folder = extractors["clip"]
    clip = ClipFeatures(folder, "cpu")
    captions = [LONG, "a red circle", "a blue square on the right", LONG + " and a purple moon", "a green star",
                "two small yellow triangles"]
    assert len(clip.processor.tokenizer(captions[0])["input_ids"]) > 77
    images = torch.randint(0, 256, (len(captions), 3, 40, 56), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    image_embeds, text_embeds = clip.images(images), clip.texts(captions)
    per_pair = torch.nn.functional.cosine_similarity(image_embeds, text_embeds)
    ours = clip_score(image_embeds, text_embeds)

    class TensorFeatures(CLIPModel):
        """transformers 5 returns a ModelOutput (pooler_output = the projected embedding) from get_*_features,
        torchmetrics 1.9 expects that tensor: this returns it, nothing else changes."""

        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    def reference(rows):
        with torch.no_grad():
            return float(tm_clip_score([images[i] for i in rows], [captions[i] for i in rows],
                                       model_name_or_path=lambda: (TensorFeatures.from_pretrained(folder).eval(),
                                                                   CLIPProcessor.from_pretrained(folder))))

    assert ours == pytest.approx(reference(range(len(captions))), rel=1e-4)
    assert ours > 0 and (per_pair < 0).any()  # the clamp of the mean and per-pair clamps differ here
    for rows in ([0, 3], [0], [3]):  # the long captions alone, where the truncation decides
        alone = clip_score(image_embeds[rows], clip.texts([captions[i] for i in rows]))
        assert alone == pytest.approx(reference(rows), rel=1e-4, abs=1e-9)
