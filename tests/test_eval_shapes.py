"""The shapes scorer as an in-loop image metric (``eval.image_metrics: [shapes]``, the CPU demo's): right on
real eval images with their own captions, lower with shuffled captions, and computed without DINOv2 or CLIP."""

from __future__ import annotations

import numpy as np
import torch
from eval_ranks import eval_config, perturbed_model

from mmdit.eval.evaluator import Evaluator, shape_checks, shape_scores


def _real_chunks(ev):
    for chunk in ev.eval_set.chunks(0):
        ids, images, captions = ev.eval_set.read(chunk)
        if len(ids):
            yield images, captions


def test_shape_scores_of_real_images_against_own_and_shuffled_captions(tiny_models, demo_data):
    ev = Evaluator(eval_config(tiny_models, demo_data, loss_samples=8, num_images=8), torch.device("cpu"))
    own, shuffled = [], []
    rng = np.random.default_rng(0)
    for images, captions in _real_chunks(ev):
        own += shape_checks(images, captions)
        shuffled += shape_checks(images, [captions[i] for i in rng.permutation(len(captions))])
    right, wrong = shape_scores(own), shape_scores(shuffled)
    assert len(own) == 240
    for attribute in ("colour", "shape", "position", "size", "background"):
        assert right[f"eval/shapes/{attribute}"] >= 0.95, (attribute, right)
    assert right["eval/shapes/all"] >= 0.9 and wrong["eval/shapes/all"] < 0.2
    assert wrong["eval/shapes/colour"] < 0.4 and wrong["eval/shapes/background"] < 0.5
    assert "eval/shapes/held_out_all" not in right  # the demo data holds its held-out combinations out


def test_in_loop_shapes_metric_needs_no_feature_extractor(tiny_models, demo_data, tmp_path):
    cfg = eval_config(tiny_models, demo_data, num_images=12, image_metrics=["shapes"],
                      dino="no/such-dinov2", clip="no/such-clip")  # would fail to load if it were used
    ev = Evaluator(cfg, torch.device("cpu"))
    values = ev.image_metrics(perturbed_model(cfg), 0, tmp_path)
    assert not any(k in values for k in ("eval/fd_dinov2", "eval/clip_score"))
    assert {f"eval/shapes/{a}" for a in ("colour", "shape", "position", "size", "background", "all")} <= set(values)
    assert all(0.0 <= v <= 1.0 for v in values.values())
    assert (tmp_path / "grid_step_00000000.png").is_file()
    again = Evaluator(cfg, torch.device("cpu")).image_metrics(perturbed_model(cfg), 0)
    assert again == values  # fixed seeds and prompts: the same images, the same score
