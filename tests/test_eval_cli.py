"""``python -m mmdit evaluate`` on tiny checkpoints: JSON, CSV and the plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from eval_ranks import eval_config, perturbed_model

from mmdit.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def run_dir(tiny_models, demo_data, tmp_path_factory):
    from mmdit.eval.tiny_extractors import build_tiny_extractors

    root = tmp_path_factory.mktemp("eval-cli")
    extractors = build_tiny_extractors(root / "extractors")
    cfg = eval_config(tiny_models, demo_data, extractors, loss_samples=16, num_images=8, num_timesteps=2)
    run = root / "run"
    for step, seed in ((10, 0), (20, 1)):
        state = perturbed_model(cfg, seed).state_dict()
        save_checkpoint(run, step, model_state=state, ema_state=state, optimizer_state=None, scheduler_state=None,
                        scaler_state=None, trainer_state={}, config=cfg, keep_last=0)
    return run, demo_data


def test_evaluate_writes_json_csv_and_plot(run_dir, capsys):
    from mmdit.__main__ import main

    run, demo = run_dir
    main(["evaluate", "--checkpoint", str(run), "--all_steps", "--eval_set", demo["phase"], "--index", demo["index"],
          "--weights", "both", "--num_images", "8"])
    rows = [json.loads((run / "eval" / f"step_{s:08d}_{w}.json").read_text())
            for s in (10, 20) for w in ("ema", "model")]
    assert [(r["step"], r["weights"]) for r in rows] == [(10, "ema"), (10, "model"), (20, "ema"), (20, "model")]
    for r in rows:
        assert r["val/loss"] > 0 and r["eval/fd_dinov2"] > 0 and 0 <= r["eval/clip_score"] <= 100
        assert r["eval/fd_num_images"] == 8 and r["eval/cmmd"] > 0  # N beside every FD; CMMD beside it
    assert rows[0]["val/loss"] == rows[1]["val/loss"] != rows[2]["val/loss"]  # ema == model weights here
    with open(run / "eval" / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and float(table[2]["val/loss"]) == rows[2]["val/loss"]
    cached = sorted(p.name.split("_")[0] for p in (Path(demo["phase"]) / "eval_stats").glob("*.safetensors"))
    assert cached == ["cmmd", "fd"]  # real statistics / embeddings cached beside it
    main(["evaluate", "--plot", str(run)])
    png = run / "eval" / "metrics.png"
    assert png.is_file() and png.stat().st_size > 1000
    from PIL import Image

    assert Image.open(png).size[0] >= 900  # three panels


def test_evaluate_without_arguments_names_the_fix():
    from mmdit.eval.evaluate import main

    with pytest.raises(SystemExit):
        main(["--checkpoint", "x"])
