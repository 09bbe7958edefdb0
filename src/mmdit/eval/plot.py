"""Plot a run's metrics against steps: the in-loop ones (``<run>/metrics.jsonl``) and ``evaluate``'s
(``<run>/eval/metrics.jsonl``), one panel per metric (training loss, validation loss, FD_DINOv2, CMMD, FD in
EfficientNet-Lite0 features, CLIP score, the shapes scorer's accuracies), raw and EMA weights as separate lines."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

PANELS = ("train_loss", "loss", "fd_dinov2", "cmmd", "fd_effnet_lite0", "clip_score", "shapes")
TITLES = {"train_loss": "training loss (log)", "loss": "validation loss (log)",
          "fd_dinov2": "FD_DINOv2 (lower is better)", "cmmd": "CMMD (lower is better)",
          "fd_effnet_lite0": "FD, EfficientNet-Lite0 (lower is better)",
          "clip_score": "CLIP score", "shapes": "shapes scorer accuracy"}
SHAPE_LINES = ("colour", "shape", "position", "size", "background", "all")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def collect(run_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """panel -> line label -> [(step, value)] from both metric files (later rows win on equal steps)."""
    series: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in _records(run_dir / "metrics.jsonl"):  # the training loop: loss, val/<w>/loss, eval/fd_dinov2, ...
        for key, value in row.items():
            parts = key.split("/")
            if key == "loss":
                series["train_loss"]["training"][row["step"]] = value
            elif parts[0] == "val" and len(parts) == 3 and parts[2] == "loss":
                series["loss"][f"{parts[1]} (in loop)"][row["step"]] = value
            elif parts[:2] == ["eval", "shapes"] and parts[-1] in SHAPE_LINES:
                series["shapes"][parts[-1]][row["step"]] = value
            elif parts[0] == "eval" and parts[-1] in PANELS:
                series[parts[-1]]["ema (in loop)"][row["step"]] = value
    for row in _records(run_dir / "eval" / "metrics.jsonl"):  # python -m mmdit evaluate
        for panel, key in (("loss", "val/loss"), ("fd_dinov2", "eval/fd_dinov2"), ("cmmd", "eval/cmmd"),
                           ("clip_score", "eval/clip_score")):
            if key in row:
                series[panel][f"{row['weights']} (evaluate)"][row["step"]] = row[key]
        for name in SHAPE_LINES:
            if f"eval/shapes/{name}" in row:
                series["shapes"][f"{name} ({row['weights']}, evaluate)"][row["step"]] = row[f"eval/shapes/{name}"]
    return {p: {label: sorted(points.items()) for label, points in lines.items()} for p, lines in series.items()}


def plot_run(run_dir: Path, out: Optional[Path] = None, title: Optional[str] = None) -> Path:
    """Write the PNG (default ``<run>/eval/metrics.png``) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = collect(run_dir)
    panels = [p for p in PANELS if p in series]
    if panels == ["train_loss"] or not panels:
        raise FileNotFoundError(f"no evaluation metrics in {run_dir}/metrics.jsonl or {run_dir}/eval/metrics.jsonl; "
                                "run python -m mmdit evaluate --checkpoint <run> --eval_set <folder> first")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, points in sorted(series[panel].items()):
            dense = len(points) > 40  # the training loss: a line, no markers
            ax.plot([s for s, _ in points], [v for _, v in points], marker=None if dense else "o", ms=3, label=label,
                    lw=2.2 if label.startswith("all") else 1.2)
        if panel in ("train_loss", "loss"):
            ax.set_yscale("log")  # the first hundreds of steps fall 10-30x; the slow tail is what matters
        ax.set_title(TITLES[panel])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or run_dir.name)
    fig.tight_layout()
    out = out or run_dir / "eval" / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
