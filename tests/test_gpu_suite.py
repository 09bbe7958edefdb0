"""bench/gpu_suite.sh runs end to end on the CPU (--tiny), so the GPU suite cannot rot between GPU loans."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_runs_tiny_on_cpu_and_writes_every_entry(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--device", "cpu", "--tiny"], env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert (tmp_path / "gpu_suite.txt").read_text().splitlines()[-1].startswith("total")
    assert results["tiny"] and results["batch"] == 2 and set(results["matmul_flops"]) == {"qkv", "mlp_up", "mlp_down"}
    assert results["text_lengths_trimmed"] and 0 < results["text_real_fraction"] <= 1
    measured = {"compiled sdpa-masked ckpt=none", "eager sdpa-masked ckpt=none", "eager sdpa-unmasked ckpt=none",
                "diffusers SD3 eager (unmasked)"}
    assert measured <= set(results["variants"]), results["skipped"]
    for label in measured:
        v = results["variants"][label]
        assert v["step_s"] > 0 and v["images_per_s"] == 2 / v["step_s"] and v["hfu"] >= v["mfu"] > 0, label
    every = set(results["variants"]) | set(results["skipped"])
    assert len(every) == 10 and all(results["skipped"].values())  # each skip says why
    assert "no backward on the CPU" in results["skipped"]["eager flex ckpt=none"]
    # step 2 (issue 14): one loader's encoders against the model step, in the same output folder
    loader = json.loads((tmp_path / "loader_throughput.json").read_text())
    assert loader["tiny"] and set(loader["ratio"]) == {"sd3_256", "sd3_512"} and all(loader["ratio"].values())
    assert "ratio sd3_256=" in run.stdout
    rung = results["sd3_2b"]  # issue 17: the scaling-ladder step next to the memory estimate
    assert rung["step_s"] > 0 and rung["depth"] == 2 and rung["estimate_gib"] > 0
