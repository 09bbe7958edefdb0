"""The on-disk format of a precomputed cache, and the manifest that ties it to a config.

A cache folder (``python -m mmdit precompute --output_dir <cache>``) holds::

    manifest.json            format version, what was encoded and how (compared with the training config)
    index.npz                a copy of the bucket index the cache was built from (the schedule's input)
    shards/<file_id>.safetensors   one file per input parquet shard, written to a temporary name, then renamed

Each shard file holds, for the ``n`` rows of its input shard (``row`` = row number in that parquet file):

* ``rows/<h>x<w>`` int64 [k]: the rows of bucket h x w with a readable image, ascending; the image tensors of
  that bucket are in this order: ``mean/<h>x<w>`` and ``std/<h>x<w>`` [k, C, h/f, w/f] (the VAE posterior,
  ``latents=posterior``), ``mean/<h>x<w>`` only (``latents=mean``), or ``image/<h>x<w>`` uint8 [k, h, w, 3]
  (pixel space). With ``data.random_flip`` the mirrored image's tensors follow as ``mean_flip/...`` etc.
  (a VAE latent of a mirrored image is not the mirrored latent).
* with ``train.repa.enabled``: ``repa/<h>x<w>`` [k, tokens, D] (and ``repa_flip/...``), the REPA teacher's
  targets on the image-token grid of ``model.pixel_step`` in the encoders' dtype (:mod:`mmdit.encoders.vision`);
  the manifest's ``teacher`` names the teacher and ``content["repa"]`` what a training config must match.
* ``corrupt`` uint8 [n]: 1 where the image could not be decoded (training replaces it, as online).
* per caption column ``j`` (``data.caption_columns`` order) and sequence encoder ``i``:
  ``text/<j>/<i>/mask`` uint8 [n, L_i] (the tokenizer's mask at the padded length), ``text/<j>/<i>/tokens``
  [sum of real tokens, D_i] (only the real tokens, packed in row order), ``text/<j>/<i>/offsets`` int64 [n + 1]
  (row r's tokens are ``tokens[offsets[r]:offsets[r + 1]]``) and, when stored as int8, ``text/<j>/<i>/scale``
  float32 [sum] (one absmax scale per token vector); ``text/<j>/pooled`` [n, P]; ``text/<j>/present`` uint8
  [n] (the caption is non-empty: an empty one falls back to the next column, as :class:`RowReader` does).

Every caption column is encoded because the column is drawn per micro-step (``first_caption_prob``); the
batch is assembled from the chosen ones, padded with zeros and trimmed (``TextCondition.trimmed(16)``)
exactly as the transport does. Files carry no timestamps: a rerun writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..config import Config, ConfigError
from ..data.indices import BucketIndex

FORMAT = "mmdit-cache"
VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.npz"
SHARDS = "shards"
LATENT_MODES = ("posterior", "mean")
TEXT_DTYPES = ("auto", "fp32", "bf16", "fp16", "int8")


def bucket_key(height: int, width: int) -> str:
    return f"{height}x{width}"


def shard_name(file_id: int) -> str:
    return f"{SHARDS}/{file_id:05d}.safetensors"


def index_identity(index: BucketIndex) -> str:
    """SHA-256 of what decides the sample ids: the rows' files, row numbers and buckets, and the shards' names,
    row counts and footers (not mtimes or the index's creation time, so a rebuilt index of the same data matches)."""
    h = hashlib.sha256()
    for array in (index.file_id, index.row, index.bucket_height, index.bucket_width):
        h.update(np.ascontiguousarray(array, dtype=np.int32).tobytes())
    h.update(json.dumps([[f.path, f.num_rows, f.footer_sha256] for f in index.files]).encode())
    return h.hexdigest()


def content_of(cfg: Config) -> dict:
    """The config fields a cache's contents depend on: a training config must match them to use the cache."""
    enc, data, repa = cfg.encoders, cfg.data, cfg.train.repa
    content = {
        "text_encoders": [{"name": t.name, "kind": t.kind, "max_length": t.max_length} for t in enc.text],
        "vae": enc.vae,
        "vae_subfolder": enc.vae_subfolder,
        "image_column": data.image_column,
        "caption_columns": list(data.caption_columns),
        "random_flip": data.random_flip,
        "image_background": list(data.image_background),
        "max_image_pixels": data.max_image_pixels,
    }
    if repa.enabled:  # REPA targets only when asked for: a cache with them serves a config without REPA too
        content["repa"] = {"encoder": repa.encoder, "image_size": repa.image_size, "pixel_step": cfg.model.pixel_step}
    return content


def folder_revision(path: str) -> str:
    """A model's revision: the hub commit of a downloaded snapshot, else the SHA-256 of a local folder's config.json."""
    parts = Path(path).parts
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
        return parts[parts.index("snapshots") + 1]
    config = Path(path) / "config.json"
    return "sha256:" + hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.exists() else "unknown"


def model_revision(name: str) -> str:
    """:func:`folder_revision` of what a configured name loads: a local folder, or the hub snapshot already in
    the local cache (no download); "unknown" when neither is there."""
    from ..encoders.text import resolve_name

    path = resolve_name(name)
    if not Path(path).is_dir() and name:
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(name, local_files_only=True)
        except Exception:  # not in the local cache (or not a hub id): nothing to compare
            return "unknown"
    return folder_revision(path)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise ConfigError(f"data.cache_dir={str(cache_dir)!r} has no {MANIFEST}; build the cache with "
                          "`python -m mmdit precompute --config <preset> --output_dir <cache_dir>`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(f"{path} is format {manifest.get('format')!r} version {manifest.get('version')}, this "
                          f"code reads {FORMAT!r} version {VERSION}; re-run python -m mmdit precompute")
    return manifest


def check_matches(manifest: dict, cfg: Config, cache_dir: str | Path, index: BucketIndex | None = None) -> None:
    """Refuse a cache built for other encoders, columns or data: one message naming every difference."""
    wanted = content_of(cfg)
    found = manifest["content"]
    diffs = [f"{key}: cache has {found.get(key)!r}, config has {value!r}" for key, value in wanted.items()
             if found.get(key) != value]
    configured = [t.name for t in cfg.encoders.text] + ([cfg.encoders.vae] if cfg.encoders.vae else [])
    recorded = [e.get("revision", "unknown") for e in manifest.get("encoders", [])]
    if cfg.encoders.vae:
        recorded.append(manifest.get("latents", {}).get("revision", "unknown"))
    if cfg.train.repa.enabled and "teacher" in manifest:
        configured.append(cfg.train.repa.encoder)
        recorded.append(manifest["teacher"].get("revision", "unknown"))
    for name, then in zip(configured, recorded):  # same name, other weights (a new hub revision, a retrained folder)
        now = model_revision(name)
        if "unknown" not in (then, now) and then != now:
            diffs.append(f"{name}: cache built from revision {then}, the config now loads {now}")
    if index is not None and index_identity(index) != manifest["index_identity"]:
        diffs.append(f"bucket index: {cfg.data.bucket_indices_path} is not the index the cache was built from")
    if diffs:
        raise ConfigError(f"the cache in data.cache_dir={str(cache_dir)!r} was built with another config ("
                          + "; ".join(diffs) + "). Re-run `python -m mmdit precompute` with this config into a "
                          "new --output_dir, or train with data.source=online")
