"""Random access to a precomputed cache: global sample id -> image tensors and every caption's embedding.

Shard files are memory-mapped by safetensors; the small tensors of a shard (row maps, masks, offsets,
pooled vectors) are read once when it is first opened, the large ones (latents, token vectors) sliced
per sample. A :class:`CacheReader` is not thread-safe: give each worker thread its own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import Config, ConfigError
from ..data.indices import BucketIndex
from .format import INDEX, bucket_key, check_matches, read_manifest, shard_name

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_cache_index(cfg: Config) -> BucketIndex:
    """The bucket index the cache was built from (its copy in the cache), after checking the manifest."""
    cache_dir = Path(cfg.data.cache_dir)
    manifest = read_manifest(cache_dir)
    index = BucketIndex.load(cache_dir / INDEX, cfg.data.parquet_folder or None, verify="none")
    config_index = Path(cfg.data.bucket_indices_path) if cfg.data.bucket_indices_path else None
    other = BucketIndex.load(config_index, verify="none") if config_index and config_index.exists() else None
    check_matches(manifest, cfg, cache_dir, other)
    check_matches(manifest, cfg, cache_dir, index)
    missing = [s["file"] for s in manifest["shards"] if not (cache_dir / s["file"]).exists()]
    if missing:
        raise ConfigError(f"the cache in {cache_dir} is incomplete: {len(missing)} of {len(manifest['shards'])} "
                          f"shards missing (first: {missing[0]}); re-run python -m mmdit precompute with the same "
                          "arguments to finish it")
    return index


@dataclass
class CachedSample:
    """One sample as stored: image tensors (posterior mean/std, mean, or uint8 pixels) and its chosen caption."""

    sample_id: int
    image: dict[str, torch.Tensor]  # "mean" (+ "std") [C, h, w], or "image" uint8 [h, w, 3]; "repa" [tokens, D]
    masks: list[torch.Tensor]  # bool [L_i] per sequence encoder
    tokens: list[torch.Tensor]  # [real_i, D_i] per sequence encoder
    pooled: torch.Tensor | None  # [P]


class _Shard:
    """One open cache shard: where each row's image tensors are, and the small per-row text tensors."""

    def __init__(self, path: Path, columns: int, encoders: int, text_dtype: torch.dtype, repa: bool):
        self.handle = safe_open(str(path), framework="pt")
        keys = set(self.handle.keys())
        self.text_dtype = text_dtype
        self.corrupt = self.handle.get_tensor("corrupt").numpy().astype(bool)
        self.slot: dict[int, tuple[str, int]] = {}
        for key in keys:
            if key.startswith("rows/"):
                bucket = key.split("/", 1)[1]
                for slot, row in enumerate(self.handle.get_tensor(key).tolist()):
                    self.slot[row] = (bucket, slot)
        kinds = ("mean", "std", "image", "repa") if repa else ("mean", "std", "image")  # REPA targets when used
        self.image_kinds = sorted({k.split("/")[0] for k in keys if k.split("/")[0] in kinds})
        self.present = [self.handle.get_tensor(f"text/{j}/present").numpy().astype(bool) for j in range(columns)]
        self.masks = [[self.handle.get_tensor(f"text/{j}/{i}/mask").bool() for i in range(encoders)]
                      for j in range(columns)]
        self.offsets = [[self.handle.get_tensor(f"text/{j}/{i}/offsets").tolist() for i in range(encoders)]
                        for j in range(columns)]
        self.quantized = "text/0/0/scale" in keys if encoders else False
        self.pooled = [self.handle.get_tensor(f"text/{j}/pooled") if f"text/{j}/pooled" in keys else None
                       for j in range(columns)]

    def image(self, row: int, flipped: bool) -> dict[str, torch.Tensor]:
        bucket, slot = self.slot[row]
        suffix = "_flip" if flipped else ""
        return {kind: self.handle.get_slice(f"{kind}{suffix}/{bucket}")[slot:slot + 1][0]
                for kind in self.image_kinds}

    def text(self, row: int, column: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        masks, tokens = [], []
        for i, mask in enumerate(self.masks[column]):
            a, b = self.offsets[column][i][row], self.offsets[column][i][row + 1]
            packed = self.handle.get_slice(f"text/{column}/{i}/tokens")[a:b]
            if self.quantized:
                scale = self.handle.get_slice(f"text/{column}/{i}/scale")[a:b]
                packed = packed.float() * scale[:, None]
            masks.append(mask[row])
            tokens.append(packed.to(self.text_dtype))
        pooled = self.pooled[column]
        return masks, tokens, None if pooled is None else pooled[row].to(self.text_dtype)


class CacheReader:
    """Samples of a cache by global sample id (``index`` is :func:`load_cache_index`'s)."""

    def __init__(self, cfg: Config, index: BucketIndex, max_open: int = 64):
        self.cache_dir = Path(cfg.data.cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        self.index = index
        self.columns = len(cfg.data.caption_columns)
        self.encoders = sum(1 for e in self.manifest["encoders"] if e["kind"] == "sequence")
        self.text_dtype = _DTYPES[self.manifest["encoder_dtype"]]
        self.repa = cfg.train.repa.enabled
        self.max_open = max_open
        self._open: OrderedDict[int, _Shard] = OrderedDict()

    def shard(self, file_id: int) -> _Shard:
        shard = self._open.get(file_id)
        if shard is None:
            shard = _Shard(self.cache_dir / shard_name(file_id), self.columns, self.encoders, self.text_dtype,
                           self.repa)
            self._open[file_id] = shard
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        self._open.move_to_end(file_id)
        return shard

    def is_corrupt(self, sample_id: int) -> bool:
        return bool(self.shard(int(self.index.file_id[sample_id])).corrupt[self.index.row[sample_id]])

    def present(self, sample_id: int) -> list[bool]:
        """Which caption columns of the sample are non-empty."""
        shard = self.shard(int(self.index.file_id[sample_id]))
        return [bool(p[self.index.row[sample_id]]) for p in shard.present]

    def sample(self, sample_id: int, column: int, flipped: bool) -> CachedSample:
        shard = self.shard(int(self.index.file_id[sample_id]))
        row = int(self.index.row[sample_id])
        if shard.corrupt[row]:
            raise ValueError(f"sample id {sample_id} is a corrupt row; callers replace it first")
        masks, tokens, pooled = shard.text(row, column)
        return CachedSample(sample_id, shard.image(row, flipped), masks, tokens, pooled)

    def bytes_per_image(self) -> float:
        """Cache bytes on disk per row of the index (the shards only)."""
        total = sum((self.cache_dir / s["file"]).stat().st_size for s in self.manifest["shards"])
        return total / max(1, len(self.index))


def check_bucket(sample: CachedSample, height: int, width: int, factor: int) -> None:
    """A stored sample must have the scheduled bucket's shape (a cache of other data would not)."""
    image = sample.image.get("image")
    shape = tuple(image.shape[:2]) if image is not None else tuple(x * factor for x in sample.image["mean"].shape[1:])
    if shape != (height, width):
        raise ConfigError(f"cached sample {sample.sample_id} is {shape[0]}x{shape[1]} px, the schedule says bucket "
                          f"{bucket_key(height, width)}; the cache does not belong to this index")

