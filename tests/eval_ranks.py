"""Helpers for the evaluation tests: a tiny pixel-space config on the demo data, and a 2-rank gloo worker."""

from __future__ import annotations

import json
import os

import torch

from mmdit.config import Config, DataConfig, EvalConfig, ModelConfig, SampleConfig
from mmdit.encoders import tiny


def eval_config(tiny_models: dict, demo_data: dict, extractors: dict | None = None, **eval_kw) -> Config:
    extractors = extractors or {}
    return Config(
        model=ModelConfig(depth=2, hidden_size=64, num_heads=4, patch_size=4, max_res=64, max_res_orig=64,
                          **tiny.tiny_model_dims(vae=False)),
        encoders=tiny.tiny_encoders_config(tiny_models, vae=False, max_length=16),
        data=DataConfig(parquet_folder=demo_data["phase"], bucket_indices_path=demo_data["index"]),
        sample=SampleConfig(num_steps=3, cfg_scale=2.0),
        eval=EvalConfig(parquet_folder=demo_data["phase"], index=demo_data["index"], **{
            "loss_samples": 24, "batch_size": 8, "num_timesteps": 4, "num_images": 12,
            "dino": extractors.get("dino", ""), "clip": extractors.get("clip", ""), **eval_kw}),
    )


def perturbed_model(cfg: Config, seed: int = 0):
    """An MMDiT whose zero-initialised gates and output layer are perturbed, so predictions are not 0."""
    from mmdit.model import MMDiT

    torch.manual_seed(seed)
    model = MMDiT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def rank_worker(rank: int, world: int, port: int, cfg: Config, state_file: str, out_file: str,
                images: bool) -> None:
    """One model rank: join gloo, evaluate the saved weights on its share, write the gathered numbers."""
    from safetensors.torch import load_file

    from mmdit.eval.evaluator import Evaluator
    from mmdit.model import MMDiT

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = MMDiT(cfg.model)
        model.load_state_dict(load_file(state_file))
        ev = Evaluator(cfg, torch.device("cpu"), torch.distributed.group.WORLD, rank, world)
        values = ev.validation_losses({"ema": model}, step=0)
        if images:
            values.update(ev.image_metrics(model, step=0))
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump({"values": values, "loss_chunks": [c.number for c in ev.loss_chunks]}, f)
    finally:
        torch.distributed.destroy_process_group()
