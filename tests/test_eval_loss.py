"""Held-out validation loss: deterministic, identical on 1 and 2 real gloo ranks, falls as a model trains;
image metrics split over ranks give the same numbers too."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from eval_ranks import eval_config, perturbed_model, rank_worker

from mmdit.eval.evaluator import Evaluator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    from mmdit.eval.tiny_extractors import build_tiny_extractors

    return build_tiny_extractors(tmp_path_factory.mktemp("extractors"))


@pytest.fixture(scope="module")
def setup(tiny_models, demo_data, extractors):
    cfg = eval_config(tiny_models, demo_data, extractors)
    return cfg, perturbed_model(cfg), Evaluator(cfg, torch.device("cpu"))


def test_validation_loss_is_deterministic(setup):
    cfg, model, ev = setup
    a = ev.validation_losses({"ema": model, "model": model}, step=0)
    assert set(a) == {f"val/{w}/loss" for w in ("ema", "model")} | {
        f"val/{w}/loss_t{t:.3f}" for w in ("ema", "model") for t in ev.grid.tolist()}
    assert a["val/ema/loss"] == a["val/model/loss"] > 0
    assert ev.validation_losses({"ema": model}, step=1) == {k: v for k, v in a.items() if k.startswith("val/ema")}
    again = Evaluator(cfg, torch.device("cpu")).validation_loss(model, 0)  # a second run: read, encode again
    assert again == {k: v for k, v in a.items() if k.startswith("val/ema")}
    assert sum(len(c.ids) for c in ev.loss_chunks) == 24 and len({c.number for c in ev.loss_chunks}) >= 3
    losses = [a[f"val/ema/loss_t{t:.3f}"] for t in ev.grid.tolist()]
    assert len(set(losses)) == len(losses)  # a real grid, not one timestep repeated


def test_one_vs_two_gloo_ranks_identical(setup, tmp_path):
    from safetensors.torch import save_file

    cfg, model, ev = setup
    assert ev.image_metrics(model, 0, tmp_path / "grid") and (tmp_path / "grid" / "grid_step_00000000.png").is_file()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    results = []
    for world in (1, 2):  # both in fresh processes with one thread each: CPU kernels round by thread count
        out = str(tmp_path / f"out{world}.json")
        torch.multiprocessing.start_processes(rank_worker, args=(world, _free_port(), cfg,
                                                                 str(tmp_path / "w.safetensors"), out, True),
                                              nprocs=world, start_method="spawn")
        results.append([json.load(open(f"{out}.{r}")) for r in range(world)])
    single, results = results[0][0]["values"], results[1]
    loss = {k: v for k, v in single.items() if k.startswith("val/")}
    for r in results:  # the loss bit for bit on both ranks; image metrics to float32 feature round-off
        assert {k: v for k, v in r["values"].items() if k.startswith("val/")} == loss
        assert r["values"]["eval/fd_dinov2"] == pytest.approx(single["eval/fd_dinov2"], rel=1e-5)
        assert r["values"]["eval/clip_score"] == pytest.approx(single["eval/clip_score"], rel=1e-5)
    chunks = [set(r["loss_chunks"]) for r in results]
    assert chunks[0] and chunks[1] and not chunks[0] & chunks[1]  # the work was split
    assert single["eval/fd_dinov2"] > 0 and 0 <= single["eval/clip_score"] <= 100


def test_validation_loss_falls_as_a_tiny_model_trains(setup):
    from mmdit.eval.eval_set import make_chunks
    from mmdit.flow import flow_loss, sample_timesteps

    cfg, _, ev = setup
    model = perturbed_model(cfg, seed=1)
    train_chunks = [c for c in make_chunks(ev.eval_set.index, 0, 16) if c.ids.min() >= 48][:4]  # held-out rows
    codec_batches = []
    from mmdit.encoders import TextEncoders

    encoders = TextEncoders.from_config(cfg.encoders, "cpu")
    for c in train_chunks:
        _, images, captions = ev.eval_set.read(c)
        codec_batches.append((ev.codec.encode(images).float(), encoders.encode(captions).trimmed(16)))
    before = ev.validation_loss(model, 0)["val/ema/loss"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        x0, cond = codec_batches[step % len(codec_batches)]
        t = sample_timesteps(x0.shape[0], cfg.flow, generator=g)
        loss, _ = flow_loss(model, x0, cond, t, torch.randn(x0.shape, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = ev.validation_loss(model, 40)["val/ema/loss"]
    assert after < 0.8 * before, (before, after)
