"""DDP vs FSDP2 on the CPU (gloo, 2 model ranks): model-state memory per rank and step time (issue 17).

    python bench/parallel.py                     # tiny preset (configs/tiny.yaml model), 10 timed steps
    python bench/parallel.py --depth 8 --steps 5 # a deeper variant of it

Each mode runs under torchrun in its own job. A step is the trainer's: forward, flow MSE, backward (DDP
all-reduce / FSDP reduce-scatter), clip, AdamW, EMA update, on fixed random latents and text. Memory per
rank is counted from the tensors each rank holds (weights, gradients, AdamW moments, EMA: local shards
under FSDP), plus the process's peak RSS for what the counting misses; the CPU has no allocator peak like
CUDA's. The ratios are what carry over to GPUs, not the absolute figures (2 shared cores here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from mmdit.conditioning import TextCondition
    from mmdit.config import load_config
    from mmdit.model import MMDiT
    from mmdit.train.optim import EMA, make_optimizer
    from mmdit.train.parallel import ParallelModel, ShardedEMA
    from mmdit.train.runtime import Runtime
    from mmdit.train.topology import build_topology

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config("tiny", [f"model.depth={args.depth}", "model.in_channels=16", "model.latent_factor=8",
                               "model.patch_size=2", "model.max_res=128", "model.max_res_orig=128",
                               "encoders.vae=unused"])
    rt = Runtime(rank, world, rank, torch.device("cpu"), build_topology(cfg.topology, world, world),
                 dist.group.WORLD, dist.new_group(list(range(world))))
    torch.manual_seed(0)
    model = MMDiT(cfg.model)
    if args.mode == "fsdp":
        parallel = ParallelModel(model, "fsdp", rt)
        ema = ShardedEMA(model)
        ema_tensors = list(ema.state_dict().values())
    else:
        ema = EMA(model)
        ema_tensors = list(ema.model.parameters())
        parallel = ParallelModel(model, "ddp", rt)
    opt = make_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(rank)
    b, side = args.batch, cfg.model.max_res // cfg.model.latent_factor
    x = torch.randn(b, 16, side, side, generator=g)
    cond = TextCondition([torch.randn(b, 16, d, generator=g) for d in cfg.model.text_dims],
                         [torch.ones(b, 16, dtype=torch.bool) for _ in cfg.model.text_dims],
                         torch.randn(b, cfg.model.pooled_dim, generator=g))
    t, target = torch.rand(b, generator=g), torch.randn(b, 16, side, side, generator=g)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(parallel.net(x, t, cond), target)
        loss.backward()
        parallel.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep gradients allocated: counted below
        ema.update(model, 0.999)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    params = list(model.parameters())
    state = {"weights": local_bytes(params), "gradients": local_bytes(p.grad for p in params),
             "adamw": local_bytes(v for s in opt.state.values() for v in s.values() if v.dim() > 0),
             "ema": local_bytes(ema_tensors)}
    out = {"mode": args.mode, "rank": rank, "params": sum(p.numel() for p in MMDiT(cfg.model).parameters()),
           "step_s": statistics.median(times), "state_bytes": state, "state_total": sum(state.values()),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(args.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for mode in ("ddp", "fsdp"):
        result = out / f"parallel_{mode}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--worker", "--mode", mode, "--result", str(result), "--depth", str(args.depth), "--batch",
               str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        rows[mode] = [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in (0, 1)]
    lines = [f"tiny preset model, depth {args.depth}, {rows['ddp'][0]['params']:,} params, batch {args.batch}/rank, "
             "2 ranks on gloo (CPU)",
             f"{'mode':<5} {'state MiB/rank':>14} {'weights':>8} {'grads':>8} {'adamw':>8} {'ema':>8} {'rss MiB':>8} "
             f"{'step s':>7}"]
    for mode, ranks in rows.items():
        r = ranks[0]
        s = {k: v / 2**20 for k, v in r["state_bytes"].items()}
        lines.append(f"{mode:<5} {r['state_total'] / 2**20:14.2f} {s['weights']:8.2f} {s['gradients']:8.2f} "
                     f"{s['adamw']:8.2f} {s['ema']:8.2f} {max(x['peak_rss_mib'] for x in ranks):8.0f} "
                     f"{max(x['step_s'] for x in ranks):7.3f}")
    d, f = rows["ddp"][0], rows["fsdp"][0]
    lines.append(f"fsdp/ddp: state per rank {f['state_total'] / d['state_total']:.2f}, "
                 f"step time {max(x['step_s'] for x in rows['fsdp']) / max(x['step_s'] for x in rows['ddp']):.2f}")
    (out / "parallel.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
