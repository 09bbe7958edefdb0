"""Precompute: read every bucketed row once, run the configured text encoders and VAE (and with ``train.repa``
the REPA teacher), write a cache.

Work is split by input shard (shard ``i`` belongs to rank ``i % world``); each output shard is written to
a temporary name and renamed when complete, so a killed run restarted with the same arguments skips the
finished shards and writes the rest, byte for byte what an uninterrupted run writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..config import Config, ConfigError
from ..data.indices import BucketIndex
from ..data.rows import RowReader
from ..encoders import TextEncoders, make_codec
from ..encoders.vae import PixelCodec, VAECodec
from ..encoders.vision import VisionTeacher, load_teacher, token_grid
from .format import (
    FORMAT,
    INDEX,
    LATENT_MODES,
    MANIFEST,
    TEXT_DTYPES,
    VERSION,
    bucket_key,
    content_of,
    index_identity,
    model_revision,
    shard_name,
    write_json_atomic,
)

log = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def posterior(codec: VAECodec, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's (mean, std) of uint8 images through :meth:`VAECodec.posterior`, the code path that
    online encoding samples from (the training side draws ``mean + std * noise`` with the same generator, see
    :mod:`.producer`)."""
    return codec.posterior(images)


def quantize_int8(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector absmax int8: ``tokens ~= q * scale`` (scale [N] float32); an all-zero vector keeps scale 1."""
    x = tokens.float()
    scale = x.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def build_manifest(cfg: Config, index: BucketIndex, encoders: TextEncoders, codec, latents: str,
                   text_dtype: str, teacher: VisionTeacher | None = None) -> dict:
    """What the cache holds and how it was made; ``content`` is what a training config must match."""
    vae = {"kind": "pixels"}
    if isinstance(codec, VAECodec):
        vae = {"kind": latents, "scaling_factor": codec.scaling_factor, "shift_factor": codec.shift_factor,
               "latent_channels": codec.latent_channels, "latent_factor": codec.latent_factor,
               "dtype": str(codec.dtype).removeprefix("torch."), "revision": model_revision(cfg.encoders.vae)}
    repa = {} if teacher is None else {"teacher": {"name": teacher.name, "revision": model_revision(teacher.name),
                                                   **teacher.describe()}}
    return {
        **repa,
        "format": FORMAT,
        "version": VERSION,
        "content": content_of(cfg),
        "index_identity": index_identity(index),
        "encoders": [{"name": e.cfg.name, "kind": e.kind, "dim": e.dim, "max_length": e.max_length,
                      "class": type(e.model).__name__, "revision": model_revision(e.cfg.name)}
                     for e in encoders.encoders],
        "encoder_dtype": str(encoders.dtype).removeprefix("torch."),
        "text_dtype": text_dtype,
        "latents": vae,
        "shards": [{"file": shard_name(i), "source": f.path, "rows": f.num_rows} for i, f in enumerate(index.files)],
    }


class ShardWriter:
    """Encodes the rows of one input shard into the tensors of one cache shard (see :mod:`.format`)."""

    def __init__(self, cfg: Config, index: BucketIndex, encoders: TextEncoders, codec, latents: str,
                 text_dtype: str, batch_size: int, teacher: VisionTeacher | None = None):
        self.cfg, self.index, self.encoders, self.codec, self.teacher = cfg, index, encoders, codec, teacher
        self.latents, self.text_dtype, self.batch_size = latents, text_dtype, batch_size
        columns = list(cfg.data.caption_columns)
        # one caption column through the reader's own caption logic, the others as raw extra columns
        self.reader = RowReader(index, cfg.data.image_column, columns[:1], 1.0, False, columns[1:],
                                background=tuple(cfg.data.image_background), max_pixels=cfg.data.max_image_pixels)
        self.columns = columns

    def _images(self, images: np.ndarray, out: dict, key: str) -> None:
        """Add one bucket's image tensors (posterior, mean or pixels; the REPA targets) under ``key`` suffix."""
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
        if self.teacher is not None:
            grid = token_grid(self.cfg.model, *pixels.shape[2:])
            out.setdefault(f"repa{key}", []).append(self.teacher.features(pixels, grid).cpu())
        if isinstance(self.codec, PixelCodec):
            out.setdefault(f"image{key}", []).append(torch.from_numpy(images))
            return
        mean, std = posterior(self.codec, pixels)
        out.setdefault(f"mean{key}", []).append(mean.cpu())
        if self.latents == "posterior":
            out.setdefault(f"std{key}", []).append(std.cpu())

    def _text(self, captions: list[list[str]], n: int) -> dict[str, torch.Tensor]:
        """Every caption column of every row, encoded in batches; only the real tokens are kept."""
        out: dict[str, torch.Tensor] = {}
        for j, texts in enumerate(captions):
            out[f"text/{j}/present"] = torch.tensor([bool(t) for t in texts], dtype=torch.uint8)
            parts: dict[str, list] = {}
            for start in range(0, n, self.batch_size):
                cond = self.encoders.encode(texts[start:start + self.batch_size])
                for i, (tok, mask) in enumerate(zip(cond.tokens, cond.masks)):
                    parts.setdefault(f"{i}/mask", []).append(mask.cpu().to(torch.uint8))
                    parts.setdefault(f"{i}/tokens", []).append(tok[mask].cpu())
                if cond.pooled is not None:
                    parts.setdefault("pooled", []).append(cond.pooled.cpu())
            for name, values in parts.items():
                tensor = torch.cat(values)
                out[f"text/{j}/{name}"] = self._text_tensor(tensor, f"text/{j}/{name}", out)
            for i in range(len(self.encoders.sequence)):
                counts = out[f"text/{j}/{i}/mask"].sum(1, dtype=torch.int64)
                out[f"text/{j}/{i}/offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        return out

    def _text_tensor(self, tensor: torch.Tensor, name: str, out: dict) -> torch.Tensor:
        if name.endswith("/mask") or self.text_dtype == "auto":
            return tensor.contiguous()
        if self.text_dtype == "int8":
            if name.endswith("/pooled"):
                return tensor.contiguous()
            q, scale = quantize_int8(tensor)
            out[name.removesuffix("tokens") + "scale"] = scale
            return q
        return tensor.to(_DTYPES[self.text_dtype]).contiguous()

    def encode_shard(self, file_id: int) -> dict[str, torch.Tensor]:
        index = self.index
        ids = np.flatnonzero(index.file_id == file_id)
        n = index.files[file_id].num_rows
        rows = index.row[ids].astype(np.int64)
        captions = [[""] * n for _ in self.columns]
        corrupt = np.zeros(n, dtype=np.uint8)
        out: dict[str, list] = {}
        flip = self.cfg.data.random_flip
        for height, width in sorted(set(zip(index.bucket_height[ids].tolist(), index.bucket_width[ids].tolist()))):
            in_bucket = (index.bucket_height[ids] == height) & (index.bucket_width[ids] == width)
            order = np.argsort(rows[in_bucket], kind="stable")
            bucket_ids, bucket_rows = ids[in_bucket][order], rows[in_bucket][order]
            key = bucket_key(height, width)
            kept = []
            for start in range(0, len(bucket_ids), self.batch_size):
                chunk = bucket_ids[start:start + self.batch_size]
                samples = self.reader.read(chunk, np.random.default_rng(0))  # no draws matter: one column, no flip
                good = [(r, s) for r, s in zip(bucket_rows[start:start + len(chunk)], samples) if s is not None]
                for r, s in zip(bucket_rows[start:start + len(chunk)], samples):
                    if s is None:
                        corrupt[r] = 1
                        continue
                    captions[0][r] = s.caption
                    for j, column in enumerate(self.columns[1:], 1):
                        value = s.columns.get(column)
                        captions[j][r] = str(value) if value else ""
                if not good:
                    continue
                kept += [r for r, _ in good]
                images = np.stack([s.image for _, s in good])
                self._images(images, out, f"/{key}")
                if flip:
                    self._images(np.ascontiguousarray(images[:, :, ::-1]), out, f"_flip/{key}")
            if kept:
                out[f"rows/{key}"] = [torch.tensor(kept, dtype=torch.int64)]
        tensors = {name: torch.cat(parts).contiguous() for name, parts in out.items()}
        tensors["corrupt"] = torch.from_numpy(corrupt)
        tensors.update(self._text(captions, n))
        return tensors


def _prepare(cfg: Config, output_dir: Path, index: BucketIndex, manifest: dict) -> None:
    """Create the folder, its manifest and index copy; refuse a folder that holds another config's cache."""
    path = output_dir / MANIFEST
    if path.exists():
        import json

        found = json.loads(path.read_text())
        if found != manifest:
            differ = sorted(k for k in set(found) | set(manifest) if found.get(k) != manifest.get(k))
            raise ConfigError(f"--output_dir {output_dir} holds a cache made with another config or data (differs "
                              f"in {differ}); choose a new --output_dir or delete that folder")
    (output_dir / "shards").mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, manifest)
    target = output_dir / INDEX
    if not target.exists():
        tmp = output_dir / f".{INDEX}.tmp-{os.getpid()}"
        shutil.copyfile(cfg.data.bucket_indices_path, tmp)
        os.replace(tmp, target)


def precompute(cfg: Config, output_dir: str | Path, rank: int = 0, world: int = 1, device: str | None = None,
               batch_size: int = 32, latents: str = "posterior", text_dtype: str = "auto") -> dict:
    """Encode this rank's share of the shards into ``output_dir``; returns counts (written, skipped, rows/s)."""
    if latents not in LATENT_MODES:
        raise ConfigError(f"--latents {latents!r}; choose one of {list(LATENT_MODES)}")
    if text_dtype not in TEXT_DTYPES:
        raise ConfigError(f"--text_dtype {text_dtype!r}; choose one of {list(TEXT_DTYPES)}")
    output_dir = Path(output_dir)
    dev = torch.device(device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available()
                                  else "cpu"))
    index = BucketIndex.load(cfg.data.bucket_indices_path, cfg.data.parquet_folder)
    encoders = TextEncoders.from_config(cfg.encoders, dev)
    codec = make_codec(cfg.encoders, dev)
    teacher = load_teacher(cfg.train.repa, dev, cfg.encoders.dtype) if cfg.train.repa.enabled else None
    _prepare(cfg, output_dir, index, build_manifest(cfg, index, encoders, codec, latents, text_dtype, teacher))
    writer = ShardWriter(cfg, index, encoders, codec, latents, text_dtype, batch_size, teacher)
    written = skipped = rows = 0
    t0 = time.perf_counter()
    for file_id in range(rank, len(index.files), world):
        final = output_dir / shard_name(file_id)
        if final.exists():
            skipped += 1
            continue
        tensors = writer.encode_shard(file_id)
        tmp = final.with_name(f".{final.name}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, final)
        written += 1
        rows += index.files[file_id].num_rows
        log.info("rank %d: wrote %s (%d rows)", rank, final, index.files[file_id].num_rows)
    elapsed = time.perf_counter() - t0
    return {"rank": rank, "written": written, "skipped": skipped, "rows": rows, "seconds": elapsed,
            "rows_per_s": rows / elapsed if elapsed > 0 else 0.0}
