"""Text encoders and image codecs: tiny random models load offline through the real code path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmdit.conditioning import TextCondition
from mmdit.config import EncodersConfig, TextEncoderConfig
from mmdit.encoders import (
    EncoderNotFoundError,
    PixelCodec,
    TextEncoders,
    VAECodec,
    make_codec,
    package_model_dir,
    tiny_encoders_config,
    tiny_model_dims,
    to_pil,
    to_uint8,
)
from mmdit.encoders import tiny as tiny_mod

CAPTIONS = [
    "a red circle in the top left",
    "an image with a purple heart and a small green star on a striped blue background, "
    "three large squares, one yellow, one cyan, and many more words than fit",
]


def _go_offline(mp: pytest.MonkeyPatch) -> None:
    """No hub: huggingface_hub reads HF_HUB_OFFLINE once at import, so patch its constant too."""
    from huggingface_hub import constants

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    _go_offline(monkeypatch)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp)
        return tiny_mod.ensure_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def text_encoders(tiny_dirs) -> TextEncoders:
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp)
        return TextEncoders.from_config(tiny_encoders_config(tiny_dirs, max_length=16), "cpu")


def test_tiny_models_are_the_real_classes(tiny_dirs):
    archs = {n: json.loads((Path(tiny_dirs[n]) / "config.json").read_text()) for n in tiny_dirs}
    assert archs["gemma2"]["architectures"] == ["Gemma2Model"]
    assert archs["modernbert"]["architectures"] == ["ModernBertModel"]
    assert archs["clip"]["architectures"] == ["CLIPTextModelWithProjection"]
    assert archs["vae"]["_class_name"] == "AutoencoderKL"
    assert archs["vae"]["latent_channels"] == 16
    for n in ("gemma2", "modernbert", "clip"):
        assert (Path(tiny_dirs[n]) / "tokenizer.json").exists()


def test_text_encoders_shapes_and_masks(text_encoders, tiny_dirs):
    te = text_encoders
    dims = tiny_model_dims()
    assert te.text_dims == dims["text_dims"] and te.pooled_dim == dims["pooled_dim"]
    for enc in te.encoders:
        assert not enc.model.training
        assert not any(p.requires_grad for p in enc.model.parameters())
    cond = te.encode(CAPTIONS)
    assert isinstance(cond, TextCondition)
    assert [t.shape for t in cond.tokens] == [(2, 16, 48), (2, 16, 32)]
    assert cond.pooled is not None and cond.pooled.shape == (2, 24)
    for enc, tok, mask in zip(te.sequence, cond.tokens, cond.masks):
        assert mask.dtype == torch.bool and mask.shape == tok.shape[:2]
        ref = enc.tokenizer(CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        assert torch.equal(mask, ref["attention_mask"].bool())
        # the short caption is padded (on the right), the long one truncated to the full length
        n_real = int(mask[0].sum())
        assert 2 < n_real < 16 and mask[0, :n_real].all() and not mask[0, n_real:].any()
        assert bool(mask[1].all())
        assert (ref["input_ids"][0, n_real:] == enc.tokenizer.pad_token_id).all()
        assert torch.isfinite(tok).all()
    # encoding is deterministic and batch-independent for the real tokens
    one = te.encode(CAPTIONS[:1])
    n_real = int(one.masks[0][0].sum())
    torch.testing.assert_close(one.tokens[0][0, :n_real], cond.tokens[0][0, :n_real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.pooled[0], cond.pooled[0], atol=1e-5, rtol=1e-5)
    # outputs are plain tensors that a trainable layer can consume (not inference-mode tensors)
    lin = torch.nn.Linear(48, 4)
    lin(cond.tokens[0]).sum().backward()


def test_clip_pooled_is_projected_eos_state(text_encoders):
    enc = text_encoders.pooled
    assert type(enc.model).__name__ == "CLIPTextModelWithProjection"
    batch = enc.tokenize(CAPTIONS)
    eos = enc.tokenizer.eos_token_id
    assert eos == enc.model.config.eos_token_id != 2
    # truncation keeps the end token, so every caption has an eos to pool at
    assert ((batch["input_ids"] == eos).any(1)).all()
    with torch.no_grad():
        out = enc.model(**batch, output_hidden_states=False)
        first_eos = (batch["input_ids"] == eos).int().argmax(1)
        h = out.last_hidden_state[torch.arange(2), first_eos]
        ref = enc.model.text_projection(h)
    torch.testing.assert_close(text_encoders.encode(CAPTIONS).pooled, ref)


def test_offload_and_move(text_encoders):
    te = text_encoders.offload()
    assert te.device.type == "cpu"
    assert all(next(e.model.parameters()).device.type == "cpu" for e in te.encoders)
    te.to("cpu")
    assert te.encode(CAPTIONS[:1]).tokens[0].device.type == "cpu"


def test_vae_codec_scale_shift_and_roundtrip(tiny_dirs):
    cfg = tiny_encoders_config(tiny_dirs)
    codec = make_codec(cfg, "cpu")
    assert isinstance(codec, VAECodec)
    assert codec.latent_channels == 16 and codec.latent_factor == 8
    assert codec.shift_factor == pytest.approx(0.0609) and codec.scaling_factor == pytest.approx(1.5305)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8, generator=g)
    lat = codec.encode(images, sample=False)
    assert lat.shape == (2, 16, 4, 6) and codec.latent_shape(32, 48) == (16, 4, 6)
    with torch.no_grad():
        mean = codec.vae.encode(images.float() / 127.5 - 1).latent_dist.mean
    torch.testing.assert_close(lat, (mean - 0.0609) * 1.5305)
    # float input in [-1, 1] gives the same latents
    torch.testing.assert_close(codec.encode(images.float() / 127.5 - 1, sample=False), lat)
    # decode inverts the normalisation exactly before the VAE decoder
    with torch.no_grad():
        ref = codec.vae.decode(mean).sample.clamp(-1, 1)
    dec = codec.decode(lat)
    assert dec.shape == (2, 3, 32, 48) and dec.dtype == torch.float32
    torch.testing.assert_close(dec, ref, atol=1e-5, rtol=1e-5)
    # sampling uses the generator: reproducible, and different from the mean
    s1 = codec.encode(images, generator=torch.Generator().manual_seed(1))
    s2 = codec.encode(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.allclose(s1, lat)
    assert to_uint8(dec).dtype == torch.uint8
    pil = to_pil(dec)
    assert len(pil) == 2 and pil[0].size == (48, 32)


def test_pixel_codec_exact():
    codec = make_codec(EncodersConfig(vae=""), "cpu")
    assert isinstance(codec, PixelCodec)
    assert codec.latent_channels == 3 and codec.latent_factor == 1
    images = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 1, 1)[..., :256].reshape(2, 3, 16, 16)
    x = codec.encode(images)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(codec.decode(x)), images)


def test_minilm_package_loads():
    folder = package_model_dir()
    assert (folder / "model.safetensors").exists()
    cfg = EncodersConfig(text=[TextEncoderConfig(name="minilm", max_length=24)])
    te = TextEncoders.from_config(cfg, "cpu")
    assert te.text_dims == [384] and te.pooled_dim == 0
    cond = te.encode(["a red circle", "a blue square on the left"])
    assert cond.tokens[0].shape == (2, 24, 384) and cond.pooled is None
    assert cond.masks[0].sum(1).tolist() == [5, 8]  # [CLS] ... [SEP]


def test_sequence_and_pooled_entries_of_one_encoder_share_model_and_forward():
    """The demos' MiniLM as a sequence and a pooled entry: one model in memory, one forward per batch, the same
    outputs as two separately loaded encoders."""
    entries = [TextEncoderConfig(name="minilm", kind="sequence", max_length=24),
               TextEncoderConfig(name="minilm", kind="pooled", max_length=24)]
    shared = TextEncoders.from_config(EncodersConfig(text=entries), "cpu")
    assert shared.sequence[0].model is shared.pooled.model
    apart = [TextEncoders.from_config(EncodersConfig(text=[e]), "cpu") for e in entries]
    calls = []
    shared.pooled.model.register_forward_hook(lambda *_: calls.append(1))
    captions = ["a red circle", "an emoji of evergreen tree; plant other, animals & nature"]
    cond = shared.encode(captions)
    assert len(calls) == 1
    assert torch.equal(cond.tokens[0], apart[0].encode(captions).tokens[0])
    assert torch.equal(cond.masks[0], apart[0].encode(captions).masks[0])
    assert torch.allclose(cond.pooled, apart[1].encode(captions).pooled, atol=1e-6)


@pytest.mark.parametrize("name", ["nonexistent-org/nonexistent-encoder", "/no/such/folder"])
def test_missing_text_encoder_clear_error(name):
    cfg = EncodersConfig(text=[TextEncoderConfig(name=name)])
    with pytest.raises(EncoderNotFoundError) as info:
        TextEncoders.from_config(cfg, "cpu")
    msg = str(info.value)
    assert "text encoder 0" in msg and name in msg and "python -m mmdit tiny-models" in msg


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_missing_vae_clear_error():
    with pytest.raises(EncoderNotFoundError, match="tiny-models"):
        make_codec(EncodersConfig(vae="nonexistent-org/nonexistent-vae", vae_subfolder="vae"), "cpu")


def test_tiny_builder_cached_and_deterministic(tiny_dirs, tmp_path, capsys):
    again = tiny_mod.ensure_tiny_models(Path(tiny_dirs["vae"]).parent.parent)
    assert again == tiny_dirs  # reused, not rebuilt
    # the tokenizers are deterministic for a seed (weights are seeded with torch.manual_seed)
    corpus = tiny_mod.caption_corpus(50, seed=0)
    assert corpus == tiny_mod.caption_corpus(50, seed=0)
    a = tiny_mod._train_tokenizer(corpus, "clip")
    b = tiny_mod._train_tokenizer(corpus, "clip")
    assert a.get_vocab() == b.get_vocab()
    # the CLI builds into a folder and prints the paths
    assert tiny_mod.main(["tiny-models", str(tmp_path / "cli"), "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cli" / "gemma2") in out and "model.text_dims" in out
    from safetensors.torch import load_file

    w1 = load_file(Path(tiny_dirs["gemma2"]) / "model.safetensors")
    w2 = load_file(tmp_path / "cli" / "gemma2" / "model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    for name in ("gemma2", "modernbert", "clip"):
        a = (Path(tiny_dirs[name]) / "tokenizer.json").read_text()
        assert a == (tmp_path / "cli" / name / "tokenizer.json").read_text()


def test_caption_cache_gives_the_same_condition_as_encoding(text_encoders):
    from mmdit.encoders.cache import CaptionCache

    encoders = text_encoders
    cache = CaptionCache(encoders.encode, size=3)
    captions = ["a red circle", "a blue square", "a red circle", "a green triangle on the left"]
    for _ in range(2):
        got, want = cache.encode(captions), encoders.encode(captions)
        for a, b in zip(got.tokens + got.masks + [got.pooled], want.tokens + want.masks + [want.pooled]):
            assert torch.allclose(a.float(), b.float(), atol=1e-5)  # batch composition changes rounding
    assert cache.misses == 3 and cache.hits == 5 and len(cache.entries) == 3
    alone = encoders.encode(["a red circle"])
    assert torch.equal(cache.encode(["a red circle"]).tokens[0], alone.tokens[0])  # bit-equal to a batch of one
    small = CaptionCache(encoders.encode, size=1)
    small.encode(captions)
    assert len(small.entries) == 1


@pytest.mark.parametrize("kind", ["pooled", "sequence"])
def test_nan_at_a_padded_position_stays_out(tiny_dirs, kind):
    """A half-precision encoder can overflow to NaN at a padded position (its outputs there are never
    looked at by the encoder itself); the pooled mean of a non-CLIP pooled encoder and the zeroed padding of
    a sequence encoder select the real tokens instead of multiplying by the mask (NaN x 0 = NaN)."""
    cfg = EncodersConfig(text=[TextEncoderConfig(name=tiny_dirs["modernbert"], kind=kind, max_length=16)])
    te = TextEncoders.from_config(cfg, "cpu")
    clean = te.encode(CAPTIONS)

    def overflow_at_padding(module, args, kwargs, out):
        out.last_hidden_state[~kwargs["attention_mask"].bool()] = float("nan")

    hook = te.encoders[0].model.register_forward_hook(overflow_at_padding, with_kwargs=True)
    try:
        poisoned = te.encode(CAPTIONS)
    finally:
        hook.remove()
    got, want = (poisoned.pooled, clean.pooled) if kind == "pooled" else (poisoned.tokens[0], clean.tokens[0])
    assert not te.encoders[0].tokenize(CAPTIONS, padding="longest")["attention_mask"].bool().all()  # padded
    assert got.isfinite().all()
    torch.testing.assert_close(got, want)
