"""Export a trained checkpoint: a Hub-style folder anyone can load, or full safetensors beside shards.

    python -m mmdit export --checkpoint models/run/step_00300000 --output exported/my-model [--ema]
    python -m mmdit export --checkpoint models/run/step_00300000 --consolidate

The first writes ``config.json`` + ``model.safetensors`` (``MMDiT.from_pretrained(folder)`` needs nothing
else; ``push_to_hub`` / ``hf upload`` shares it), ``mmdit_config.yaml`` (the whole training config: the
text encoders, VAE and sampling defaults that ``Pipeline.from_checkpoint(folder or hub id)`` and
``infer.py`` use) and a generated model card ``README.md``. The weights are the raw ones, or the EMA
with ``--ema``. The second adds ``model.safetensors`` / ``ema.safetensors`` to a sharded (FSDP) step
folder, atomically, so every tool that reads full checkpoints reads it. Either works on a full (DDP) or a
sharded step folder, in one process, without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

import torch

from .checkpoint_loading import FULL_CONFIG, InferenceError, check_state_dict, read_checkpoint_config
from .config import Config, save_config
from .train import checkpoint as ckpt
from .train import sharded_checkpoint as sharded


def step_weights(step_dir: Path, which: str, cfg: Config) -> dict[str, torch.Tensor]:
    """Full "model" or "ema" weights of a full or sharded step folder."""
    from safetensors.torch import load_file

    from .model import MMDiT

    f = step_dir / ckpt.WEIGHT_FILES[which]
    if f.is_file():
        return load_file(str(f))
    if sharded.is_sharded(step_dir):
        return sharded.consolidated_weights(step_dir, which, MMDiT(cfg.model))
    raise ckpt.MissingCheckpointFile(f"checkpoint {step_dir} has no {f.name} and no sharded weights")


def export_pretrained(checkpoint: str | Path, output: str | Path, ema: bool = False) -> Path:
    """Write the Hub-style folder of one complete step folder (see the module docstring); returns it."""
    from .model import MMDiT

    step_dir = Path(checkpoint)
    ckpt._check_complete(step_dir)
    cfg = read_checkpoint_config(step_dir)
    which = "ema" if ema else "model"
    state = step_weights(step_dir, which, cfg)
    model = MMDiT(cfg.model)
    check_state_dict(model, state, f"checkpoint {step_dir}")
    model.load_state_dict(state, strict=True)
    out = Path(output)
    model.save_pretrained(out)
    save_config(cfg, out / FULL_CONFIG)
    trainer_state = ckpt.read_trainer_state(step_dir)
    (out / "README.md").write_text(model_card(cfg, trainer_state, which, step_dir, model))
    return out


def _eval_figures(step_dir: Path, step: int) -> dict:
    """Evaluation numbers of this step: ``<step>/eval.json``, else the run's metrics.jsonl row of the step
    (keys starting with ``eval`` or ``val``)."""
    f = step_dir / "eval.json"
    if f.is_file():
        return json.loads(f.read_text())
    metrics = step_dir.parent / "metrics.jsonl"
    found: dict = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if row.get("step") == step:
                found.update({k: v for k, v in row.items() if k.startswith(("eval", "val"))})
    return found


def model_card(cfg: Config, trainer_state: dict, which: str, step_dir: Path, model: torch.nn.Module) -> str:
    """A model card: what the network is, what it was trained on and how long, how to load it."""
    m = cfg.model
    step = int(trainer_state.get("step", 0))
    params = sum(p.numel() for p in model.parameters())
    encoders = "\n".join(f"- `{e.name}` ({e.kind}, max {e.max_length} tokens)" for e in cfg.encoders.text)
    figures = _eval_figures(step_dir, step)
    evals = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items())
    subfolder = f" (subfolder {cfg.encoders.vae_subfolder})" if cfg.encoders.vae_subfolder else ""
    eval_section = f"## Evaluation\n\n| metric | value |\n| --- | --- |\n{evals}\n" if figures else ""
    return f"""---
library_name: mmdit
pipeline_tag: text-to-image
tags: [text-to-image, mmdit, rectified-flow, model_hub_mixin]
---

# {cfg.train.run_name} (step {step})

An SD3-style MMDiT text-to-image model trained from scratch with rectified flow, {params:,} parameters:
depth {m.depth}, hidden {m.dim}, {m.heads} heads, patch {m.patch_size}, {m.in_channels} latent channels,
MLP {m.mlp_type}, positions {m.pos_encoding}, up to {m.max_res} px. Weights: **{which}**
({"exponential moving average, decay " + str(cfg.train.ema_decay) if which == "ema" else "raw, not the EMA"}).

## Training

- optimizer steps: {step:,}, samples seen: {int(trainer_state.get("samples_seen", 0)):,}
- data: `{cfg.data.parquet_folder}` (batch {cfg.data.batch_size} per GPU, token budget {cfg.data.token_budget})
- learning rate {cfg.train.lr}, schedule {cfg.train.lr_schedule}, warmup {cfg.train.warmup_steps}
- timesteps: {cfg.flow.timestep_sampling}, CFG dropout {cfg.flow.p_uncond}

Text encoders (frozen):
{encoders}

VAE: `{cfg.encoders.vae or "none (pixel space)"}`{subfolder}

{eval_section}
## Use

```python
from mmdit.model import MMDiT
net = MMDiT.from_pretrained("<this folder or hub id>")          # the network alone

from mmdit.inference import Pipeline
pipe = Pipeline.from_checkpoint("<this folder or hub id>")      # with its text encoders and VAE
images = pipe.generate(["a red circle"], seed=0)
```

`python infer.py --checkpoint <this folder or hub id> --prompt "..."` does the same from the shell.
The full training config is `{FULL_CONFIG}`.
"""


def consolidate(checkpoint: str | Path) -> list[Path]:
    """Add model.safetensors / ema.safetensors to a sharded step folder and list them in its manifest
    (each file written under a temporary name and renamed; the manifest last, also by a rename)."""
    step_dir = Path(checkpoint)
    manifest = ckpt._check_complete(step_dir)
    if not sharded.is_sharded(step_dir):
        raise ckpt.CheckpointError(f"{step_dir} is not a sharded checkpoint: it already has full weights")
    cfg = read_checkpoint_config(step_dir)
    written = []
    for which, name in ckpt.WEIGHT_FILES.items():
        target = step_dir / name
        tmp = step_dir / f"{name}.tmp-{os.getpid()}"
        ckpt._write_safetensors(step_weights(step_dir, which, cfg), tmp, which)
        os.rename(tmp, target)
        written.append(target)
        if name not in manifest["files"]:
            manifest["files"].append(name)
        manifest.setdefault("sizes", {})[name] = target.stat().st_size
    tmp = step_dir / f"{ckpt.MARKER}.tmp-{os.getpid()}"
    ckpt._write_text(json.dumps(manifest), tmp)
    os.rename(tmp, step_dir / ckpt.MARKER)
    ckpt._fsync_path(step_dir)
    return written


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmdit export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a complete step_<N> folder (full or sharded)")
    parser.add_argument("--output", help="the Hub-style folder to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (default: the raw weights)")
    parser.add_argument("--consolidate", action="store_true",
                        help="instead: add model/ema.safetensors to a sharded step folder")
    args = parser.parse_args(argv)
    try:
        _run(parser, args)
    except (ckpt.CheckpointError, InferenceError) as err:
        raise SystemExit(f"export failed: {err}") from None


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.consolidate == bool(args.output):
        parser.error("give --output <folder> (a Hub-style export) or --consolidate, one of the two")
    if args.consolidate:
        for path in consolidate(args.checkpoint):
            print(f"wrote {path}")
        return
    out = export_pretrained(args.checkpoint, args.output, ema=args.ema)
    print(f"wrote {out} ({'EMA' if args.ema else 'raw'} weights): MMDiT.from_pretrained({str(out)!r}); share it "
          f"with `hf upload <user>/<name> {out}` or MMDiT.push_to_hub")
