"""Training metrics: always a local JSON-lines file in the run folder, optionally wandb, and progress lines."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

T_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


class LossByT:
    """Mean velocity MSE per timestep bin since the last report (where the model struggles).

    Sums stay on the training device (no host sync per micro-step); :meth:`report` reads them once.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
        self.sums = torch.zeros(len(T_BINS) - 1, dtype=dtype, device=device)
        self.counts = torch.zeros(len(T_BINS) - 1, dtype=dtype, device=device)
        self.edges = torch.tensor(T_BINS[1:-1], device=device)

    def add(self, t: torch.Tensor, per_sample: torch.Tensor) -> None:
        bins = torch.bucketize(t.detach().float(), self.edges)
        self.sums.index_add_(0, bins, per_sample.detach().to(self.sums.dtype))
        self.counts.index_add_(0, bins, torch.ones_like(bins, dtype=self.counts.dtype))

    def report(self) -> dict[str, float]:
        sums, counts = self.sums.tolist(), self.counts.tolist()
        out = {f"loss_t{T_BINS[i]:.2f}-{T_BINS[i + 1]:.2f}": sums[i] / counts[i]
               for i in range(len(sums)) if counts[i] > 0}
        self.sums.zero_()
        self.counts.zero_()
        return out


class MetricsLogger:
    """Writes one JSON line per report to ``<run>/metrics.jsonl``; mirrors to wandb when enabled."""

    def __init__(self, run_dir: Path, wandb_mode: str, project: str, run_name: str, config: dict,
                 wandb_id: str | None, total_steps: int, start_step: int):
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a")
        self.total, self.start = total_steps, start_step
        self.t0 = time.perf_counter()
        self.tty = sys.stdout.isatty()
        self.wandb = None
        self.wandb_id = wandb_id
        if wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=project, name=run_name, id=wandb_id, resume="allow", mode=wandb_mode,
                                    config=config, dir=str(run_dir))
            self.wandb_id = self.wandb.id
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)

    def log(self, step: int, values: dict) -> None:
        record = {"step": step, "time_s": round(time.perf_counter() - self.t0, 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        summary = " ".join(f"{k}={v:.4g}" for k, v in values.items() if k in ("loss", "lr", "grad_norm",
                                                                            "images_per_s", "data_wait_frac",
                                                                            "mfu"))
        if self.bar is not None:
            self.bar.set_postfix_str(summary, refresh=False)
        else:
            print(f"step {step}/{self.total} {summary}", flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log_images(self, step: int, key: str, images: list) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: [wandb.Image(img) for img in images]}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
