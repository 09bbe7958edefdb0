"""The in-loop evaluator: held-out validation loss and image metrics, split over all model ranks.

    evaluator = Evaluator(cfg, device, model_group, model_index, num_model_ranks)
    values = evaluator.validation_losses({"ema": ema_model, "model": model}, step)   # every eval.loss_every
    values |= evaluator.image_metrics(ema_model, step, run_dir / "eval")            # every eval.images_every

Every model rank must call both at the same steps (they gather over ``model_group``); every rank gets
the same numbers. The eval set is read and encoded once, here; each rank encodes only its own chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..conditioning import TextCondition
from ..config import Config
from ..encoders import TextEncoders, make_codec, to_pil, to_uint8
from ..flow import timestep_grid
from ..image_files import image_grid
from ..sampling import sample_noise, sample_with_config, sampling_shift
from .eval_set import Chunk, EvalSet, gather_by_chunk, mine
from .metrics import FeatureStats, clip_score, cmmd, frechet_distance, rank_warning
from .validation_loss import EncodedChunk, chunk_losses, summarize

log = logging.getLogger(__name__)


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The training autocast dtype (``train.precision``: :func:`mmdit.precision.compute_dtype`)."""
    from ..precision import compute_dtype as of_precision

    return of_precision(cfg.train.precision, device)


class Evaluator:
    """Encodes this rank's share of the eval set at construction; then computes metrics for given weights."""

    def __init__(self, cfg: Config, device: torch.device | str, model_group=None, model_index: int = 0,
                 num_model_ranks: int = 1, dtype: Optional[torch.dtype] = None):
        self.cfg, self.device = cfg, torch.device(device)
        self.group, self.model_index, self.num_ranks = model_group, model_index, num_model_ranks
        self.dtype = dtype or compute_dtype(cfg, self.device)
        self.eval_set = EvalSet(cfg)
        self.grid = timestep_grid(cfg.flow, cfg.eval.num_timesteps)
        t0 = time.perf_counter()
        encoders = TextEncoders.from_config(cfg.encoders, self.device)
        self.codec = make_codec(cfg.encoders, self.device)
        self.loss_chunks = [self._encode(c, encoders, latents=True) for c in self._mine(cfg.eval.loss_samples)]
        self.image_chunks = [self._encode(c, encoders, latents=False) for c in self._mine(cfg.eval.num_images)]
        del encoders
        self._dino = self._clip = self._effnet = None
        self.real_stats: dict[str, FeatureStats] = {}  # by FD kind (fd_dinov2, fd_effnet_lite0)
        self.real_clip: Optional[torch.Tensor] = None  # the eval set's CLIP image embeddings (CMMD)
        self._warned = False  # the FD rank warning, once per evaluator
        self.last_grid = None
        log.info("eval set %s: %d loss / %d image chunks on model index %d, encoded in %.1fs",
                 self.eval_set.path, len(self.loss_chunks), len(self.image_chunks), model_index,
                 time.perf_counter() - t0)

    def _mine(self, num_rows: int) -> list[Chunk]:
        return mine(self.eval_set.chunks(num_rows), self.model_index, self.num_ranks)

    @torch.no_grad()
    def _encode(self, chunk: Chunk, encoders: TextEncoders, latents: bool):
        ids, images, captions = self.eval_set.read(chunk)
        cond = encoders.encode(captions).trimmed(16).to("cpu") if captions else None
        if not latents:
            return chunk, ids, captions, cond
        g = torch.Generator(self.device).manual_seed(self.cfg.eval.seed * 100003 + chunk.number)
        z = self.codec.encode(images.to(self.device), generator=g).float().cpu() if len(ids) else None
        return EncodedChunk(chunk.number, ids, z, cond)

    # ------------------------------------------------------------------ validation loss
    def validation_loss(self, model: torch.nn.Module, step: int, tag: str = "ema") -> dict[str, float]:
        """``val/<tag>/loss`` and ``val/<tag>/loss_t<t>`` (t: the unshifted grid) for these weights."""
        was_training = model.training
        model.eval()
        sums, counts = {}, {}
        for chunk in self.loss_chunks:
            if len(chunk.ids):
                sums[chunk.number] = chunk_losses(model, chunk, self.cfg, self.device, self.dtype)
            counts[chunk.number] = len(chunk.ids)
        model.train(was_training)
        merged = gather_by_chunk({n: (sums.get(n), counts[n]) for n in counts}, self.group, self.num_ranks)
        sums = {n: s for n, (s, c) in merged.items() if c}
        return summarize(sums, {n: c for n, (_, c) in merged.items() if c}, self.grid, f"val/{tag}")

    def validation_losses(self, models: dict[str, torch.nn.Module], step: int) -> dict[str, float]:
        """:meth:`validation_loss` for each of ``eval.loss_weights`` found in ``models`` ("ema", "model")."""
        out: dict[str, float] = {}
        for tag in self.cfg.eval.loss_weights:
            if tag in models:
                out.update(self.validation_loss(models[tag], step, tag))
        return out

    # ------------------------------------------------------------------ image metrics
    def _extractors(self):
        from .features import ClipFeatures, DinoFeatures

        if self._dino is None:
            self._dino = DinoFeatures(self.cfg.eval.dino, self.device)
            self._clip = ClipFeatures(self.cfg.eval.clip, self.device)
        return self._dino, self._clip

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, chunk: Chunk, ids: np.ndarray, cond: TextCondition) -> torch.Tensor:
        """uint8 images [B, 3, H, W] of a chunk: its captions, seed eval.seed + id, the sampling config."""
        c, h, w = self.codec.latent_shape(chunk.height, chunk.width)
        noise = torch.cat([sample_noise((1, c, h, w), torch.Generator().manual_seed(self.cfg.eval.seed + int(i)),
                                        self.device) for i in ids])

        def velocity(x, t, cond_):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                return model(x, t, cond_).float()

        sde = torch.Generator().manual_seed(self.cfg.eval.seed + int(ids[0]) + 2**31)
        x0 = sample_with_config(velocity, noise, cond.to(self.device), self.cfg.sample, generator=sde,
                                shift=sampling_shift(self.cfg, chunk.height, chunk.width))
        return to_uint8(self.codec.decode(x0))

    def _real_path(self, kind: str, recipe: dict[str, str]) -> tuple[Path, dict[str, str]]:
        ids = np.concatenate([c.ids for c in self.eval_set.chunks(self.cfg.eval.num_images)])
        return real_cache_file(Path(self.cfg.eval.parquet_folder), kind, recipe, ids,
                               self.eval_set.path.read_bytes()[:1 << 20])

    def _real_features(self, extract) -> torch.Tensor:
        """``extract(images)`` of the eval set's real images, split over the model ranks and gathered."""
        local = {}
        for chunk, _, _, _ in self.image_chunks:
            ids, images, _ = self.eval_set.read(chunk)
            if len(ids):
                local[chunk.number] = extract(images)
        feats = gather_by_chunk(local, self.group, self.num_ranks)
        return torch.cat([feats[n] for n in sorted(feats)])

    def _effnet_extractor(self):
        from .effnet_lite0 import EffNetLite0Features

        if self._effnet is None:
            self._effnet = EffNetLite0Features(self.cfg.eval.effnet, self.device)
        return self._effnet

    def _real_stats(self, features, kind: str) -> FeatureStats:
        """Statistics of the eval set's real images under ``features`` (FD ``kind``): computed once (split over
        ranks), cached beside the eval set under a key of everything that changes the features."""
        if kind in self.real_stats:
            return self.real_stats[kind]
        path, key = self._real_path(kind, features.recipe())
        if path.is_file():
            self.real_stats[kind] = FeatureStats.load(path)[0]
            return self.real_stats[kind]
        stats = self.real_stats[kind] = FeatureStats.of(self._real_features(features))
        if self.model_index == 0:
            stats.save(path, key)
            log.info("cached real-image statistics in %s", path)
        return stats

    def _real_clip(self, clip) -> torch.Tensor:
        """CLIP image embeddings of the eval set's real images (CMMD's reference set), cached like the stats."""
        if self.real_clip is not None:
            return self.real_clip
        path, key = self._real_path("cmmd", clip.recipe())
        if path.is_file():
            from safetensors.torch import load_file

            self.real_clip = load_file(str(path))["embeddings"]
            return self.real_clip
        self.real_clip = self._real_features(clip.images)
        if self.model_index == 0:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file({"embeddings": self.real_clip.contiguous()}, str(tmp), metadata=key)
            tmp.replace(path)
        return self.real_clip

    def image_metrics(self, model: torch.nn.Module, step: int, out_dir: Optional[Path] = None) -> dict[str, float]:
        """``eval.image_metrics`` of generated images: ``eval/fd_dinov2`` (with ``eval/fd_num_images``, the N
        it is computed on), ``eval/cmmd``, ``eval/clip_score``, ``eval/shapes/<attribute>``,
        ``eval/fd_effnet_lite0``; a grid to ``out_dir`` (first rank)."""
        wanted = self.cfg.eval.image_metrics
        dino = clip = None
        if {"fd_dinov2", "cmmd", "clip_score"} & set(wanted):
            dino, clip = self._extractors()
        effnet = self._effnet_extractor() if "fd_effnet_lite0" in wanted else None
        was_training = model.training
        model.eval()
        local, shown = {}, []
        for chunk, ids, captions, cond in self.image_chunks:
            if not len(ids):
                continue
            images = self.generate(model, chunk, ids, cond)
            local[chunk.number] = {
                "dino": dino(images) if "fd_dinov2" in wanted else None,
                "clip_images": clip.images(images) if {"cmmd", "clip_score"} & set(wanted) else None,
                "clip_texts": clip.texts(captions) if "clip_score" in wanted else None,
                "shapes": shape_checks(images, captions) if "shapes" in wanted else None,
                "effnet": effnet(images) if effnet is not None else None,
            }
            shown.extend(to_pil(images)[: max(0, self.cfg.eval.grid_images - len(shown))])
        model.train(was_training)
        merged = gather_by_chunk(local, self.group, self.num_ranks)
        parts = [merged[n] for n in sorted(merged)]
        values = {}
        if "fd_dinov2" in wanted:
            fake = FeatureStats.of(torch.cat([p["dino"] for p in parts]))
            values["eval/fd_dinov2"] = frechet_distance(fake, self._real_stats(dino, "fd"))
            values["eval/fd_num_images"] = fake.n
            warning = rank_warning(fake.n, dino.dim)
            if warning and self.model_index == 0 and not self._warned:
                log.warning("%s", warning)
                self._warned = True
            if self.model_index == 0:
                log.info("FD_DINOv2 = %.4g on N = %d generated images (%s)", values["eval/fd_dinov2"], fake.n,
                         dino.name)
        if "cmmd" in wanted:
            values["eval/cmmd"] = cmmd(self._real_clip(clip), torch.cat([p["clip_images"] for p in parts]))
        if effnet is not None:
            fake = FeatureStats.of(torch.cat([p["effnet"] for p in parts]))
            values["eval/fd_effnet_lite0"] = frechet_distance(fake, self._real_stats(effnet, "fd_effnet_lite0"))
        if "clip_score" in wanted:
            values["eval/clip_score"] = clip_score(torch.cat([p["clip_images"] for p in parts]),
                                                   torch.cat([p["clip_texts"] for p in parts]))
        if "shapes" in wanted:
            values.update(shape_scores([row for p in parts for row in p["shapes"]]))
        if self.model_index == 0 and shown:
            size = shown[0].size
            self.last_grid = image_grid([im.resize(size) for im in shown])
            if out_dir is not None:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                self.last_grid.save(Path(out_dir) / f"grid_step_{step:08d}.png")
        return values


def real_cache_file(folder: Path, kind: str, recipe: dict[str, str], ids: np.ndarray,
                    index_head: bytes) -> tuple[Path, dict[str, str]]:
    """Cache file (and its metadata) of the real images' features of ``kind`` under ``folder/eval_stats``, named
    by everything that changes them: the extractor's recipe (name, revision, dtype, device type, resize,
    normalisation), N, and the eval set's fingerprint (the image ids and the first MiB of its index)."""
    fingerprint = hashlib.sha256(ids.tobytes() + index_head).hexdigest()[:16]
    key = {**recipe, "kind": kind, "n": str(len(ids)), "eval_set": fingerprint}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = recipe["extractor"].strip("/").replace("/", "--")[-60:]
    return folder / "eval_stats" / f"{kind}_{name}_{len(ids)}_{digest}.safetensors", key


def shape_checks(images: torch.Tensor, captions: list[str]) -> list[tuple[dict, bool, bool]]:
    """``mmdit.score`` checks of uint8 images [B, 3, H, W] against the attributes their captions spell."""
    from ..score import check_image, expected_from_text

    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    return [check_image(a, expected_from_text(c)) for a, c in zip(arrays, captions)]


def shape_scores(rows: list[tuple[dict, bool, bool]]) -> dict[str, float]:
    """``eval/shapes/<attribute>`` and ``all`` overall, ``eval/shapes/held_out_all`` for held-out combinations."""
    from ..score import summarise_checks

    scores = summarise_checks(rows)
    values = {f"eval/shapes/{k}": v for k, v in scores.items() if isinstance(v, float)}
    for part in ("seen", "held_out"):
        if part in scores and "all" in scores[part]:
            values[f"eval/shapes/{part}_all"] = scores[part]["all"]
    return values
