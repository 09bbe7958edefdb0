"""Everything issue 13 asks to measure on a GPU, in one short run; see bench/gpu_suite.sh for how to call it.

The sd3_256 model (configs/sd3_256.yaml: depth 19, SwiGLU, two text encoders of 128 tokens, pooled CLIP)
trains on padded captions drawn from a realistic length distribution (bench/captions.py), trimmed to the
batch's longest caption as the loader does, at the largest batch that fits (probed from one step's memory).
Variants, most important first (a time budget skips the rest, saying so): the default (compiled blocks,
FlexAttention, no checkpointing), full checkpointing, masked SDPA, unmasked SDPA (every caption real at
the same length: what padding costs), eager runs of the same, and diffusers' SD3Transformer2DModel at the
same width, depth and tokens (eager and compiled blocks; it has no text mask). For each: median step time,
images/s, MFU (3 x forward FLOPs) and HFU (with recompute) against the dense bf16 peak, peak memory.
Then the sd3_2b rung of the scaling ladder on one GPU next to ``python -m mmdit memory``'s estimate
(bench/scale_step.py, issue 17). Results go to <out>/gpu_suite.json (rewritten after every variant) and
<out>/gpu_suite.txt.

``--device cpu --tiny`` runs the same code on a tiny model in seconds (CI): compiled variants use the
aot_eager backend there (traced like inductor, no C++ build) and FlexAttention training is skipped (PyTorch
has no CPU backward for it), each with its reason in the results.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

if importlib.util.find_spec("omegaconf") is None:  # GPU images may lack it; the suite never loads YAML through it
    print("gpu_suite: omegaconf is not installed; stubbing it (ModelConfig is built directly from the preset)")
    stub, errors = types.ModuleType("omegaconf"), types.ModuleType("omegaconf.errors")
    stub.OmegaConf, errors.OmegaConfBaseException = None, Exception
    stub.errors = errors
    sys.modules.update({"omegaconf": stub, "omegaconf.errors": errors})

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from captions import padded_condition  # noqa: E402

from mmdit.conditioning import TextCondition  # noqa: E402
from mmdit.config import ModelConfig  # noqa: E402
from mmdit.model import MMDiT  # noqa: E402
from mmdit.model.flops import hardware_flops_per_image, peak_flops_for, train_flops_per_image  # noqa: E402
from mmdit.model.policy import compile_blocks  # noqa: E402

# (name, compiled, checkpoint, attention, padded): the default configuration first
VARIANTS = [
    ("compiled flex ckpt=none", True, "none", "auto", True),
    ("compiled flex ckpt=full", True, "full", "auto", True),
    ("compiled sdpa-masked ckpt=none", True, "none", "sdpa", True),
    ("compiled sdpa-unmasked ckpt=none", True, "none", "sdpa", False),
    ("eager flex ckpt=none", False, "none", "auto", True),
    ("eager sdpa-masked ckpt=none", False, "none", "sdpa", True),
    ("eager sdpa-unmasked ckpt=none", False, "none", "sdpa", False),
    ("eager flex ckpt=full", False, "full", "auto", True),
]


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def model_config(tiny: bool) -> tuple[ModelConfig, list[int]]:
    """The sd3_256 preset's model (checkpointing left to the variants) and its encoders' max lengths."""
    preset = yaml.safe_load((ROOT / "configs" / "sd3_256.yaml").read_text())
    model = {k: v for k, v in preset["model"].items() if not k.startswith("checkpoint")}
    lengths = [e["max_length"] for e in preset["encoders"]["text"] if e.get("kind", "sequence") == "sequence"]
    if tiny:
        model.update(depth=2, text_dims=[64, 32], pooled_dim=32, max_res=64, max_res_orig=64)
        lengths = [40, 40]
    return ModelConfig(**model), lengths


def matmul_peak(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, reps: int) -> float:
    """Best FLOP/s of torch.mm [m, k] x [k, n] over ``reps`` calls (after one warm-up)."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    out = torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = sync(device)
        torch.mm(a, b, out=out)
        best = min(best, sync(device) - t0)
    return 2.0 * m * k * n / best


class Inputs:
    """One fixed batch: latents, targets, times, and the text condition (padded + trimmed, or all real)."""

    def __init__(self, cfg: ModelConfig, lengths: list[int], batch: int, latent: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(device)
        self.target = torch.randn_like(self.x)
        self.t = torch.rand(batch, generator=g).to(device)
        tokens = [torch.randn(batch, n, d, generator=g).to(device) for n, d in zip(lengths, cfg.text_dims)]
        pooled = torch.randn(batch, cfg.pooled_dim, generator=g).to(device) if cfg.pooled_dim else None
        self.padded = padded_condition(tokens, pooled, g)
        self.real = TextCondition(self.padded.tokens, [torch.ones_like(m) for m in self.padded.masks], pooled)
        self.text_lengths = [m.shape[1] for m in self.padded.masks]
        self.real_fraction = float(sum(m.sum() for m in self.padded.masks) / sum(m.numel() for m in self.padded.masks))


def train_step(model, opt, forward, target, dtype) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(target.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = F.mse_loss(forward().float(), target)
    loss.backward()
    opt.step()


def time_steps(model, forward, target, dtype, warmup: int, steps: int) -> dict:
    device = target.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = sync(device)
    for _ in range(warmup):
        train_step(model, opt, forward, target, dtype)
    warm = sync(device) - t0
    times = []
    for _ in range(steps):
        t0 = sync(device)
        train_step(model, opt, forward, target, dtype)
        times.append(sync(device) - t0)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_s": statistics.median(times), "min_s": min(times), "warmup_s": warm, "peak_mem_gib": peak_mem}


def build_ours(cfg: ModelConfig, device: torch.device) -> MMDiT:
    torch.manual_seed(0)
    with torch.device(device):
        model = MMDiT(cfg)
        with torch.no_grad():  # non-zero adaLN gates: every block does its full work both ways
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return model.train()


def build_diffusers(cfg: ModelConfig, latent: int, device: torch.device):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=latent, patch_size=cfg.patch_size, in_channels=cfg.in_channels, num_layers=cfg.depth,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=cfg.text_dims[0],
        caption_projection_dim=cfg.dim, pooled_projection_dim=cfg.pooled_dim, out_channels=cfg.in_channels,
        pos_embed_max_size=latent, qk_norm="rms_norm",
    )
    return model.to(device).train()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def probe_batch(cfg: ModelConfig, lengths: list[int], latent: int, device: torch.device, dtype) -> dict:
    """Largest batch (a multiple of 8) whose eager no-checkpoint step fits in 85 % of the GPU, from the memory
    of one step at batch 8 and one at 16 (memory is affine in the batch)."""
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    mem = {}
    for b in (8, 16):
        model = build_ours(cfg, device)
        inputs = Inputs(cfg, lengths, b, latent, device)
        forward = (lambda m, i: lambda: m(i.x, i.t, i.padded))(model, inputs)
        mem[b] = time_steps(model, forward, inputs.target, dtype, 1, 1)["peak_mem_gib"]
        del model, inputs
        free(device)
    per_sample = (mem[16] - mem[8]) / 8
    fits = int((0.85 * total - (mem[8] - 8 * per_sample)) / per_sample) // 8 * 8
    return {"gpu_mem_gib": total, "mem_at_8_gib": mem[8], "mem_at_16_gib": mem[16],
            "per_sample_gib": per_sample, "batch": max(8, min(fits, 512))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model and batch: checks the suite runs (CI)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_results"), help="output folder (default $OUT)")
    p.add_argument("--batch", type=int, default=0, help="batch per step; 0 = the largest that fits (GPU) / 2")
    p.add_argument("--steps", type=int, default=0, help="timed steps per variant (default 8 GPU, 2 tiny)")
    p.add_argument("--budget_s", type=float, default=420.0, help="skip the remaining variants after this long")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: steady timings on a shared box)")
    args = p.parse_args(argv)
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: --device cuda but no CUDA device is visible; use --device cpu --tiny")
    dtype = torch.bfloat16 if cuda else torch.float32
    backend = "aot_eager" if not cuda else "inductor"
    steps, warmup = args.steps or (2 if args.tiny else 8), (1 if args.tiny else 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, lengths = model_config(args.tiny)
    latent = cfg.max_res // cfg.latent_factor
    image_tokens = (latent // cfg.patch_size) ** 2
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    results: dict = {"device": name, "torch": torch.__version__, "dtype": str(dtype)[6:], "tiny": args.tiny,
                     "compile_backend": backend, "model": {"depth": cfg.depth, "dim": cfg.dim, "heads": cfg.heads,
                     "mlp": cfg.mlp_type, "image_tokens": image_tokens, "text_max_lengths": lengths},
                     "variants": {}, "skipped": {}}
    lines: list[str] = []

    def report(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        (out / "gpu_suite.json").write_text(json.dumps(results, indent=1))
        (out / "gpu_suite.txt").write_text("\n".join(lines) + "\n")

    if cuda and not args.batch:
        results["batch_probe"] = probe_batch(cfg, lengths, latent, device, dtype)
    batch = args.batch or results.get("batch_probe", {}).get("batch", 2)
    inputs = Inputs(cfg, lengths, batch, latent, device)
    tokens = image_tokens + sum(inputs.text_lengths)
    shapes = {"qkv": (tokens * batch, cfg.dim, 3 * cfg.dim), "mlp_up": (tokens * batch, cfg.dim, 8 * cfg.dim),
              "mlp_down": (tokens * batch, 4 * cfg.dim, cfg.dim)}
    mm = {k: matmul_peak(*s, device, dtype, reps=3 if args.tiny else 20) for k, s in shapes.items()}
    spec = peak_flops_for(name) if cuda else 0.0
    peak = spec or max(mm.values())
    results.update(batch=batch, text_lengths_trimmed=inputs.text_lengths, text_real_fraction=inputs.real_fraction,
                   matmul_flops={k: v / 1e12 for k, v in mm.items()}, peak_tflops=peak / 1e12,
                   peak_source="dense bf16 spec" if spec else "best measured matmul")
    report(f"{name}, torch {torch.__version__}, {results['dtype']}; sd3_256 model depth {cfg.depth} dim {cfg.dim}; "
           f"batch {batch}; tokens {image_tokens} image + {inputs.text_lengths} text (trimmed from {lengths}, "
           f"{inputs.real_fraction:.0%} real)")
    unit, scale = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
    report("matmul at our shapes: " + ", ".join(f"{k} {v / scale:.1f} {unit}" for k, v in mm.items())
           + f"; MFU/HFU against {peak / scale:.1f} {unit} ({results['peak_source']})")
    report(f"{'variant':<36} {'step s':>8} {'img/s':>8} {'MFU':>6} {'HFU':>6} {'mem GiB':>8} {'warmup s':>9}")

    def record(label: str, timing: dict, checkpoint: str) -> None:
        c = ModelConfig(**{**cfg.__dict__, "checkpoint": checkpoint})
        side = cfg.max_res
        model_flops = train_flops_per_image(c, side, side, inputs.text_lengths) * batch
        hw_flops = hardware_flops_per_image(c, side, side, inputs.text_lengths) * batch
        timing.update(images_per_s=batch / timing["step_s"], mfu=model_flops / timing["step_s"] / peak,
                      hfu=hw_flops / timing["step_s"] / peak)
        results["variants"][label] = timing
        mem = "-" if timing["peak_mem_gib"] is None else f"{timing['peak_mem_gib']:.1f}"
        report(f"{label:<36} {timing['step_s']:8.3f} {timing['images_per_s']:8.1f} {timing['mfu']:6.1%} "
               f"{timing['hfu']:6.1%} {mem:>8} {timing['warmup_s']:9.1f}")

    def skip(label: str, reason: str) -> None:
        results["skipped"][label] = reason
        report(f"{label:<36} skipped: {reason}")

    for label, compiled, checkpoint, attention, padded in VARIANTS:
        if args.tiny and compiled and label != "compiled sdpa-masked ckpt=none":
            skip(label, "--tiny traces one compiled variant only (the CPU default path), to stay quick")
            continue
        if time.perf_counter() - start > args.budget_s:
            skip(label, f"time budget of {args.budget_s:.0f} s spent")
            continue
        if attention == "auto" and padded and not cuda:
            skip(label, "FlexAttention has no backward on the CPU (auto uses masked SDPA there)")
            continue
        torch._dynamo.reset()
        model = build_ours(ModelConfig(**{**cfg.__dict__, "checkpoint": checkpoint, "attention": attention}), device)
        if compiled:
            compile_blocks(model, backend=backend)
        cond = inputs.padded if padded else inputs.real
        record(label, time_steps(model, lambda m=model, c=cond: m(inputs.x, inputs.t, c), inputs.target, dtype,
                                 warmup, steps), checkpoint)
        del model
        free(device)

    label = "sd3_2b 1 GPU compiled ckpt=full"
    if time.perf_counter() - start > args.budget_s:
        skip(label, f"time budget of {args.budget_s:.0f} s spent")
    else:
        from scale_step import sd3_2b_step

        torch._dynamo.reset()
        timing = sd3_2b_step(build_ours, time_steps, compile_blocks, device, dtype, backend, args.tiny, steps, warmup)
        results["sd3_2b"] = timing
        mem = "-" if timing["peak_mem_gib"] is None else f"{timing['peak_mem_gib']:.1f}"
        report(f"{label:<36} {timing['step_s']:8.3f} {timing['batch'] / timing['step_s']:8.1f} batch {timing['batch']}"
               f" ({timing['params'] / 1e9:.2f} B params): peak {mem} GiB, python -m mmdit memory estimates "
               f"{timing['estimate_gib']:.1f} GiB")
        free(device)

    for compiled in (False, True):
        label = f"diffusers SD3 {'compiled' if compiled else 'eager'} (unmasked)"
        if importlib.util.find_spec("diffusers") is None:
            skip(label, "diffusers is not installed here (`pip install diffusers` to compare)")
            continue
        if time.perf_counter() - start > args.budget_s:
            skip(label, f"time budget of {args.budget_s:.0f} s spent")
            continue
        if args.tiny and compiled:
            skip(label, "--tiny compiles ours only, to stay quick")
            continue
        torch._dynamo.reset()
        theirs = build_diffusers(cfg, latent, device)
        if compiled:
            for block in theirs.transformer_blocks:
                block.compile(backend=backend)
        text = torch.cat([F.pad(t, (0, cfg.text_dims[0] - t.shape[-1])) for t in inputs.padded.tokens], dim=1)
        record(label, time_steps(theirs, lambda m=theirs, text=text: m(
            hidden_states=inputs.x, encoder_hidden_states=text, pooled_projections=inputs.padded.pooled,
            timestep=inputs.t * 1000, return_dict=False)[0], inputs.target, dtype, warmup, steps), "none")
        del theirs
        free(device)
    results["total_s"] = time.perf_counter() - start
    report(f"total {results['total_s']:.0f} s; results in {out / 'gpu_suite.json'}")


if __name__ == "__main__":
    main()
