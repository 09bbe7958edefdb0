"""bench/loader_throughput.py runs tiny on the CPU in seconds and its ratios follow from its own figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_loader_throughput_tiny_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "loader_throughput.py"), "--tiny", "--device", "cpu",
                          "--threads", "1", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / "loader_throughput.json").read_text())
    enc = res["encoders"]
    assert set(enc) == {f"{n}@{s}" for n in ("gemma-2-2b", "ModernBERT-large", "CLIP-L", "vae") for s in (256, 512)}
    assert {enc[f"{n}@256"]["class"]: enc[f"{n}@256"]["attention"] for n in ("gemma-2-2b", "ModernBERT-large",
            "CLIP-L")} == {"Gemma2Model": "eager", "ModernBertModel": "sdpa", "CLIPTextModelWithProjection": "sdpa"}
    assert "does not support 'sdpa'" in run.stdout + run.stderr  # the fallback is said, not silent
    # a rank-sized batch of realistic captions pads to (nearly) the longest allowed caption; CLIP stops at 77
    tokens = res["text_tokens"]["sd3_256"]
    assert 100 <= tokens["gemma-2-2b"]["padded"] <= 128 and tokens["CLIP-L"]["padded"] <= 77
    assert 0.4 < tokens["gemma-2-2b"]["real_fraction"] < 0.8
    assert enc["vae@512"]["pixels"] == 2 * enc["vae@256"]["pixels"]
    for name in ("sd3_256", "sd3_512"):
        side = {"sd3_256": 256, "sd3_512": 512}[name]
        loader = 1 / sum(1 / e["images_per_s"] for k, e in enc.items() if k.endswith(f"@{side}"))
        assert abs(res["loader_images_per_s"][name] - loader) < 1e-9 * loader
        model = res["model_rank"]["images_per_s"][name]
        assert res["ratio"][name] == model / loader > 0
        assert f"ratio {name}={res['ratio'][name]:.3f}" in run.stdout
    # a 512 px image costs the model ~4x the FLOPs of a 256 px one
    rates = res["model_rank"]["images_per_s"]
    assert 3 < rates["sd3_256"] / rates["sd3_512"] < 6
    assert "CPU figures on both sides" in run.stdout and "CPU" in res["model_rank"]["source"]


def test_model_rank_rate_taken_from_a_gpu_suite_json(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import loader_throughput as lt

    suite = tmp_path / "gpu_suite.json"
    suite.write_text(json.dumps({"variants": {"compiled flex ckpt=none": {"images_per_s": 300.0}}}))

    class Args:
        tiny, model_json = True, str(suite)

    results: dict = {}
    rates = lt.model_rank_rates(Args, lt.torch.device("cpu"), {"sd3_256": [128, 128], "sd3_512": [128, 128]},
                                results)
    assert rates["sd3_256"] == 300.0 and 3 < 300.0 / rates["sd3_512"] < 6
    assert "gpu_suite" in results["model_rank"]["source"]


def test_the_repa_teacher_is_timed_at_each_preset(tmp_path):
    """--repa: the teacher runs through the loader's VisionTeacher on the presets' token grids (tiny: 32 and 64 px,
    2 x 2 and 4 x 4 tokens) and its targets' wire bytes follow from the grid and width."""
    sys.path.insert(0, str(ROOT / "bench"))
    import loader_throughput as lt

    class Args:
        tiny, batch, warmup, steps = True, 2, 0, 1

    results: dict = {"encoders": {}}
    lt.time_teacher(Args, lt.torch.device("cpu"), lt.torch.float32, [256, 512], results)
    enc = results["encoders"]
    assert sorted(enc) == ["repa-dinov2-base@256", "repa-dinov2-base@512"]
    assert [enc[k]["wire_bytes_per_image"] for k in sorted(enc)] == [2 * 2 * 40 * 4, 4 * 4 * 40 * 4]
    assert all(e["images_per_s"] > 0 for e in enc.values())
