"""Data streaming (issue 5): how much of each step model ranks wait for data, and what a batch costs to send.

    python bench/streaming.py                                   # tiny_latent, 1 loader + 2 model ranks, CPU
    python bench/streaming.py --model_ranks 1 --steps 40 --batch 4
    python bench/streaming.py --preset tiny --model_ranks 1     # the demo: pixel space, MiniLM, 1 + 1 ranks

Three parts, all on the CPU with gloo:

1. A real training run in the demo topology: ``torchrun`` of ``src/train.py`` with 1 loader rank (rank 0:
   reads, decodes, text-encodes and VAE-encodes) streaming to ``--model_ranks`` model ranks, on the shapes
   demo data and tiny random-weight encoders + VAE built by the same functions as the test fixtures
   (``make_demo_dataset`` -> ``create_phase`` at the preset's max_res -> ``create_indices``;
   ``ensure_tiny_models``); ``tiny`` is the demo recipe (pixel space, MiniLM for tokens and pooled vector).
   From the run's ``metrics.jsonl`` (one record per step): ``data_wait_frac``, ``images_per_s``,
   ``tokens_per_s``; from ``summary_rank*.json``: each model rank's total ``data_wait_s``; from the loader's
   log: its encode time and time spent waiting for model ranks to take batches.
2. The transport alone: two gloo ranks of their own (``torch.multiprocessing``) time ``send_batch`` /
   ``recv_batch`` of a representative batch of the run's shapes and of the sd3_256 preset's per-GPU batch
   (140 images, bf16 Gemma + ModernBERT tokens): header one-way latency, header + payload one-way time
   (ping-pong minus the header's), and the time per batch when streaming back to back as the loader does
   (each send waits for the previous one to that rank; the receiver posts the payload receives only after
   the header has arrived, so small batches pay per-message protocol latency here, not bandwidth).
3. The FLOP model's figure for the 1.2B preset at 256 px (``train_flops_per_image``, 256 text tokens).

The steady-state window skips the first ``--skip`` steps (process start, first batches, allocator warm-up).
Also: bytes per image on the wire against the unpadded payload (target <= 1.1x), with realistic caption
lengths. The LAST line is ``data_wait_frac=<steady-state mean of the first model rank's per-step wait
fraction>``, the one before it ``wire_ratio_sd3_256=<wire bytes / unpadded bytes of the sd3_256 batch>``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from captions import padded_condition  # noqa: E402

from mmdit.config import load_config  # noqa: E402


# ---------------------------------------------------------------------------------------------- demo inputs
def build_demo_data(root: Path, rows: int, resolution: int) -> dict:
    """The test fixture's data: raw shapes shards -> bucketed phase at the preset's max_res -> bucket index.

    Reused when already there (keyed by rows and resolution).
    """
    from mmdit.data.demo_dataset import make_demo_dataset
    from mmdit.data.indices import create_indices
    from mmdit.data.phase import create_phase

    tag = f"{rows}rows_{resolution}px"
    raw, phase, index = root / f"raw{rows}", root / f"phase_{tag}", root / f"index_{tag}.npz"
    if not index.exists():
        if not raw.exists():
            make_demo_dataset(raw, num_rows=rows, rows_per_shard=80, seed=0)
        create_phase(raw, phase, max_resolution=resolution, progress=False)
        create_indices(phase, index)
    return {"phase": str(phase), "index": str(index)}


def run_overrides(args, data: dict, tiny: dict | None, save_dir: Path) -> list[str]:
    models = list(range(1, args.model_ranks + 1))
    values = {
        "data.parquet_folder": data["phase"], "data.bucket_indices_path": data["index"],
        "data.batch_size": args.batch, "data.num_workers": args.num_workers,
        "train.save_dir": save_dir, "train.total_steps": args.steps, "train.log_every": 1,
        "train.save_every": 100000, "train.warmup_steps": 0, "train.precision": "fp32",
        "topology.loader_to_model": f"{{0: {models}}}",
    }
    if tiny is not None:  # tiny_latent: the fixtures' tiny Gemma2 / ModernBERT / CLIP / VAE
        values.update({"encoders.text.0.name": tiny["gemma2"], "encoders.text.1.name": tiny["modernbert"],
                       "encoders.text.2.name": tiny["clip"], "encoders.vae": tiny["vae"]})
    return [f"{k}={v}" for k, v in values.items()]


def run_training(args, overrides: list[str]) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(1 + args.model_ranks),
           "--standalone", str(ROOT / "src" / "train.py"), "--config", args.preset, *overrides]
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        sys.exit(f"training run failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return wall, result.stdout + result.stderr


def loader_stats(log_text: str) -> dict:
    match = re.search(r"loader rank 0 done: (\{.*\})", log_text)
    return ast.literal_eval(match.group(1)) if match else {}


# ---------------------------------------------------------------------------------------------- transport
def representative_batch(spec: dict):
    from mmdit.train.transport import Batch

    b, g = spec["batch"], torch.Generator().manual_seed(0)
    latents = torch.randn(b, spec["channels"], spec["side"], spec["side"], generator=g).to(spec["latent_dtype"])
    tokens = [torch.randn(b, n, d, generator=g).to(spec["text_dtype"]) for n, d in spec["text"]]
    pooled = torch.randn(b, spec["pooled"], generator=g).to(spec["text_dtype"]) if spec["pooled"] else None
    cond = padded_condition(tokens, pooled, g)  # realistic caption lengths, trimmed as the loader trims
    return Batch(0, torch.arange(b), latents, cond)


def batch_spec(cfg, batch: int, text_dtype: torch.dtype, latent_dtype: torch.dtype) -> dict:
    m = cfg.model
    seq = [e for e in cfg.encoders.text if e.kind == "sequence"]
    return {"batch": batch, "channels": m.in_channels, "side": m.max_res // m.latent_factor,
            "text": [(e.max_length, d) for e, d in zip(seq, m.text_dims)], "pooled": m.pooled_dim,
            "text_dtype": text_dtype, "latent_dtype": latent_dtype}


def payload_bytes(batch) -> int:
    """Bytes on the wire for one batch: the header and every tensor send_batch sends."""
    from mmdit.train.transport import HEADER_SIZE, _payload

    return 8 * HEADER_SIZE + sum(t.numel() * t.element_size() for t in _payload(batch))


def unpadded_bytes(batch) -> int:
    """The floor: sample ids, latents, the real text tokens and the pooled vector, no header, no padding."""
    cond = batch.cond
    size = batch.sample_ids.numel() * 8 + batch.latents.numel() * batch.latents.element_size()
    size += sum(int(m.sum()) * t.shape[2] * t.element_size() for t, m in zip(cond.tokens, cond.masks))
    return size + (0 if cond.pooled is None else cond.pooled.numel() * cond.pooled.element_size())


def padded_bytes(batch, spec: dict) -> int:
    """What the seed sent: text padded to max_length."""
    text = sum(batch.size * n * d for n, d in spec["text"]) * torch.tensor([], dtype=spec["text_dtype"]).element_size()
    return unpadded_bytes(batch) - sum(int(m.sum()) * t.shape[2] * t.element_size()
                                       for t, m in zip(batch.cond.tokens, batch.cond.masks)) + text


def _transport_worker(rank: int, init_file: str, specs: list, reps: list, out_file: str) -> None:
    import torch.distributed as dist

    from mmdit.train.transport import HEADER_SIZE, recv_batch, send_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    group, peer = dist.group.WORLD, 1 - rank
    ack = torch.zeros(HEADER_SIZE, dtype=torch.int64)  # header-sized, so the ack costs what a header does
    results = []
    for spec, n in zip(specs, reps):
        batch = representative_batch(spec) if rank == 0 else None
        # header ping-pong: one-way latency of a header-sized message
        pings = []
        for i in range(n + 3):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(ack, dst=peer)
                dist.recv(ack, src=peer)
            else:
                dist.recv(ack, src=peer)
                dist.send(ack, dst=peer)
            if i >= 3:
                pings.append(time.perf_counter() - t0)
        # batch ping-pong: rank 0 sends header + payload, rank 1 answers with a header-sized ack
        trips = []
        for i in range(n + 1):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                for work in send_batch(batch, peer, group):
                    work.wait()
                dist.recv(ack, src=peer)
            else:
                recv_batch(peer, group)
                dist.send(ack, dst=peer)
            if i >= 1:
                trips.append(time.perf_counter() - t0)
        # streaming: back to back, each send waits for the previous one's works (what run_loader does)
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            pending: list = []
            for _ in range(n):
                for work in pending:
                    work.wait()
                pending = send_batch(batch, peer, group)
            for work in pending:
                work.wait()
        else:
            for _ in range(n):
                recv_batch(peer, group)
        streamed = (time.perf_counter() - t0) / n
        header_one_way = statistics.median(pings) / 2
        results.append({"header_one_way_s": header_one_way,
                        "batch_one_way_s": statistics.median(trips) - header_one_way,
                        "streamed_per_batch_s": streamed})
    if rank == 1:  # the receiver's clock: its stream timing ends when the last batch has arrived
        Path(out_file).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def measure_transport(specs: list, reps: list, workdir: Path) -> list[dict]:
    import torch.multiprocessing as mp

    init_file, out_file = workdir / "transport.init", workdir / "transport.json"
    init_file.unlink(missing_ok=True)
    mp.spawn(_transport_worker, args=(str(init_file), specs, reps, str(out_file)), nprocs=2, join=True)
    return json.loads(out_file.read_text())


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny_latent", choices=["tiny_latent", "tiny"])
    p.add_argument("--model_ranks", type=int, default=2, choices=[1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the steady-state figures")
    p.add_argument("--batch", type=int, default=0,
                   help="per model rank (data.batch_size); 0 = the preset's (32 for tiny and tiny_latent)")
    p.add_argument("--num_workers", type=int, default=1, help="loader read/decode threads (data.num_workers)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank")
    p.add_argument("--rows", type=int, default=600,
                   help="demo dataset rows (the fixture has 240; more keep buckets above one global batch of 32s)")
    p.add_argument("--transport_reps", type=int, default=20)
    p.add_argument("--workdir", default="", help="keep data, tiny models and the run here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    if args.skip >= args.steps:
        p.error("--skip must be smaller than --steps")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mmdit-streaming-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    preset = load_config(args.preset)
    args.batch = args.batch or preset.data.batch_size
    data = build_demo_data(workdir / "data", args.rows, preset.model.max_res)
    tiny = None
    if args.preset == "tiny_latent":
        from mmdit.encoders.tiny import ensure_tiny_models

        tiny = ensure_tiny_models(workdir / "models")
    prep = time.perf_counter() - t0
    save_dir = workdir / f"runs-{time.strftime('%H%M%S')}"
    overrides = run_overrides(args, data, tiny, save_dir)
    cfg = load_config(args.preset, overrides)
    wall, log_text = run_training(args, overrides)

    run_dir = save_dir / cfg.train.run_name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summaries = {int(f.stem.split("rank")[1]): json.loads(f.read_text()) for f in run_dir.glob("summary_rank*.json")}
    loader = loader_stats(log_text)
    steady = [r for r in records if r["step"] > args.skip]
    med = {k: statistics.median(r[k] for r in steady) for k in ("images_per_s", "tokens_per_s", "data_wait_frac")}
    wait_frac = statistics.fmean(r["data_wait_frac"] for r in steady)
    run_s = records[-1]["time_s"]

    print(f"streaming benchmark: preset={args.preset} torchrun 1 loader rank + {args.model_ranks} model rank(s), "
          f"gloo on CPU, OMP_NUM_THREADS={args.threads}, batch {args.batch} per model rank, {args.steps} steps "
          f"(steady state = steps {args.skip + 1}..{args.steps}); data + tiny models {prep:.1f} s, run {wall:.1f} s")
    print(f"model: depth={cfg.model.depth} hidden={cfg.model.dim} patch={cfg.model.patch_size} "
          f"in_channels={cfg.model.in_channels} text_dims={list(cfg.model.text_dims)} pooled={cfg.model.pooled_dim}")
    print()
    print(f"{'step':>5} {'time_s':>8} {'images/s':>9} {'tokens/s':>9} {'data_wait_frac':>15}")
    for r in records:
        print(f"{r['step']:>5} {r['time_s']:8.2f} {r['images_per_s']:9.1f} {r['tokens_per_s']:9.0f} "
              f"{r['data_wait_frac']:15.3f}")
    print()
    print(f"steady state (median over steps): images/s {med['images_per_s']:.1f}  tokens/s "
          f"{med['tokens_per_s']:.0f}  data_wait_frac median {med['data_wait_frac']:.3f} mean {wait_frac:.3f}")
    for rank, s in sorted(summaries.items()):
        print(f"model rank {rank}: data_wait_s {s['data_wait_s']:.2f} over the whole run "
              f"(= {s['data_wait_s'] / run_s:.2f} of the {run_s:.1f} s the first model rank logged, start included)")
    if loader:
        print(f"loader rank 0: encode_s {loader['encode_s']:.2f}, waiting for model ranks to take batches "
              f"{loader['wait_for_model_s']:.2f} s (loader_wait_frac {loader['loader_wait_frac']:.2f}), "
              f"corrupt {loader['corrupt']}")

    # the transport alone, at the run's shapes and at the 1.2B preset's per-GPU batch
    sd3 = load_config("sd3_256")
    run_spec = batch_spec(cfg, args.batch, torch.float32, torch.float32)  # CPU encoders: fp32
    big_spec = batch_spec(sd3, sd3.data.batch_size, torch.bfloat16, torch.bfloat16)  # GPU loaders: bf16
    specs = [run_spec, big_spec]
    batches = [representative_batch(s) for s in specs]
    sizes = [payload_bytes(b) for b in batches]
    results = measure_transport(specs, [args.transport_reps, max(3, args.transport_reps // 5)], workdir)
    print()
    print("transport (send_batch -> recv_batch, 2 gloo ranks on this machine, medians):")
    print(f"{'batch':<44} {'bytes':>11} {'header 1-way':>13} {'hdr+payload 1-way':>18} {'streamed/batch':>15} "
          f"{'MB/s':>7}")
    names = [f"run: {args.batch} x {run_spec['side']}x{run_spec['side']} latent, text {run_spec['text']}",
             f"sd3_256: {big_spec['batch']} x {big_spec['side']}x{big_spec['side']}, text {big_spec['text']} bf16"]
    for name, size, r in zip(names, sizes, results):
        print(f"{name:<44} {size:>11,} {r['header_one_way_s'] * 1e3:10.3f} ms {r['batch_one_way_s'] * 1e3:15.3f} ms "
              f"{r['streamed_per_batch_s'] * 1e3:12.3f} ms {size / r['streamed_per_batch_s'] / 1e6:7.0f}")
    print()
    print("bytes per image on the wire (realistic caption lengths, bench/captions.py) vs the unpadded payload:")
    for name, batch, spec, size in zip(names, batches, specs, sizes):
        floor, padded = unpadded_bytes(batch) / batch.size, padded_bytes(batch, spec) / batch.size
        print(f"  {name:<44} wire {size / batch.size:>10,.0f} B  unpadded {floor:>10,.0f} B  ratio "
              f"{size / batch.size / floor:.3f}  (padded to max_length: {padded:>10,.0f} B, {padded / floor:.2f}x)")
    with_repa = representative_batch(big_spec)  # + REPA targets: DINOv2-base (768-d, bf16) on the token grid
    with_repa.repa = torch.zeros(with_repa.size, (256 // sd3.model.pixel_step) ** 2, 768, dtype=torch.bfloat16)
    repa_bytes = payload_bytes(with_repa)
    print(f"  {'sd3_256 + train.repa (DINOv2-base, bf16)':<44} wire {repa_bytes / with_repa.size:>10,.0f} B  "
          f"({repa_bytes / sizes[1]:.2f}x the batch without)")
    step_s = args.batch * args.model_ranks / med["images_per_s"]
    send_frac = results[0]["streamed_per_batch_s"] * args.model_ranks / step_s
    print(f"run: the loader's sends of one step's {args.model_ranks} batch(es) take {send_frac:.3f} of a steady step "
          f"({step_s * 1e3:.0f} ms), in the background of the model ranks' compute")

    from mmdit.model.flops import train_flops_per_image

    flops = train_flops_per_image(sd3.model, 256, 256, text_tokens=256)
    print()
    print(f"FLOP model, sd3_256 (depth {sd3.model.depth}, {sd3.model.mlp_type}) at 256 px with 256 text tokens: "
          f"train_flops_per_image = {flops:.4e} FLOP ({flops / 1e12:.3f} TFLOP per image, fwd + bwd)")
    per_loader = -(-(8 - sd3.topology.loaders_per_node) // sd3.topology.loaders_per_node)  # 8-GPU nodes
    micro = flops * big_spec["batch"]
    print(f"  one sd3_256 micro-batch ({big_spec['batch']} images) = {micro / 1e12:.0f} TFLOP = "
          f"{micro / (0.4 * 989e12):.3f} s on an H100 at 40% of its 989 TFLOP/s bf16 peak; its loader "
          f"(loaders_per_node={sd3.topology.loaders_per_node} -> {per_loader} model GPUs each) sends {per_loader} x "
          f"{sizes[1] / 1e6:.0f} MB per micro-step = {per_loader * results[1]['streamed_per_batch_s']:.3f} s at the "
          "rate measured above")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"wire_ratio_sd3_256={sizes[1] / unpadded_bytes(batches[1]):.3f}")
    print(f"data_wait_frac={wait_frac:.4f}")


if __name__ == "__main__":
    main()
