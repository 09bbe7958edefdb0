"""Training-step speed of our MMDiT against diffusers' SD3Transformer2DModel at the same shapes (issue 2).

    python bench/model_step.py                       # depth 4, batch 8, 256 + 64 tokens, CPU, 1 thread
    python bench/model_step.py --threads 0 --profile # all cores (an idle machine), and where our time goes
    python bench/model_step.py --depth 6 --steps 10
    python bench/model_step.py --device cuda --depth 19 --batch 32 --text_tokens 256   # bf16 on a GPU
    python bench/model_step.py --padded --compile    # padded captions (trimmed), regionally compiled blocks

One step = zero_grad, forward, MSE loss, backward, AdamW step, on fixed random inputs. The models are built
to the same width (64 x depth), depth, heads (depth, head_dim 64), patch 2, 16 latent channels, 32x32 latent
(256 image tokens), 64 text tokens from ONE text encoder of width ``--text_dim``, a pooled vector of
``--pooled_dim``, and batch ``--batch``. Each step of every model is timed in turn (ours-gelu, diffusers,
ours-swiglu, ...) in one process, so machine load falls on all alike; a figure is the median over ``--steps``
steps after ``--warmup`` untimed ones.

What is and is not the same (printed again in the output):

* MLP: diffusers is GELU-tanh, 4x wide, 2 matrices; ours-gelu (``mlp_type=gelu``) is the same, and is the
  like-for-like comparison behind the ``ratio=`` line. Ours-swiglu (our default: 3 matrices of 4x width,
  so 1.5x the MLP FLOPs) is printed too.
* Positions: ours applies 2-D RoPE to image queries/keys in every block (our default ``RoPE2d``); diffusers
  adds a fixed sin-cos table once after the patch conv. ``--pos`` changes ours.
* QK norm: both RMSNorm over the head dim (diffusers ``qk_norm="rms_norm"``), on image and text streams.
* Text input: ours RMSNorm + learnable scale + Linear per encoder; diffusers one Linear (context_embedder).
* Conditioning: both Linear-SiLU-Linear on 256 sinusoidal time features plus Linear-SiLU-Linear on pooled.
* Attention: both one SDPA over concatenated text + image tokens, no padding (ours gets an all-true mask,
  which it drops). With ``--padded``, captions have realistic lengths (``bench/captions.py``) and the batch is
  trimmed to its longest caption rounded up to 16, as the loader does; ours masks the padding
  (``model.attention=auto``: masked SDPA on the CPU, FlexAttention on CUDA), diffusers has no text mask and
  attends to the same trimmed tokens unmasked (same FLOPs, wrong answer).
* ``--compile``: ours compiles each joint block (``mmdit.model.policy.compile_blocks``, the CUDA default of
  ``train.compile``); diffusers compiles each of its transformer blocks the same way.
* Last block: both text streams are "pre-only" (keys/values only, no out-projection or MLP).

After the timings it prints the floor: the achieved FLOP/s of our (gelu) step by
``mmdit.model.flops.train_flops_per_image`` against the best FLOP/s of ``torch.mm`` at our MLP's shapes,
[(image+text tokens) x batch, hidden] x [hidden, 4 hidden], on this CPU.

The last two lines are ``floor=<step time at the matmul peak / ours-gelu median>`` (1 = our step runs at
the matmul rate of this machine) and ``ratio=<ours-gelu median / diffusers median>`` (< 1: ours is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmdit.conditioning import TextCondition  # noqa: E402
from mmdit.config import ModelConfig  # noqa: E402
from mmdit.model import MMDiT  # noqa: E402
from mmdit.model.flops import train_flops_per_image  # noqa: E402
from mmdit.model.policy import compile_blocks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from captions import padded_condition  # noqa: E402


def our_config(args, mlp_type: str) -> ModelConfig:
    side = args.latent * 8  # pixels through the 16-channel, factor-8 VAE
    return ModelConfig(depth=args.depth, hidden_size=64 * args.depth, num_heads=args.depth, mlp_ratio=4.0,
                       mlp_type=mlp_type, patch_size=2, in_channels=16, attention="auto", pos_encoding=args.pos,
                       qk_norm=True, text_dims=[args.text_dim], pooled_dim=args.pooled_dim, latent_factor=8,
                       max_res=side, max_res_orig=side)


def diffusers_model(args):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=args.latent, patch_size=2, in_channels=16, num_layers=args.depth, attention_head_dim=64,
        num_attention_heads=args.depth, joint_attention_dim=args.text_dim, caption_projection_dim=64 * args.depth,
        pooled_projection_dim=args.pooled_dim, out_channels=16, pos_embed_max_size=args.latent, qk_norm="rms_norm",
    )


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Non-zero adaLN gates and output layer, so every block does its full work in both directions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def sync(device: torch.device) -> float:
    """Wall time after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Runner:
    """One model with its optimizer and a closure that does one full training step (bf16 autocast on request)."""

    def __init__(self, name: str, model: torch.nn.Module, forward, dtype: torch.dtype, lr: float = 1e-4):
        self.name, self.model, self.forward, self.dtype = name, model.train(), forward, dtype
        self.device = next(model.parameters()).device
        fused = True if self.device.type == "cuda" else None
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=fused)
        self.times: list[float] = []  # whole step
        self.parts: list[tuple[float, float, float]] = []  # forward, backward, optimizer

    def step(self, target: torch.Tensor) -> float:
        t0 = sync(self.device)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = F.mse_loss(self.forward().float(), target)
        t1 = sync(self.device)
        loss.backward()
        t2 = sync(self.device)
        self.opt.step()
        t3 = sync(self.device)
        self.last_parts = (t1 - t0, t2 - t1, t3 - t2)
        return t3 - t0

    def record(self, seconds: float) -> None:
        self.times.append(seconds)
        self.parts.append(self.last_parts)

    def median_parts(self) -> list[float]:
        return [statistics.median(p[i] for p in self.parts) for i in range(3)]

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class MatmulPeak:
    """Best FLOP/s of torch.mm [m, k] x [k, n] in the step's compute dtype, sampled between the steps."""

    def __init__(self, m: int, k: int, n: int, device: torch.device, dtype: torch.dtype):
        make = dict(device=device, dtype=dtype)
        self.a, self.b, self.out = torch.randn(m, k, **make), torch.randn(k, n, **make), torch.empty(m, n, **make)
        self.device, self.flops, self.best, self.calls = device, 2.0 * m * k * n, float("inf"), 0
        torch.mm(self.a, self.b, out=self.out)  # warm-up

    def sample(self, reps: int = 4) -> None:
        for _ in range(reps):
            t0 = sync(self.device)
            torch.mm(self.a, self.b, out=self.out)
            self.best = min(self.best, sync(self.device) - t0)
        self.calls += reps

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.best


def profile_step(runner: Runner, target: torch.Tensor, steps: int = 2) -> None:
    """Where the forward + backward of one of our steps spends its time, by kind of kernel (self CPU time)."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            runner.opt.zero_grad(set_to_none=True)
            F.mse_loss(runner.forward(), target).backward()
    kinds = {"matmul (mm/addmm)": ("aten::mm", "aten::addmm", "aten::bmm"), "attention (SDPA)": ("scaled_dot",),
             "GELU": ("gelu",)}
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        kind = next((k for k, keys in kinds.items() if any(key in event.key for key in keys)), "everything else")
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e6 / steps
    whole = sum(totals.values())
    print(f"profile of {runner.name} forward+backward ({steps} steps, {whole:.3f} s/step with the profiler on): "
          + ", ".join(f"{k} {v / whole:.0%}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4, help="4-6 per issue 2; width 64 x depth, depth heads")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--latent", type=int, default=32, help="latent side (32 -> 256 image tokens at patch 2)")
    p.add_argument("--text_tokens", type=int, default=64)
    p.add_argument("--text_dim", type=int, default=2304, help="width of the one text encoder (Gemma-2-2B)")
    p.add_argument("--pooled_dim", type=int, default=768, help="pooled vector width (CLIP-L)")
    p.add_argument("--pos", default="RoPE2d", help="our position encoding (RoPE2d, RoPE, absolute, NoPE)")
    p.add_argument("--steps", type=int, default=7, help="timed steps per model (median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no_swiglu", action="store_true", help="skip our SwiGLU variant (shorter run)")
    p.add_argument("--compile", action="store_true", help="compile every model's blocks (ours and diffusers alike)")
    p.add_argument("--padded", action="store_true", help="realistic caption lengths up to --text_tokens, the batch "
                   "trimmed to its longest caption (rounded up to 16)")
    p.add_argument("--profile", action="store_true", help="also print where our (gelu) step spends its time")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="compute dtype (default: fp32 on CPU, "
                   "bf16 autocast on CUDA); weights and AdamW state stay fp32")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared box two OpenMP threads stall on each other's "
                        "barriers and the timings become noise; 0 = torch's default, all cores)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    b, hidden, lat = args.batch, 64 * args.depth, args.latent
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 16, lat, lat, generator=g).to(device)
    target = torch.randn(b, 16, lat, lat, generator=g).to(device)
    t = torch.rand(b, generator=g).to(device)
    text = torch.randn(b, args.text_tokens, args.text_dim, generator=g).to(device)
    pooled = torch.randn(b, args.pooled_dim, generator=g).to(device)
    if args.padded:
        cond = padded_condition([text], pooled, g)
        text = cond.tokens[0]
    else:
        cond = TextCondition([text], [torch.ones(b, args.text_tokens, dtype=torch.bool, device=device)], pooled)
    text_tokens = text.shape[1]  # trimmed with --padded

    runners = []
    cfgs = {}
    for mlp in ["gelu"] + ([] if args.no_swiglu else ["swiglu"]):
        cfgs[mlp] = our_config(args, mlp)
        torch.manual_seed(0)
        ours = MMDiT(cfgs[mlp])
        perturb_(ours, 1)
        ours.to(device)
        if args.compile:
            compile_blocks(ours)
        runners.append(Runner(f"ours-{mlp}", ours, lambda m=ours: m(x, t, cond), dtype))
        if mlp == "gelu":
            torch.manual_seed(0)
            theirs = diffusers_model(args)
            perturb_(theirs, 2)
            theirs.to(device)
            if args.compile:
                for block in theirs.transformer_blocks:
                    block.compile()
            runners.append(Runner("diffusers", theirs, lambda m=theirs: m(
                hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t * 1000,
                return_dict=False)[0], dtype))

    image_tokens = (lat // 2) ** 2
    # the floor's matmul: our MLP's up-projection over all tokens of the batch
    peak = MatmulPeak((image_tokens + text_tokens) * b, hidden, 4 * hidden, device, dtype)
    for i in range(args.warmup + args.steps):
        for r in runners:
            dt = r.step(target)
            if i >= args.warmup:
                r.record(dt)
        peak.sample()  # under the same load as the steps around it

    med = {r.name: statistics.median(r.times) for r in runners}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU threads={torch.get_num_threads()}"
    where += ", compiled blocks" if args.compile else ""
    where += f", padded captions (trimmed to {text_tokens})" if args.padded else ""
    print(f"MMDiT train step (fwd + bwd + AdamW), {where}, {str(dtype)[6:]}: depth={args.depth} "
          f"hidden={hidden} heads={args.depth} head_dim=64 patch=2 latent=16x{lat}x{lat} "
          f"tokens={image_tokens}+{text_tokens} batch={b} text_dim={args.text_dim} pooled={args.pooled_dim}")
    print(f"{'model':<12} {'params':>10} {'median s':>9} {'min s':>7} {'max s':>7} {'img/s':>7}   "
          f"median fwd / bwd / AdamW s   ({args.steps} steps)")
    for r in runners:
        fwd, bwd, opt = r.median_parts()
        print(f"{r.name:<12} {r.params / 1e6:9.3f}M {med[r.name]:9.3f} {min(r.times):7.3f} {max(r.times):7.3f} "
              f"{b / med[r.name]:7.1f}   {fwd:.3f} / {bwd:.3f} / {opt:.3f}")
    print("differences: diffusers = GELU-tanh MLP (2 matrices), abs. sin-cos positions added once, one Linear "
          f"text input; ours-gelu = same MLP, {args.pos} positions, RMSNorm+scale+Linear text input; "
          "ours-swiglu = 3-matrix SwiGLU (1.5x MLP FLOPs, our default)")

    # the floor: what fraction of this CPU's matmul rate our step reaches by the FLOP model
    m, k, n = (image_tokens + text_tokens) * b, hidden, 4 * hidden
    print(f"matmul peak: torch.mm [{m}, {k}] x [{k}, {n}] = {peak.flops_per_s / 1e9:.1f} GFLOP/s "
          f"{str(dtype)[6:]} (best of {peak.calls}, sampled between the steps)")
    floor = {}
    for mlp, cfg in cfgs.items():
        flops = train_flops_per_image(cfg, lat * 8, lat * 8, text_tokens=text_tokens) * b
        achieved = flops / med[f"ours-{mlp}"]
        floor[mlp] = flops / peak.flops_per_s / med[f"ours-{mlp}"]
        print(f"floor ours-{mlp}: {flops / 1e9:.2f} GFLOP/step (flops.train_flops_per_image x batch) -> "
              f"{achieved / 1e9:.1f} GFLOP/s achieved = {achieved / peak.flops_per_s:.2f} of the matmul peak; "
              f"step at the peak {flops / peak.flops_per_s:.3f} s")
    if args.profile:
        profile_step(runners[0], target)
    if "ours-swiglu" in med:
        print(f"ours-swiglu / diffusers = {med['ours-swiglu'] / med['diffusers']:.3f}; "
              f"ours-swiglu / matmul floor = {floor['swiglu']:.3f}")
    print(f"floor={floor['gelu']:.3f}")
    print(f"ratio={med['ours-gelu'] / med['diffusers']:.3f}")


if __name__ == "__main__":
    main()
