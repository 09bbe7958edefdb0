"""Tiny random-weight text encoders and VAE of the same classes as the real ones, for tests and the CPU demo.

``build_tiny_models(out_dir)`` writes four folders that load offline through exactly the code path used
for real Hugging Face names (``AutoTokenizer`` / ``AutoModel`` / ``CLIPTextModelWithProjection`` /
``AutoencoderKL.from_pretrained``):

* ``gemma2``     ``Gemma2Model`` (sequence, width 48); tokens ``<bos> ...``, ``<pad>`` padding
* ``modernbert`` ``ModernBertModel`` (sequence, width 32); tokens ``[CLS] ... [SEP]``
* ``clip``       ``CLIPTextModelWithProjection`` (pooled, projection 24); ``<|startoftext|> ... <|endoftext|>``
* ``vae``        ``AutoencoderKL`` with 16 latent channels and 8x downsampling, SD3's shift/scale.

``build_tiny_vlm(out_dir)`` writes a tiny LLaVA (the recaptioning VLM, :mod:`mmdit.data.recaption`);
``build_tiny_dinov2(out_dir)`` a tiny ``Dinov2Model`` (a REPA teacher, :mod:`mmdit.encoders.vision`); the CLI
builds both too, as ``<dir>/vlm`` and ``<dir>/dinov2``.

Tokenizers are ``tokenizers`` WordPiece models whose vocabulary is learned offline from generated
caption-like sentences, wrapped in ``PreTrainedTokenizerFast`` (transformers 5 saves it as a
``TokenizersBackend``). Everything, weights and vocabularies, is deterministic for a seed.

CLI: ``python -m mmdit tiny-models <dir> [--seed N]`` prints the folders and the matching config overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import tempfile
from pathlib import Path
from typing import Optional

import torch

from mmdit.config import EncodersConfig, TextEncoderConfig

# bump when the tiny models change, so cached copies are rebuilt
TINY_VERSION = 1
NAMES = ("gemma2", "modernbert", "clip", "vae")
_DONE = "TINY_MODELS_COMPLETE.json"

# widths chosen different from each other so that a mix-up of encoders shows as a shape error
GEMMA2_DIM = 48
MODERNBERT_DIM = 32
CLIP_PROJ_DIM = 24
VAE_LATENT_CHANNELS = 16
VAE_LATENT_FACTOR = 8
# SD3's VAE constants (stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json)
SD3_SHIFT_FACTOR = 0.0609
SD3_SCALING_FACTOR = 1.5305

_COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "cyan", "brown"]
_SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "rectangle", "ellipse", "diamond", "heart"]
_SIZES = ["small", "large", "tiny", "big", "medium", "huge"]
_PLACES = ["top left", "top right", "bottom left", "bottom right", "center", "left", "right", "top", "bottom"]
_BACKS = ["plain", "dark", "light", "striped", "dotted", "noisy", "gradient"]
_TEMPLATES = [
    "a {size} {color} {shape}",
    "a {size} {color} {shape} in the {place}",
    "a {color} {shape} on a {back} {color2} background",
    "two {color} {shape}s next to a {color2} {shape2}",
    "a photo of a {size} {color} {shape} at the {place} of the image",
    "an image with a {color} {shape} and a {size} {color2} {shape2} on a {back} background",
    "{color} {shape}, {back} background, {place}",
    "three {size} {shape}s, one {color}, one {color2}",
]


def caption_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Caption-like sentences (shapes, colours, positions) to train the tiny tokenizers on."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(
            rng.choice(_TEMPLATES).format(
                size=rng.choice(_SIZES),
                color=rng.choice(_COLORS),
                color2=rng.choice(_COLORS),
                shape=rng.choice(_SHAPES),
                shape2=rng.choice(_SHAPES),
                place=rng.choice(_PLACES),
                back=rng.choice(_BACKS),
            )
        )
    return out


def _wordpiece_vocab(corpus: list[str], specials: list[str], vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary learned from ``corpus``, deterministically.

    The ``tokenizers`` WordPieceTrainer breaks ties in hash-map order, so its vocabulary (and ids) change
    from run to run. Here: special tokens, every character of the corpus and of ASCII letters, digits and
    punctuation (as a word start and as a ``##`` continuation, so few words are unknown), then whole words
    by frequency (ties alphabetical) up to ``vocab_size``.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for line in corpus:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(line)))
    chars = sorted({c for w in words for c in w} | set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens = list(specials) + chars + [f"##{c}" for c in chars]
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(tokens) >= vocab_size:
            break
        if w not in tokens:
            tokens.append(w)
    return {t: i for i, t in enumerate(tokens)}


def _train_tokenizer(corpus: list[str], style: str, vocab_size: int = 256):
    """A WordPiece tokenizer in the style of ``gemma2`` / ``modernbert`` / ``clip`` (special tokens, template)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if style == "gemma2":
        # Gemma: pad 0, eos 1, bos 2, unk 3; a <bos> is prepended, nothing appended
        specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
        unk, extra = "<unk>", []
        kwargs = dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    elif style == "modernbert":
        specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
        unk, extra = "[UNK]", []
        kwargs = dict(unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
    elif style == "clip":
        # like the real CLIP vocabulary: bos/eos are the last two ids (so eos != 2, see CLIPTextTransformer)
        # and padding uses <|endoftext|>; the pooled vector is read at the first <|endoftext|>
        specials = ["<|unk|>"]
        unk, extra = "<|unk|>", ["<|startoftext|>", "<|endoftext|>"]
        kwargs = dict(
            unk_token="<|unk|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
        )
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")

    tok = Tokenizer(models.WordPiece(_wordpiece_vocab(corpus, specials, vocab_size), unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(specials + extra)  # the specials keep their ids; extra ones are appended

    def tid(t: str) -> int:
        return tok.token_to_id(t)

    if style == "gemma2":
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tid("<bos>"))]
        )
    elif style == "modernbert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tid("[CLS]")), ("[SEP]", tid("[SEP]"))],
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            pair="<|startoftext|> $A <|endoftext|> $B <|endoftext|>",
            special_tokens=[("<|startoftext|>", tid("<|startoftext|>")), ("<|endoftext|>", tid("<|endoftext|>"))],
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, padding_side="right", **kwargs)
    return fast


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def _build_gemma2(out: Path, corpus: list[str], seed: int) -> None:
    from transformers import Gemma2Config, Gemma2Model

    tok = _train_tokenizer(corpus, "gemma2")
    cfg = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=GEMMA2_DIM,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        query_pre_attn_scalar=12,
        max_position_embeddings=512,
        sliding_window=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    _seed_all(seed)
    model = Gemma2Model(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_modernbert(out: Path, corpus: list[str], seed: int) -> None:
    from transformers import ModernBertConfig, ModernBertModel

    tok = _train_tokenizer(corpus, "modernbert")
    cfg = ModernBertConfig(
        vocab_size=len(tok),
        hidden_size=MODERNBERT_DIM,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        local_attention=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
    )
    _seed_all(seed + 1)
    model = ModernBertModel(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_clip(out: Path, corpus: list[str], seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok = _train_tokenizer(corpus, "clip")
    # transformers 5: CLIPTextConfig's defaults are the real vocabulary's ids (49406/49407), so a tiny
    # vocabulary needs bos/eos/pad set explicitly or the pooled (eos) position is never found
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        projection_dim=CLIP_PROJ_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    tok.model_max_length = 77
    _seed_all(seed + 2)
    model = CLIPTextModelWithProjection(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_vae(out: Path, seed: int) -> None:
    from diffusers import AutoencoderKL

    _seed_all(seed + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamples -> factor 8
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=VAE_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=SD3_SCALING_FACTOR,
        shift_factor=SD3_SHIFT_FACTOR,
        use_quant_conv=False,  # as in SD3's VAE
        use_post_quant_conv=False,
    ).eval()
    vae.save_pretrained(out)


VLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "[UNK]"]
# a ChatML-style template: the processor expands <image> into the vision tokens
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_vlm(out: str | os.PathLike, seed: int = 0) -> str:
    """A tiny random-weight ``LlavaForConditionalGeneration`` (CLIP vision tower, Llama text model) with its
    ``LlavaProcessor`` (PIL CLIP image processor, WordPiece tokenizer, chat template), saved to ``out``.

    It loads through ``AutoProcessor`` / ``AutoModelForImageTextToText`` like a real LLaVA, so
    ``data/recaption.py`` runs its real code path in tests; what it generates is random text.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out = Path(out)
    vocab = _wordpiece_vocab(caption_corpus(400, seed), VLM_SPECIALS, 320)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(VLM_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>", unk_token="[UNK]", padding_side="left")
    ids = {t: fast.convert_tokens_to_ids(t) for t in VLM_SPECIALS}
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                                bos_token_id=ids["<|im_start|>"]),
        image_token_id=ids["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    _seed_all(seed + 4)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.update(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=8,
                               vision_feature_select_strategy="full", chat_template=VLM_CHAT_TEMPLATE,
                               image_token="<image>", num_additional_image_tokens=1)
    model.save_pretrained(out), processor.save_pretrained(out)
    return str(out.resolve())


DINOV2_DIM = 40
DINOV2_PATCH = 4
DINOV2_IMAGE_SIZE = 32  # 8 x 8 patches at the size it was "trained" at


def build_tiny_dinov2(out: str | os.PathLike, seed: int = 0) -> str:
    """A tiny random-weight ``Dinov2Model`` (width 40, 2 layers, 4 px patches) saved to ``out``: a REPA teacher
    that loads through ``train.repa.encoder`` exactly as facebook/dinov2-base does."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=DINOV2_DIM, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                       patch_size=DINOV2_PATCH, image_size=DINOV2_IMAGE_SIZE)
    _seed_all(seed + 5)
    model = Dinov2Model(cfg).eval()
    model.save_pretrained(out)
    return str(Path(out).resolve())


def build_tiny_models(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Build and save the tiny models under ``out_dir``; returns {"gemma2"|"modernbert"|"clip"|"vae": folder}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = caption_corpus(400, seed)
    dirs = {name: str((out_dir / name).resolve()) for name in NAMES}
    _build_gemma2(Path(dirs["gemma2"]), corpus, seed)
    _build_modernbert(Path(dirs["modernbert"]), corpus, seed)
    _build_clip(Path(dirs["clip"]), corpus, seed)
    _build_vae(Path(dirs["vae"]), seed)
    (out_dir / _DONE).write_text(json.dumps({"version": TINY_VERSION, "seed": seed, "dirs": dirs}, indent=1))
    return dirs


def default_cache_dir() -> Path:
    """``$MMDIT_CACHE`` or ``$XDG_CACHE_HOME/mmdit`` (``~/.cache/mmdit``)."""
    if os.environ.get("MMDIT_CACHE"):
        return Path(os.environ["MMDIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmdit"


def _complete(folder: Path, seed: int) -> Optional[dict[str, str]]:
    marker = folder / _DONE
    if not marker.exists():
        return None
    info = json.loads(marker.read_text())
    if info.get("version") != TINY_VERSION or info.get("seed") != seed:
        return None
    return {name: str(folder / name) for name in NAMES}


def ensure_tiny_models(root: str | os.PathLike | None = None, seed: int = 0) -> dict[str, str]:
    """The cached builder: the tiny models under ``root/tiny-models-v<V>-seed<S>``, built once.

    Safe when several processes call it at once: each builds into a temporary folder and renames it into
    place; a loser of the race uses the winner's copy. ``root`` defaults to :func:`default_cache_dir`.
    """
    root = Path(root) if root is not None else default_cache_dir()
    target = root / f"tiny-models-v{TINY_VERSION}-seed{seed}"
    found = _complete(target, seed)
    if found:
        return found
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root))
    try:
        build_tiny_models(tmp, seed)
        try:
            os.rename(tmp, target)
        except OSError:
            if _complete(target, seed) is None:  # a stale, incomplete folder: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    found = _complete(target, seed)
    assert found is not None
    # the marker written during the build names the temporary folder; rewrite it with the final paths
    (target / _DONE).write_text(json.dumps({"version": TINY_VERSION, "seed": seed, "dirs": found}, indent=1))
    return found


def tiny_encoders_config(
    dirs: dict[str, str], vae: bool = True, max_length: int = 16, dtype: str = "fp32"
) -> EncodersConfig:
    """An EncodersConfig on the tiny folders: gemma2 + modernbert (sequence), clip (pooled), and the VAE.

    ``vae=False`` gives pixel space. The matching model widths are :func:`tiny_model_dims`.
    """
    return EncodersConfig(
        text=[
            TextEncoderConfig(name=dirs["gemma2"], kind="sequence", max_length=max_length),
            TextEncoderConfig(name=dirs["modernbert"], kind="sequence", max_length=max_length),
            TextEncoderConfig(name=dirs["clip"], kind="pooled", max_length=max_length),
        ],
        vae=dirs["vae"] if vae else "",
        dtype=dtype,
    )


def tiny_model_dims(vae: bool = True) -> dict:
    """ModelConfig fields that match :func:`tiny_encoders_config`: text_dims, pooled_dim, in_channels, latent_factor."""
    return dict(
        text_dims=[GEMMA2_DIM, MODERNBERT_DIM],
        pooled_dim=CLIP_PROJ_DIM,
        in_channels=VAE_LATENT_CHANNELS if vae else 3,
        latent_factor=VAE_LATENT_FACTOR if vae else 1,
    )


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m mmdit tiny-models <dir> [--seed N]``: build the tiny models and print their folders."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "tiny-models":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python -m mmdit tiny-models",
        description="Build tiny random-weight text encoders (Gemma2, ModernBERT, CLIP) and a 16-channel VAE "
        "for offline tests and demos.",
    )
    parser.add_argument("out_dir", help="folder to write the models into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dirs = build_tiny_models(args.out_dir, seed=args.seed)
    dirs["vlm"] = build_tiny_vlm(Path(args.out_dir) / "vlm", seed=args.seed)  # for data/recaption.py
    dirs["dinov2"] = build_tiny_dinov2(Path(args.out_dir) / "dinov2", seed=args.seed)  # train.repa.encoder
    for name, path in dirs.items():
        print(f"{name:<11} {path}")
    dims = tiny_model_dims()
    print("\nconfig overrides:")
    print(
        f"  encoders.text='[{{name: {dirs['gemma2']}, kind: sequence}}, {{name: {dirs['modernbert']}, "
        f"kind: sequence}}, {{name: {dirs['clip']}, kind: pooled}}]'"
    )
    print(f"  encoders.vae={dirs['vae']}")
    print(f"  model.text_dims=[{dims['text_dims'][0]},{dims['text_dims'][1]}] model.pooled_dim={dims['pooled_dim']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
