"""How the loader's encoders run: attention kernel per class (logged), inference_mode, padding to the batch,
dtype, channels-last VAE, and ``encoders.compile`` (aot_eager: traced as inductor would be, no C++ build)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from mmdit.config import ConfigError, EncodersConfig
from mmdit.encoders import TextEncoders, make_codec, resolve_dtype, tiny_encoders_config

CAPTIONS = ["a red circle", "a small green star on a striped blue background in the top left"]


def _encoders(tiny_models, **fields) -> TextEncoders:
    cfg = dataclasses.replace(tiny_encoders_config(tiny_models, max_length=16), **fields)
    return TextEncoders.from_config(cfg, "cpu")


def test_attention_per_class_is_chosen_and_logged(tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="mmdit.encoders"):
        te = _encoders(tiny_models)  # encoders.attention defaults to sdpa
    got = {d["class"]: d["attention"] for d in te.describe()}
    # transformers 5 has no SDPA for Gemma 2 (soft-capped logits): eager, said so in a warning
    assert got == {"Gemma2Model": "eager", "ModernBertModel": "sdpa", "CLIPTextModelWithProjection": "sdpa"}
    assert [e.attention for e in te.encoders] == [e.model.config._attn_implementation for e in te.encoders]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Gemma2Model does not support 'sdpa'" in m and "running eager" in m for m in warnings), warnings
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert sum("attention=sdpa" in m for m in infos) == 2 and sum("attention=eager" in m for m in infos) == 1
    eager = _encoders(tiny_models, attention="eager")
    assert {d["attention"] for d in eager.describe()} == {"eager"}
    # the kernel changes nothing but speed
    a, b = te.encode(CAPTIONS), eager.encode(CAPTIONS)
    for x, y in zip(a.tokens + [a.pooled], b.tokens + [b.pooled]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_unknown_attention_is_a_config_error():
    with pytest.raises(ConfigError, match="encoders.attention='fast'"):
        EncodersConfig(attention="fast")


def test_forward_runs_at_the_batch_longest_caption_and_pads_with_zeros(tiny_models):
    te = _encoders(tiny_models)
    seen = []
    hooks = [e.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
             for e in te.encoders]
    short = te.encode(CAPTIONS[:1])
    for h in hooks:
        h.remove()
    real = [int(m[0].sum()) for m in short.masks]
    assert seen[:2] == real and all(n < 16 for n in seen)  # no forward over the padding
    for tok, mask, n in zip(short.tokens, short.masks, real):
        assert tok.shape[1] == 16 and mask.shape == (1, 16)  # still padded to max_length for the consumers
        assert mask[0, :n].all() and (tok[0, n:] == 0).all() and (tok[0, :n] != 0).any()
    both = te.encode(CAPTIONS)
    for tok, mask in zip(both.tokens, both.masks):
        assert (tok[~mask] == 0).all() and (tok[mask] != 0).any()


def test_outputs_leave_inference_mode_and_dtype_is_honoured(tiny_models):
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32
    te = _encoders(tiny_models, dtype="bf16")
    assert all(next(e.model.parameters()).dtype == torch.bfloat16 for e in te.encoders)
    cond = te.encode(CAPTIONS)
    assert all(t.dtype == torch.bfloat16 and not t.is_inference() for t in cond.tokens + [cond.pooled])
    codec = make_codec(dataclasses.replace(tiny_encoders_config(tiny_models), dtype="bf16"), "cpu")
    lat = codec.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), sample=False)
    assert lat.dtype == torch.bfloat16 and not lat.is_inference() and lat.is_contiguous()
    lin = torch.nn.Linear(lat.shape[-1], 2, dtype=torch.bfloat16)
    lin(lat).sum().backward()  # a trainable layer may save it for backward


def test_vae_runs_channels_last(tiny_models):
    codec = make_codec(tiny_encoders_config(tiny_models), "cpu")
    convs = [m for m in codec.vae.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not convs[0].weight.is_contiguous()  # really the other layout, not a 1x1 corner case
    seen = []
    hook = codec.vae.encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    codec.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), sample=False)
    hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()


def test_compile_gives_the_eager_outputs(tiny_models):
    torch._dynamo.reset()
    plain = _encoders(tiny_models)
    compiled = _encoders(tiny_models, compile=True, compile_backend="aot_eager")
    assert [d["compiled"] for d in compiled.describe()] == [True] * 3
    assert all(e.model._compiled_call_impl is not None for e in compiled.encoders)
    assert all(e.model._compiled_call_impl is None for e in plain.encoders)
    a, b = plain.encode(CAPTIONS), compiled.encode(CAPTIONS)
    for x, y in zip(a.tokens + a.masks + [a.pooled], b.tokens + b.masks + [b.pooled]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    cfg = tiny_encoders_config(tiny_models)
    vae_plain = make_codec(cfg, "cpu")
    vae_compiled = make_codec(dataclasses.replace(cfg, compile=True, compile_backend="aot_eager"), "cpu")
    assert vae_compiled.compiled and vae_compiled.vae.encoder._compiled_call_impl is not None
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vae_compiled.encode(images, sample=False), vae_plain.encode(images, sample=False),
                               atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()
