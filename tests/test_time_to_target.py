"""Time to a target validation loss (MLPerf rule) from a synthetic run's metrics.jsonl, resumed once."""

from __future__ import annotations

import json

import pytest

from mmdit.eval.time_to_target import run_wall_clock, time_to_target


def _run(tmp_path):
    """Two processes: the first logs to step 20 (time_s up to 200), the resumed one from step 20 again."""
    rows = [
        {"step": 10, "time_s": 100.0, "loss": 0.9},
        {"step": 10, "time_s": 104.0, "val/ema/loss": 0.50, "val/model/loss": 0.40, "images_seen": 320},
        {"step": 20, "time_s": 200.0, "loss": 0.7},
        {"step": 20, "time_s": 30.0, "loss": 0.6},  # resumed: a new process, its clock from 0
        {"step": 30, "time_s": 90.0, "val/ema/loss": 0.31, "val/model/loss": 0.29, "images_seen": 960},
        {"step": 40, "time_s": 150.0, "val/ema/loss": 0.20, "images_seen": 1280},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_first_evaluation_at_or_below_the_target(tmp_path):
    rows = _run(tmp_path)
    assert run_wall_clock(rows) == [100.0, 104.0, 200.0, 230.0, 290.0, 350.0]
    hit = time_to_target(rows, 0.31)
    assert (hit.step, hit.images_seen, hit.wall_clock_s, hit.value) == (30, 960, 290.0, 0.31)  # "at or below"
    assert time_to_target(rows, 0.45, key="val/model/loss").step == 10
    assert time_to_target(rows, 0.1) is None
    assert time_to_target([{"step": 5, "time_s": 1.0, "val/ema/loss": 0.1}], 0.2).images_seen is None


def test_evaluate_cli_prints_it(tmp_path, capsys):
    from mmdit.__main__ import main

    _run(tmp_path)
    main(["evaluate", "--time_to_target", str(tmp_path), "--target", "0.25"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("time to val/ema/loss <= 0.25: step 40, 1,280 images seen, 350.0 s")
    assert json.loads(out[1])["step"] == 40
    main(["evaluate", "--time_to_target", str(tmp_path), "--target", "0.05"])
    assert "not reached (best 0.2 at step 40)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["evaluate", "--time_to_target", str(tmp_path)])  # no --target: an argparse error
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        main(["evaluate", "--time_to_target", str(tmp_path / "nothing"), "--target", "1"])
