"""Images/s of one loader rank (Gemma-2-2B + ModernBERT-large + CLIP-L text + the SD3/FLUX VAE encoder) against
the images/s of one model rank, and the loaders each model rank needs per preset (issue 14).

    python bench/loader_throughput.py                  # CPU, real sizes in bf16, batch 2 (a few minutes)
    python bench/loader_throughput.py --tiny           # tiny sizes, seconds (CI: keeps it from rotting)
    python bench/loader_throughput.py --device cuda --batch 64 --model_json $OUT/gpu_suite.json   # on a GPU
    python bench/loader_throughput.py --tiny --repa    # with a REPA teacher (DINOv2-base) on the loader too

Every encoder is a real-size architecture built from its published config with random weights (no
download), run through the loader's own code (``LoadedTextEncoder.encode_tokens``, ``VAECodec.encode``:
inference_mode, the attention kernel of ``encoders.attention`` where the class has it, channels-last VAE,
optional ``--compile``), one model at a time and freed before the next. Tokenization is not timed (fast
tokenizers: milliseconds per batch).

Captions: Gemma token counts are log-normal with median 70 (mean ~74, ~4 % clipped at 128), ModernBERT
the same count + 2 specials, CLIP the same clipped at 77. The forward runs at the longest caption of the
batch (``encode`` pads to it), so the timed length is the longest of a draw of one model rank's batch of
the preset (140 at 256 px, 40 at 512 px), e.g. 128: what a loader pays at the real batch size, even when
``--batch`` is smaller.

Model rank: on a GPU, the sd3_256 step measured by ``bench/gpu_suite.py`` in the same run (``--model_json``;
other presets scaled by ``mmdit.model.flops.train_flops_per_image``), else 45 % MFU of the dense bf16
peak. On the CPU, one bf16-autocast training step of a depth-4 MMDiT (bench/model_step.py's Runner) gives
this CPU's achieved FLOP/s, and each preset's images/s is its FLOPs per image at that rate: a CPU figure
on both sides, which says how the costs compare, not what a GPU will do.

With ``--repa`` the loader also runs the REPA teacher (``train.repa``: DINOv2-base's architecture, 224 px at
256 px, 448 px at 512 px, through :class:`mmdit.encoders.vision.VisionTeacher`), counted in the loader's time,
and its targets' bytes per image on the wire are printed.

The last lines are ``ratio <preset>=<model images/s / loader images/s>``: loader ranks per model rank.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import yaml  # noqa: E402
from captions import caption_lengths  # noqa: E402

from mmdit.config import ModelConfig, TextEncoderConfig  # noqa: E402
from mmdit.encoders.text import LoadedTextEncoder, choose_attention, prepare_text_encoder  # noqa: E402
from mmdit.model.flops import peak_flops_for, train_flops_per_image  # noqa: E402

# preset -> (image side, one model rank's batch at the largest bucket)
PRESETS = {"sd3_256": (256, 140), "sd3_512": (512, 40)}
GEMMA_MEDIAN, GEMMA_SIGMA = 70.0, 0.35
GPU_MFU = 0.45  # the planning figure when no measured model step is given


@dataclass
class TextSpec:
    """One text encoder: how the loader configures it and how to build its architecture."""

    name: str
    kind: str
    max_length: int
    extra_tokens: int  # special tokens around the caption
    build: Callable[[bool], tuple[type, object]]  # tiny -> (model class, config)


def gemma2(tiny: bool):
    from transformers import Gemma2Config, Gemma2Model

    size = dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                intermediate_size=9216, vocab_size=256000, query_pre_attn_scalar=256)
    if tiny:
        size = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                    intermediate_size=96, vocab_size=512, query_pre_attn_scalar=12)
    # gemma-2-2b's config.json: soft-capped attention logits (50) and an 4096-token sliding window
    return Gemma2Model, Gemma2Config(**size, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                     sliding_window=4096, max_position_embeddings=8192, pad_token_id=0,
                                     eos_token_id=1, bos_token_id=2)


def modernbert(tiny: bool):
    from transformers import ModernBertConfig, ModernBertModel

    size = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, intermediate_size=2624,
                vocab_size=50368)
    if tiny:
        size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=512)
    ids = dict(pad_token_id=3, eos_token_id=2, bos_token_id=1, cls_token_id=1, sep_token_id=2)
    return ModernBertModel, ModernBertConfig(**size, **ids, max_position_embeddings=8192, local_attention=128)


def clip_l(tiny: bool):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    size = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                projection_dim=768, vocab_size=49408)
    if tiny:
        size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    projection_dim=24, vocab_size=512)
    v = size["vocab_size"]
    return CLIPTextModelWithProjection, CLIPTextConfig(**size, max_position_embeddings=77, hidden_act="quick_gelu",
                                                       bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1)


TEXT = [TextSpec("gemma-2-2b", "sequence", 128, 1, gemma2), TextSpec("ModernBERT-large", "sequence", 128, 2,
        modernbert), TextSpec("CLIP-L", "pooled", 77, 2, clip_l)]


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = sync(device)
        fn()
        times.append(sync(device) - t0)
    return statistics.median(times)


def padded_length(spec: TextSpec, rank_batch: int, seed: int = 0) -> tuple[int, float]:
    """(longest caption of one model rank's batch in this encoder's tokens, fraction of real tokens)."""
    words = caption_lengths(rank_batch, 128, torch.Generator().manual_seed(seed), GEMMA_MEDIAN, GEMMA_SIGMA)
    n = (words + spec.extra_tokens - 1).clamp(max=spec.max_length)  # gemma: <bos> + caption
    return int(n.max()), float(n.float().mean() / n.max())


def build_text(spec: TextSpec, args, device: torch.device, dtype: torch.dtype) -> LoadedTextEncoder:
    cls, config = spec.build(args.tiny)
    what = f"{spec.name} ({cls.__name__})"
    impl = choose_attention(cls, config, args.attention, what)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, attn_implementation=impl, dtype=dtype)
    cfg = TextEncoderConfig(name=spec.name, kind=spec.kind, max_length=spec.max_length)
    return prepare_text_encoder(cfg, spec.name, None, model, device, what, args.compile_backend if args.compile else "")


def time_text(spec: TextSpec, args, device, dtype, lengths: dict[int, int], results: dict) -> None:
    """Images/s of one text encoder at each preset's padded length (each distinct length timed once)."""
    enc = build_text(spec, args, device, dtype)
    params = sum(p.numel() for p in enc.model.parameters())
    vocab = enc.model.config.vocab_size
    seconds: dict[int, float] = {}
    for side, length in lengths.items():
        if length not in seconds:
            ids = torch.randint(4, vocab - 2, (args.batch, length), generator=torch.Generator().manual_seed(0))
            mask = torch.ones(args.batch, length, dtype=torch.long)
            mask[0, length // 2:] = 0  # one shorter caption: the mask path runs as in training
            ids, mask = ids.to(device), mask.to(device)
            seconds[length] = timed(lambda ids=ids, mask=mask: enc.encode_tokens(ids, mask), device, args.warmup,
                                    args.steps)
        results["encoders"][f"{spec.name}@{side}"] = {
            "class": type(enc.model).__name__, "params": params, "attention": enc.attention,
            "compiled": enc.compiled, "tokens": length, "batch": args.batch, "seconds": seconds[length],
            "images_per_s": args.batch / seconds[length]}


def build_vae(args, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    from mmdit.encoders.vae import VAECodec

    width = (8, 16, 16, 16) if args.tiny else (128, 256, 512, 512)  # SD3 / FLUX: 16 latent channels, 8x
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=width,
                        layers_per_block=1 if args.tiny else 2, latent_channels=16, norm_num_groups=4 if args.tiny
                        else 32, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False).to(dtype)
    vae.decoder = None  # a loader only encodes; the decoder is half the memory
    return VAECodec(vae, device=device, compile_backend=args.compile_backend if args.compile else "")


def time_vae(args, device, dtype, sides: list[int], results: dict) -> None:
    if importlib.util.find_spec("diffusers") is None:
        results["skipped"]["vae"] = "diffusers is not installed here: loader figures are text-only"
        return
    codec = build_vae(args, device, dtype)
    params = sum(p.numel() for p in codec.vae.encoder.parameters())
    for side in sides:
        px = side // 8 if args.tiny else side
        images = torch.randint(0, 256, (args.batch, 3, px, px), dtype=torch.uint8).to(device)
        s = timed(lambda images=images: codec.encode(images), device, args.warmup, args.steps)
        results["encoders"][f"vae@{side}"] = {"class": "AutoencoderKL.encoder", "params": params, "pixels": px,
                                              "compiled": codec.compiled, "batch": args.batch, "seconds": s,
                                              "images_per_s": args.batch / s}


def build_teacher(args, device: torch.device, dtype: torch.dtype):
    """DINOv2-base (facebook/dinov2-base's config; --tiny: width 40, 2 layers, 4 px patches) with random weights,
    as the loader's :class:`VisionTeacher` runs it."""
    from transformers import Dinov2Config, Dinov2Model

    from mmdit.encoders.vision import IMAGENET_MEAN, IMAGENET_STD, VisionTeacher

    size = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=518)
    if args.tiny:
        size = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=32)
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**size, mlp_ratio=4, layerscale_value=1.0)).to(device, dtype).eval()
    return VisionTeacher("dinov2-base", model.requires_grad_(False), size["hidden_size"], size["patch_size"],
                         32 if args.tiny else 224, IMAGENET_MEAN, IMAGENET_STD, 1, device, dtype)


def time_teacher(args, device, dtype, sides: list[int], results: dict) -> None:
    """Images/s of the REPA teacher at each preset's image size (its targets on the 16 px token grid)."""
    teacher = build_teacher(args, device, dtype)
    params = sum(p.numel() for p in teacher.model.parameters())
    for side in sides:
        px = side // 8 if args.tiny else side
        grid = (px // 16, px // 16)  # the SD3 presets' image tokens: VAE 8 x patch 2
        images = torch.randint(0, 256, (args.batch, 3, px, px), dtype=torch.uint8).to(device)
        s = timed(lambda images=images, grid=grid: teacher.features(images, grid), device, args.warmup, args.steps)
        results["encoders"][f"repa-dinov2-base@{side}"] = {
            "class": "Dinov2Model", "params": params, "pixels": px, "batch": args.batch, "seconds": s,
            "images_per_s": args.batch / s, "wire_bytes_per_image": grid[0] * grid[1] * teacher.dim * dtype.itemsize}


def preset_model(name: str, tiny: bool) -> ModelConfig:
    """The preset's ModelConfig (configs/<name>.yaml with its defaults_from); --tiny: depth 2."""
    raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    base = yaml.safe_load((ROOT / "configs" / f"{raw['defaults_from']}.yaml").read_text()) if "defaults_from" in \
        raw else {"model": {}}
    model = {**base["model"], **raw.get("model", {})}
    if tiny:
        model.update(depth=2, text_dims=[48, 32], pooled_dim=24)
    return ModelConfig(**model)


def cpu_model_flops(args, text_tokens: list[int]) -> float:
    """Achieved training FLOP/s of this CPU on a depth-4 MMDiT (bf16 autocast, 256 px, the presets' text widths)."""
    from model_step import Runner, perturb_

    from mmdit.conditioning import TextCondition
    from mmdit.model import MMDiT

    depth = 2 if args.tiny else 4
    dims, lat = ([48, 32], 8) if args.tiny else ([2304, 1024], 32)
    cfg = ModelConfig(depth=depth, text_dims=dims, pooled_dim=24 if args.tiny else 768, in_channels=16,
                      latent_factor=8, max_res=lat * 8, max_res_orig=lat * 8)
    torch.manual_seed(0)
    model = MMDiT(cfg)
    perturb_(model, 1)
    b, g = 2, torch.Generator().manual_seed(0)
    x, t = torch.randn(b, 16, lat, lat, generator=g), torch.rand(b, generator=g)
    tokens = [torch.randn(b, n, d, generator=g) for n, d in zip(text_tokens, dims)]
    cond = TextCondition(tokens, [torch.ones(b, n, dtype=torch.bool) for n in text_tokens],
                         torch.randn(b, cfg.pooled_dim, generator=g))
    runner = Runner("ours", model, lambda: model(x, t, cond), torch.bfloat16)
    target = torch.randn_like(x)
    s = timed(lambda: runner.step(target), torch.device("cpu"), 1, args.steps)
    return train_flops_per_image(cfg, lat * 8, lat * 8, text_tokens) * b / s


def model_rank_rates(args, device: torch.device, text_tokens: dict[str, list[int]], results: dict) -> dict:
    """Images/s of one model rank per preset, with where the figure comes from."""
    cfgs = {name: preset_model(name, args.tiny) for name in PRESETS}
    flops = {name: train_flops_per_image(cfgs[name], side, side, text_tokens[name])
             for name, (side, _) in PRESETS.items()}
    measured = None
    if args.model_json and Path(args.model_json).exists():
        variants = json.loads(Path(args.model_json).read_text()).get("variants", {})
        measured = next((v["images_per_s"] for k, v in variants.items() if k.startswith("compiled flex")), None)
    if measured is not None:
        rate, source = measured * flops["sd3_256"], f"sd3_256 step measured by gpu_suite ({args.model_json})"
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_flops_for(name) or 989e12
        rate, source = GPU_MFU * peak, f"{GPU_MFU:.0%} MFU of {peak / 1e12:.0f} TFLOP/s (no measured step given)"
    else:
        rate = cpu_model_flops(args, text_tokens["sd3_256"])
        source = "CPU: a depth-4 bf16-autocast training step, scaled to each preset by its FLOPs per image"
    results["model_rank"] = {"flops_per_s": rate, "source": source,
                             "images_per_s": {name: rate / f for name, f in flops.items()}}
    return results["model_rank"]["images_per_s"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny architectures, seconds (CI)")
    p.add_argument("--batch", type=int, default=0, help="images per encode call (default 2 CPU, 64 GPU)")
    p.add_argument("--steps", type=int, default=0, help="timed calls per encoder (default 2 CPU, 5 GPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="encoder weights (bf16: the CUDA default)")
    p.add_argument("--attention", default="sdpa", help="encoders.attention asked of each text encoder")
    p.add_argument("--compile", action="store_true", help="encoders.compile")
    p.add_argument("--compile_backend", default="", help="default: inductor on CUDA, aot_eager on the CPU")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--model_json", default="", help="gpu_suite.json whose measured sd3_256 step to compare with")
    p.add_argument("--repa", action="store_true", help="the loader also runs a REPA teacher (DINOv2-base)")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for loader_throughput.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (64 if cuda else 2)
    args.steps = args.steps or (5 if cuda else 2)
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    start = time.perf_counter()
    where = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    results: dict = {"device": where, "torch": torch.__version__, "dtype": args.dtype, "tiny": args.tiny,
                     "batch": args.batch, "encoders": {}, "skipped": {}, "text_tokens": {}}

    sides = {name: side for name, (side, _) in PRESETS.items()}
    for spec in TEXT:
        lengths = {}
        for name, (side, rank_batch) in PRESETS.items():
            lengths[side], real = padded_length(spec, rank_batch)
            results["text_tokens"].setdefault(name, {})[spec.name] = {"padded": lengths[side], "real_fraction": real}
        time_text(spec, args, device, dtype, lengths, results)
        free(device)  # one real-size model at a time: the last one is gone before the next is built
    time_vae(args, device, dtype, list(sides.values()), results)
    free(device)
    if args.repa:
        time_teacher(args, device, dtype, list(sides.values()), results)
        free(device)

    seq = [s for s in TEXT if s.kind == "sequence"]
    text_tokens = {name: [16 * math.ceil(results["text_tokens"][name][s.name]["padded"] / 16) for s in seq]
                   for name in PRESETS}
    model_rates = model_rank_rates(args, device, text_tokens, results)
    enc = results["encoders"]
    print(f"loader throughput on {where}, torch {torch.__version__}, {args.dtype} weights, batch {args.batch}, "
          f"{'tiny' if args.tiny else 'real-size'} architectures with random weights")
    print(f"{'encoder':<22} {'class':<28} {'attention':<10} {'params':>8} {'tokens/px':>9} {'s/call':>8} "
          f"{'img/s':>8}")
    for key, e in enc.items():
        size = e.get("tokens", e.get("pixels"))
        print(f"{key:<22} {e['class']:<28} {e.get('attention', '-'):<10} {e['params'] / 1e6:7.1f}M {size:>9} "
              f"{e['seconds']:8.3f} {e['images_per_s']:8.2f}")
    for key, e in enc.items():
        if "wire_bytes_per_image" in e:
            print(f"{key}: REPA targets {e['wire_bytes_per_image']:,} bytes per image on the wire")
    for reason in results["skipped"].values():
        print(f"skipped: {reason}")
    results["loader_images_per_s"], results["ratio"] = {}, {}
    print(f"model rank: {results['model_rank']['source']}")
    for name, side in sides.items():
        parts = [e for k, e in enc.items() if k.endswith(f"@{side}")]
        loader = 1.0 / sum(1.0 / e["images_per_s"] for e in parts)  # the encoders run one after another
        ratio = model_rates[name] / loader
        results["loader_images_per_s"][name], results["ratio"][name] = loader, ratio
        print(f"{name}: loader {loader:.2f} img/s ({side} px, text {text_tokens[name]} tokens); model rank "
              f"{model_rates[name]:.2f} img/s -> {ratio:.2f} loader ranks per model rank")
    results["total_s"] = time.perf_counter() - start
    if not cuda:
        print("caveat: CPU figures on both sides; they say how loader and model costs compare, not GPU speeds")
    for name in PRESETS:
        print(f"ratio {name}={results['ratio'][name]:.3f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "loader_throughput.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
