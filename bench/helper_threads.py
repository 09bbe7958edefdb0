"""What one parallel torch op in a background thread costs the training step on the CPU (issue 24's speed gap).

    python bench/helper_threads.py [--steps 150] [--threads 2]

The demo's step in a tight loop (``bench/demo_recipe.py --time_only``), each case in a fresh process (an
OpenMP team, once made, stays for the life of its thread):

- ``alone``: no other thread;
- ``bare thread``: a plain ``threading.Thread`` that does one parallel op (a 300k-element multiply) every
  0.2 s, as the data thread did with each batch;
- ``mmdit.threads``: the same thread started by ``mmdit.threads.start_thread`` (one intra-op thread).

Prints images/s and each case's ratio to ``alone``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, threading, time
sys.path[:0] = [{bench!r}, {src!r}]
import torch
from mmdit.threads import start_thread
torch.set_num_threads({threads})
case = {case!r}

def busy():
    x = torch.randn(300_000)
    while True:
        x * 2.0  # a parallel region in this thread (more elements than at::parallel_for's grain)
        time.sleep(0.2)

if case == "bare thread":
    threading.Thread(target=busy, daemon=True).start()
elif case == "mmdit.threads":
    start_thread(busy, "busy")
time.sleep(0.5)
import demo_recipe
demo_recipe.main(["--time_only", "train.total_steps={steps}"])
"""


def run(case: str, steps: int, threads: int) -> float:
    code = CHILD.format(bench=str(ROOT / "bench"), src=str(ROOT / "src"), threads=threads, case=case, steps=steps)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    line = next(ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{"))
    return float(json.loads(line)["images_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="steps per case (the first 20 are not timed)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    results = {}
    for case in ("alone", "bare thread", "mmdit.threads"):
        results[case] = run(case, args.steps, args.threads)
        print(json.dumps({"case": case, "images_per_s": results[case],
                          "ratio_to_alone": round(results[case] / results["alone"], 3)}), flush=True)


if __name__ == "__main__":
    main()
