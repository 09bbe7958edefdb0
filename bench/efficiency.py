"""Ablation harness for the training methods that buy steps: each on and off on the CPU demo, several seeds.

    python bench/efficiency.py --methods base,muon,route,repa,muon+repa --seeds 0,1 --steps 2000 \\
        --out demo_out/efficiency.jsonl                       # one JSON line per (method, seed), appended
    python bench/efficiency.py --summary demo_out/efficiency.jsonl   # the markdown table of BENCHMARKS.md

The demo's data and model (``configs/tiny.yaml``, the shapes rows of ``bench/demo_recipe.py``, in memory, one
process), the same images seen by every method, the same seeds for init, batches and noise. A method is a set
of config overrides joined by ``+``:

- ``base``: the demo recipe (AdamW, EMA 0.995).
- ``muon``: ``train.optimizer=muon`` (the blocks' matrices; AdamW keeps the rest; ``train.muon`` defaults).
- ``route``: TREAD, ``model.route=0.5`` over blocks 1-2 of the 4 (``route_start=1 route_end=-1``).
- ``repa``: REPA with the real EfficientNet-Lite0 as the teacher (``train.repa.encoder=effnet_lite0``, the
  one real pretrained image network offline; block 1 of 4, weight 0.5); the targets of every training image
  are computed once up front (the loader ranks' code, ``VisionTeacher.features``), the projector trains with
  its own AdamW as in the trainer (``mmdit.train.repa.RepaHead``).

Post-hoc EMA is not a method but tracked in every run (it changes nothing in training): two profiles (std 0.05,
0.10), snapshots every ``--snapshot_every`` steps, at the end the EMA length is chosen from ``--phema_stds`` by the
held-out validation loss (the EDM2 recipe, with ``mmdit.reconstruct_ema``); the demo scorer runs on both the
classic EMA's weights and the chosen post-hoc EMA's (``phema_*`` keys).

Reported per run: the held-out validation loss (the demo's eval set, 64 rows of another seed with every colour x
shape combination, at 8 fixed timesteps, EMA and raw weights) every ``--eval_every`` steps, the model FLOPs of the
run (``mmdit.model.flops``: routing computes less; REPA's projector counts, its teacher does not), wall-clock, and
the demo scorer on the seen and held-out prompts of the final (EMA or post-hoc EMA) weights. ``--summary`` adds the
steps and FLOPs at which each method first reaches the target loss (``--target``; default: the mean final EMA loss
of ``base``), the MLPerf rule of ``python -m mmdit evaluate --time_to_target``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from demo_recipe import caption_vocabulary, demo_images, encoded_vocabulary  # noqa: E402

from mmdit import score  # noqa: E402
from mmdit.conditioning import TextCondition  # noqa: E402
from mmdit.config import load_config  # noqa: E402
from mmdit.demo import EVAL_SEED, caption, prompt_sets  # noqa: E402
from mmdit.eval.validation_loss import EncodedChunk, chunk_losses  # noqa: E402
from mmdit.flow import cfg_dropout_keep, flow_loss, sample_timesteps  # noqa: E402
from mmdit.model import MMDiT  # noqa: E402
from mmdit.model.flops import train_flops_per_image  # noqa: E402
from mmdit.model.routing import route_generator, route_indices  # noqa: E402
from mmdit.sampling import sample  # noqa: E402
from mmdit.train.optim import EMA, make_optimizer, make_scheduler  # noqa: E402

METHODS = {
    "base": [],
    "muon": ["train.optimizer=muon"],
    "route": ["model.route=0.5", "model.route_start=1", "model.route_end=-1"],
    # projector 256 wide: REPA's 2048 (sized for SiT-XL) is 7.1 M parameters here, 6x the demo model's step FLOPs
    "repa": ["train.repa.enabled=true", "train.repa.encoder=effnet_lite0", "train.repa.block=1",
             "train.repa.projector_dim=256"],
}
PHEMA_TRACKED = [0.05, 0.10]


def method_overrides(method: str) -> list[str]:
    parts = method.split("+")
    unknown = [p for p in parts if p not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {unknown}; choose from {sorted(METHODS)} joined by '+'")
    return [o for p in parts for o in METHODS[p]]


def eval_chunks(cfg, rows: int, step: int) -> list[EncodedChunk]:
    """The demo's held-out eval set as fixed chunks (one per bucket), ids unique over the set."""
    chunks, next_id = [], 0
    table = encoded_vocabulary(cfg, Path("demo_out/caption_embeddings.pt"))
    row_of = {c: i for i, c in enumerate(table["captions"])}
    for number, (x, longs, _) in enumerate(demo_images(rows, 1.25, cfg.model.max_res, step, seed=EVAL_SEED,
                                                       holdout=()).values()):
        ix = torch.tensor([row_of[c] for c in longs])
        cond = TextCondition([table["tokens"][ix]], [table["masks"][ix]], table["pooled"][ix])
        ids = np.arange(next_id, next_id + len(longs))
        next_id += len(longs)
        chunks.append(EncodedChunk(number, ids, x, cond))
    return chunks


def validation_loss(model: torch.nn.Module, chunks: list[EncodedChunk], cfg) -> float:
    sums = sum(chunk_losses(model, c, cfg, torch.device("cpu"), torch.float32) for c in chunks)
    return float((sums / sum(len(c.ids) for c in chunks)).mean())


def scores(model: torch.nn.Module, cfg, condition) -> dict:
    """The demo scorer on its seen and held-out prompt sets, one sampling seed."""
    out, res = {}, cfg.model.max_res
    for name, attrs in prompt_sets().items():
        noise = torch.randn((len(attrs), cfg.model.in_channels, res, res), generator=torch.Generator().manual_seed(0))
        images = sample(model, noise, condition([caption(a) for a in attrs]), sampler=cfg.sample.sampler,
                        num_steps=cfg.sample.num_steps, cfg_scale=cfg.sample.cfg_scale)
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        result = score.score_images(list(zip(images, attrs)), holdout=())
        out.update({f"{name}_{k}": round(result[k], 4) for k in ("shape", "size", "all")})
    return out


def choose_phema(model: torch.nn.Module, snapshots_dir: Path, stds: list[float], chunks, cfg) -> dict:
    """EDM2's post-hoc selection: reconstruct each std from the snapshots, keep the lowest validation loss."""
    from mmdit.reconstruct_ema import reconstruct, select_snapshots
    from mmdit.train.phema_tracker import list_snapshots

    snapshots, images = select_snapshots(list_snapshots(snapshots_dir))
    weights, _, _ = reconstruct(snapshots, images, stds)
    losses = {}
    for std, w in zip(stds, weights):
        model.load_state_dict(w)
        losses[std] = validation_loss(model, chunks, cfg)
    best = min(losses, key=losses.get)
    model.load_state_dict(weights[stds.index(best)])
    return {"phema_std": best, "phema_losses": {f"{s:.3f}": round(v, 6) for s, v in losses.items()}}


def teacher_targets(cfg, data: dict, rows: int) -> dict:
    """REPA targets of every training image, per bucket: [N, tokens, teacher width] (the loaders' code).

    Computed once per (teacher, image size, rows) and kept in ``demo_out/`` (the data are the same every run)."""
    from mmdit.encoders.vision import load_teacher, token_grid

    repa = cfg.train.repa
    cache = Path(f"demo_out/repa_targets-{Path(repa.encoder).name}-{repa.image_size}px-{rows}rows.pt")
    if cache.exists():
        return torch.load(cache)
    teacher = load_teacher(repa, "cpu")
    out = {}
    for key, (x, _, _) in data.items():
        images = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        grid = token_grid(cfg.model, *images.shape[2:])
        out[key] = torch.cat([teacher.features(images[i:i + 64], grid) for i in range(0, len(images), 64)]).float()
    torch.save(out, cache)
    return out


def _keep_hidden(net, kept: list, *args):
    velocity, hidden = net(*args)
    kept.append(hidden)
    return velocity


def run(method: str, seed: int, args) -> dict:
    from mmdit.train.phema_tracker import PowerFunctionEMA

    cfg = load_config("tiny", [*method_overrides(method), f"train.total_steps={args.steps}", *args.overrides])
    data = demo_images(args.rows, 1.25, cfg.model.max_res, 16)
    chunks = eval_chunks(cfg, args.eval_rows, 16)
    table = encoded_vocabulary(cfg, Path("demo_out/caption_embeddings.pt"))
    assert table["captions"] == caption_vocabulary()
    row_of = {c: i for i, c in enumerate(table["captions"])}

    def condition(captions: list[str]) -> TextCondition:
        ix = torch.tensor([row_of[c] for c in captions])
        return TextCondition([table["tokens"][ix]], [table["masks"][ix]], table["pooled"][ix])

    targets = teacher_targets(cfg, data, args.rows) if cfg.train.repa.enabled else None
    torch.manual_seed(seed)
    model = MMDiT(cfg.model)
    head = None
    if targets is not None:
        from mmdit.train.repa import RepaHead

        head = RepaHead(cfg, next(iter(targets.values())).shape[-1], torch.device("cpu"))
    params = list(model.parameters()) + (list(head.projector.parameters()) if head is not None else [])
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    ema = EMA(model)
    tracker = PowerFunctionEMA(model, PHEMA_TRACKED)
    snapshots = Path(tempfile.mkdtemp(prefix="phema-"))
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    keys = list(data)
    weights = np.array([len(data[k][1]) for k in keys], dtype=float)
    batch, text_tokens = cfg.data.batch_size, [e.max_length for e in cfg.encoders.text if e.kind == "sequence"]
    curve, flops, t0 = [], 0.0, time.perf_counter()
    for step in range(1, args.steps + 1):
        key = keys[rng.choice(len(keys), p=weights / weights.sum())]
        x_all, longs, shorts = data[key]
        ix = rng.integers(0, len(longs), batch)
        captions = [longs[i] if rng.random() < cfg.data.first_caption_prob else shorts[i] for i in ix]
        x0 = x_all[torch.as_tensor(ix)]
        h, w = x0.shape[2] // cfg.model.patch_size, x0.shape[3] // cfg.model.patch_size
        t = sample_timesteps(batch, cfg.flow, generator=gen, num_tokens=h * w)
        eps = torch.randn(x0.shape, generator=gen)
        keep = cfg_dropout_keep(batch, 2, cfg.flow.p_uncond, None, generator=gen)
        net, route, aligned = model, None, []
        if cfg.model.route:
            route = route_indices(batch, h * w, cfg.model.route, route_generator(seed, step, torch.device("cpu")))
            net = functools.partial(model, route=route)
        if head is not None and head.active(step - 1):
            net = functools.partial(_keep_hidden, functools.partial(net, hidden_at=cfg.train.repa.block), aligned)
        loss, _ = flow_loss(net, x0, condition(captions).keep(keep), t, eps, weighting=cfg.flow.loss_weighting)
        total = loss
        if aligned:
            from mmdit.train.repa import aligned_targets

            wanted = aligned_targets(targets[key][torch.as_tensor(ix)], cfg, route)
            total = loss + cfg.train.repa.weight * head.loss(aligned[0], wanted)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if aligned:
            head.set_lr(step - 1)
            head.optimizer.step()
            head.optimizer.zero_grad(set_to_none=True)
        ema.update(model, cfg.train.ema_decay)
        flops += batch * train_flops_per_image(cfg.model, x0.shape[2], x0.shape[3], text_tokens)
        if aligned:  # the projector trains: model FLOPs, as in the trainer (the precomputed teacher's are not)
            flops += head.train_flops(aligned[0].shape[0] * aligned[0].shape[1])
        tracker.update(model, step * batch, step)
        if step % args.snapshot_every == 0 or step == args.steps:
            tracker.write_snapshots(snapshots, "fp32")
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "flops": flops, "seconds": round(time.perf_counter() - t0, 1),
                          "val_ema": round(validation_loss(ema.model, chunks, cfg), 6),
                          "val_raw": round(validation_loss(model, chunks, cfg), 6),
                          **(head.report(None, 1) if head is not None else {})})
            print(json.dumps({"method": method, "seed": seed, **curve[-1]}), file=sys.stderr, flush=True)
    result = {"method": method, "seed": seed, "steps": args.steps, "batch": batch,
              "train_seconds": round(time.perf_counter() - t0, 1), "curve": curve}
    result.update(scores(ema.model, cfg, condition))
    posthoc = copy.deepcopy(model)
    result.update(choose_phema(posthoc, snapshots, args.phema_stds, chunks, cfg))
    result["val_phema"] = round(validation_loss(posthoc, chunks, cfg), 6)
    result.update({f"phema_{k}": v for k, v in scores(posthoc, cfg, condition).items()})
    shutil.rmtree(snapshots)
    return result


def first_reach(curve: list[dict], target: float, key: str) -> dict | None:
    """The first evaluation at or below ``target`` (None: never reached)."""
    return next((p for p in curve if p[key] <= target), None)


def summary(path: Path, target: float | None, on: str = "val_ema") -> str:
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    if target is None:
        base = by_method.get("base")
        if not base:
            raise SystemExit("no base runs: give --target")
        target = float(np.mean([r["curve"][-1][on] for r in base]))
    lines = [f"target: held-out validation loss ({on}) <= {target:.4f}", "",
             "| method | seeds | final val loss (EMA) | (raw) | post-hoc EMA (std) | steps to target | model TFLOPs to "
             "target | EMA: seen shape / size / all | EMA: held out all | post-hoc EMA: seen / held out all "
             "| train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, rs in by_method.items():
        def mean(f, rs=rs):
            return float(np.mean([f(r) for r in rs]))
        reach = [first_reach(r["curve"], target, on) for r in rs]
        steps = "/".join(str(p["step"]) if p else "-" for p in reach)
        tflops = "/".join(f"{p['flops'] / 1e12:.1f}" if p else "-" for p in reach)
        phema = f"{mean(lambda r: r['val_phema']):.4f} ({'/'.join(str(r['phema_std']) for r in rs)})"
        lines.append(
            f"| {method} | {len(rs)} | {mean(lambda r: r['curve'][-1]['val_ema']):.4f} | "
            f"{mean(lambda r: r['curve'][-1]['val_raw']):.4f} | {phema} | {steps} | {tflops} "
            f"| {mean(lambda r: r['seen_shape']):.0%} / {mean(lambda r: r['seen_size']):.0%} / "
            f"{mean(lambda r: r['seen_all']):.0%} | {mean(lambda r: r['held_out_all']):.0%} | "
            f"{mean(lambda r: r['phema_seen_all']):.0%} / {mean(lambda r: r['phema_held_out_all']):.0%} | "
            f"{mean(lambda r: r['train_seconds']):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides on configs/tiny.yaml for every method")
    p.add_argument("--methods", default="base,muon,route,repa,muon+repa", help="comma-separated; '+' joins methods")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rows", type=int, default=6000, help="training rows (the demo: 6,000)")
    p.add_argument("--eval_rows", type=int, default=64, help="held-out eval rows (the demo: 64)")
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--snapshot_every", type=int, default=100, help="post-hoc EMA snapshot interval (steps)")
    p.add_argument("--phema_stds", default="0.02,0.035,0.05,0.075,0.1,0.15,0.2",
                   help="EMA lengths the post-hoc selection chooses from")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (two 1-thread processes, one per "
                   "seed, use 2 cores best; the step's numbers do not depend on it)")
    p.add_argument("--out", default="demo_out/efficiency.jsonl")
    p.add_argument("--summary", default=None, help="print the table of a results file and exit")
    p.add_argument("--target", type=float, default=None)
    p.add_argument("--target_on", choices=("val_ema", "val_raw"), default="val_ema",
                   help="the loss the target applies to (val_raw for runs shorter than a few EMA lengths)")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(Path(args.summary), args.target, args.target_on))
        return
    torch.set_num_threads(args.threads)
    args.phema_stds = [float(s) for s in args.phema_stds.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        for method in args.methods.split(","):
            result = run(method, seed, args)
            with out.open("a") as f:
                f.write(json.dumps(result) + "\n")
    print(summary(out, args.target, args.target_on))


if __name__ == "__main__":
    main()
