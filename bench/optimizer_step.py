"""What Muon costs per optimizer step next to AdamW, beside one training micro-step of the same model.

    python bench/optimizer_step.py                          # the CPU demo model (configs/tiny.yaml), batch 32
    python bench/optimizer_step.py --config sd3_256 --batch 0 --device cuda   # optimizer steps only

``torch.optim.Muon`` runs Newton-Schulz in bf16 on every block matrix, one matrix at a time; on a CPU
without bf16 matmul units that dominates. Prints the median of ``--repeats`` timed steps after one warm-up
(CPU seconds of this process on a CPU, wall seconds on a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from mmdit.conditioning import TextCondition  # noqa: E402
from mmdit.config import load_config  # noqa: E402
from mmdit.flow import flow_loss  # noqa: E402
from mmdit.model import MMDiT  # noqa: E402
from mmdit.train.optim import make_optimizer  # noqa: E402


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn``: wall clock on a GPU, this process's CPU time (all threads) on a CPU, which a
    shared host's other jobs disturb less."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--batch", type=int, default=32, help="micro-step batch to time beside (0: skip)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    model = MMDiT(cfg.model).to(device)
    report: dict = {"config": args.config, "threads": torch.get_num_threads()}
    for kind in ("adamw", "muon"):
        cfg.train.optimizer = kind
        opt = make_optimizer(model, cfg.train)
        for q in model.parameters():
            q.grad = torch.randn_like(q) * 1e-3
        report[f"{kind}_step_s"] = round(timed(opt.step, args.repeats, device), 4)
        if kind == "muon":
            report["muon_matrices"] = len(opt.muon.param_groups[0]["params"])
    if args.batch:
        res, m = cfg.model.max_res, cfg.model
        x0 = torch.randn(args.batch, m.in_channels, res // m.latent_factor, res // m.latent_factor, device=device)
        cond = TextCondition([torch.randn(args.batch, 16, d, device=device) for d in m.text_dims],
                             [torch.ones(args.batch, 16, dtype=torch.bool, device=device) for _ in m.text_dims],
                             torch.randn(args.batch, m.pooled_dim, device=device) if m.pooled_dim else None)
        t = torch.rand(args.batch, device=device)

        def micro_step() -> None:
            loss, _ = flow_loss(model, x0, cond, t, torch.randn_like(x0))
            loss.backward()

        report["forward_backward_s"] = round(timed(micro_step, args.repeats, device), 4)
    report["muon_over_adamw_step"] = round(report["muon_step_s"] / report["adamw_step_s"], 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
