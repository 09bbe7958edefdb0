"""Search the CPU demo's recipe fast: train the demo model in one process (on a GPU if there is one) and score it.

    python bench/demo_recipe.py                                      # the demo recipe (configs/tiny.yaml)
    python bench/demo_recipe.py --device cuda --evals 1000,2000     # also score at steps 1000 and 2000
    python bench/demo_recipe.py model.patch_size=2 model.depth=3 model.hidden_size=96 model.num_heads=3 \\
        --max_aspect 2 --small 0.24 --large 0.40 train.total_steps=1500   # the first demo recipe

What ``python -m mmdit demo`` does, minus the parts that only cost time: the same shapes rows
(``demo_row``), the same bucketing and resize (``bucket_size``, ``fit_to_bucket``), the same model, flow
loss, CFG dropout, AdamW + warmup/cosine schedule, EMA, Euler sampler, prompts and scorer, all from
``mmdit``. What differs: images live in memory and batches are drawn bucket by bucket at random (no
parquet, no loader rank), and every caption of the vocabulary is encoded once by MiniLM up front and
looked up (the demo's caption cache gives the same vectors). Config overrides (``key.sub=value``) apply
to ``configs/tiny.yaml`` as in training. The README's accuracy-vs-recipe table was made with this script
on an H100 (a 3000-step run of the demo model takes ~3 minutes there with ten runs sharing the GPU);
the demo itself then confirmed the chosen recipe on the 2-core CPU.

Prints one JSON line per evaluation: step, mean loss of the last 100 steps, and the colour / shape /
position accuracy on the demo's seen and held-out prompt sets for each sampling seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmdit import score  # noqa: E402
from mmdit.conditioning import TextCondition  # noqa: E402
from mmdit.config import load_config  # noqa: E402
from mmdit.data import shapes  # noqa: E402
from mmdit.data.buckets import bucket_size  # noqa: E402
from mmdit.data.images import fit_to_bucket  # noqa: E402
from mmdit.demo import caption, prompt_sets  # noqa: E402
from mmdit.flow import cfg_dropout_keep, flow_loss, sample_timesteps  # noqa: E402
from mmdit.model import MMDiT  # noqa: E402
from mmdit.sampling import sample  # noqa: E402
from mmdit.train.optim import EMA, make_optimizer, make_scheduler  # noqa: E402


def demo_images(rows: int, max_aspect: float, resolution: int, step: int, seed: int = 0,
                holdout=shapes.DEFAULT_HOLDOUT) -> dict:
    """{(bucket_h, bucket_w): (images [N, 3, h, w] in [-1, 1], long captions, short captions)}; the demo's
    training rows by default, its eval set with ``seed=mmdit.demo.EVAL_SEED, holdout=()``."""
    from mmdit.data.demo_dataset import demo_row
    from mmdit.data.images import decode

    buckets: dict = {}
    for i in range(rows):
        row = demo_row(i, seed, holdout, 0.0, 64, 160, max_aspect)
        image = decode(row["image"]).image
        bh, bw = bucket_size(row["width"], row["height"], step=step, max_resolution=resolution)
        pixels = np.array(fit_to_bucket(image, bh, bw))
        x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
        buckets.setdefault((bh, bw), []).append((x, row["caption_long"], row["caption_short"]))
    return {k: (torch.stack([r[0] for r in v]), [r[1] for r in v], [r[2] for r in v]) for k, v in buckets.items()}


def caption_vocabulary() -> list[str]:
    """Every long and short caption the shapes data and the demo prompts can produce."""
    captions = set()
    for colour in shapes.COLOURS:
        for kind in shapes.SHAPES:
            for position in shapes.POSITIONS:
                for size in shapes.SIZES:
                    for background in shapes.BACKGROUNDS:
                        spec = shapes.ShapeSpec(kind, colour, position, size, background)
                        captions.update((shapes.caption_long(spec), shapes.caption_short(spec)))
    return sorted(captions)


def encoded_vocabulary(cfg, path: Path) -> dict:
    """MiniLM outputs for the whole vocabulary, computed once on the CPU and kept in ``path``."""
    captions = caption_vocabulary()
    if path.exists():
        cached = torch.load(path)
        if cached["captions"] == captions:
            return cached
    from mmdit.encoders.text import TextEncoders

    encoders = TextEncoders.from_config(cfg.encoders, device="cpu", dtype="fp32")
    parts = [encoders.encode([c]) for c in captions]  # one by one, like the demo's caption cache
    table = {"captions": captions,
             "tokens": torch.cat([p.tokens[0] for p in parts]), "masks": torch.cat([p.masks[0] for p in parts]),
             "pooled": torch.cat([p.pooled for p in parts])}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(table, path)
    return table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides on configs/tiny.yaml, e.g. train.total_steps=2000")
    p.add_argument("--rows", type=int, default=6000)
    p.add_argument("--max_aspect", type=float, default=1.25, help="demo images' aspect range (demo: 1.25)")
    p.add_argument("--small", type=float, default=shapes.SIZE_FRACTION["small"], help="small shape / short side")
    p.add_argument("--large", type=float, default=shapes.SIZE_FRACTION["large"], help="large shape / short side")
    p.add_argument("--step", type=int, default=16, help="bucket side step (create_phase --step)")
    p.add_argument("--seed", type=int, default=0, help="model init, batches, noise")
    p.add_argument("--evals", default="", help="extra steps to score at, e.g. 1000,2000 (the last step always)")
    p.add_argument("--sample_seeds", type=int, default=2, help="sampling seeds per evaluation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", default="demo_out/caption_embeddings.pt", help="encoded caption vocabulary")
    p.add_argument("--time_only", action="store_true",
                   help="no scoring: print the step's images/s over steps 21..train.total_steps (BENCHMARKS.md)")
    args = p.parse_args(argv)

    cfg = load_config("tiny", args.overrides)
    device = torch.device(args.device)
    shapes.SIZE_FRACTION.update(small=args.small, large=args.large)
    score.SIZE_THRESHOLD = (args.small + args.large) / 2
    t0 = time.perf_counter()
    data = {k: (x.to(device), longs, shorts) for k, (x, longs, shorts) in
            demo_images(args.rows, args.max_aspect, cfg.model.max_res, args.step).items()}
    table = encoded_vocabulary(cfg, Path(args.cache))
    row_of = {c: i for i, c in enumerate(table["captions"])}
    tokens, masks, pooled = (table[k].to(device) for k in ("tokens", "masks", "pooled"))

    def condition(captions: list[str]) -> TextCondition:
        ix = torch.tensor([row_of[c] for c in captions], device=device)
        return TextCondition([tokens[ix]], [masks[ix]], pooled[ix])

    torch.manual_seed(args.seed)
    model = MMDiT(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    ema = EMA(model)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator(device).manual_seed(args.seed)
    keys = list(data)
    weights = np.array([len(data[k][1]) for k in keys], dtype=float)
    total = cfg.train.total_steps
    evals = {int(s) for s in args.evals.split(",") if s} | {total}
    batch, losses = cfg.data.batch_size, []
    for step in range(1, total + 1):
        if step == 21:
            t_steady = time.perf_counter()
        x_all, longs, shorts = data[keys[rng.choice(len(keys), p=weights / weights.sum())]]
        ix = rng.integers(0, len(longs), batch)
        captions = [longs[i] if rng.random() < cfg.data.first_caption_prob else shorts[i] for i in ix]
        x0 = x_all[torch.as_tensor(ix, device=device)]
        t = sample_timesteps(batch, cfg.flow, generator=gen, device=device,
                             num_tokens=(x0.shape[2] // cfg.model.patch_size) * (x0.shape[3] // cfg.model.patch_size))
        eps = torch.randn(x0.shape, generator=gen, device=device)
        keep = cfg_dropout_keep(batch, 2, cfg.flow.p_uncond, None, generator=gen, device=device)
        loss, _ = flow_loss(model, x0, condition(captions).keep(keep), t, eps, weighting=cfg.flow.loss_weighting)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ema.update(model, cfg.train.ema_decay)
        losses.append(loss.item())
        if args.time_only:
            if step == total:
                print(json.dumps({"images_per_s": round((total - 20) * batch / (time.perf_counter() - t_steady), 1),
                                  "threads": torch.get_num_threads()}))
            continue
        if step not in evals:
            continue
        report = {"step": step, "loss": round(float(np.mean(losses[-100:])), 5),
                  "seconds": round(time.perf_counter() - t0, 1)}
        res = cfg.model.max_res
        for name, attrs in prompt_sets().items():
            for seed in range(args.sample_seeds):
                noise = torch.randn((len(attrs), cfg.model.in_channels, res, res),
                                    generator=torch.Generator(device).manual_seed(seed), device=device)
                out = sample(ema.model, noise, condition([caption(a) for a in attrs]), sampler=cfg.sample.sampler,
                             num_steps=cfg.sample.num_steps, cfg_scale=cfg.sample.cfg_scale)
                images = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
                scores = score.score_images(list(zip(images, attrs)), holdout=())
                for attribute in ("colour", "shape", "position", "size", "all"):
                    report.setdefault(f"{name}_{attribute}", []).append(round(scores[attribute], 3))
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
