"""Which on-disk format for the precompute cache: safetensors (what mmdit.cache writes) vs Arrow IPC.

    python bench/cache_format.py                  # 512 rows of one sd3_256-like shard, 2000 random samples
    python bench/cache_format.py --rows 2048 --samples 5000

One synthetic shard with the shapes a real sd3_256 cache holds per row: the VAE posterior (mean and std,
16 x 32 x 32 bf16 each), two caption columns, each with Gemma (2304 wide) and ModernBERT (1024 wide) token
vectors of realistic lengths (bench/captions.py, unpadded) in bf16 plus a pooled CLIP vector (768). Both
formats store exactly these bytes, memory-mapped on read:

* safetensors, the mmdit.cache layout: per bucket ``mean``/``std`` [k, C, h, w]; per caption column and
  encoder the real tokens packed [sum, D] with ``offsets`` [n + 1]; read with ``safe_open(...).get_slice``;
* Arrow IPC (uncompressed, one record batch): one row per sample, one ``binary`` column per tensor; read
  with ``pa.memory_map`` + ``ipc.open_file`` and ``take`` of one row, then ``torch.frombuffer``.

Timed: random single-sample reads (one caption column, both encoders, the posterior), best of 3 runs, the
file in the page cache (a training loader reads a warm cache most of the time). Printed: samples/s of
each, their ratio, and the file sizes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from captions import caption_lengths  # noqa: E402

WIDTHS = (2304, 1024)  # Gemma-2-2B, ModernBERT-large
LATENT = (16, 32, 32)


def make_rows(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = {"mean": torch.randn(n, *LATENT, generator=g).bfloat16(),
            "std": torch.rand(n, *LATENT, generator=g).bfloat16()}
    for col in range(2):
        lengths = caption_lengths(n, 128, g)
        for i, width in enumerate(WIDTHS):
            rows[f"text/{col}/{i}/lengths"] = lengths
            rows[f"text/{col}/{i}/tokens"] = torch.randn(int(lengths.sum()), width, generator=g).bfloat16()
        rows[f"text/{col}/pooled"] = torch.randn(n, 768, generator=g).bfloat16()
    return rows


def write_safetensors(rows: dict, path: Path) -> None:
    out = {k: v for k, v in rows.items() if not k.endswith("/lengths")}
    for key, lengths in rows.items():
        if key.endswith("/lengths"):
            out[key.replace("lengths", "offsets")] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    save_file(out, str(path))


def write_arrow(rows: dict, path: Path) -> None:
    n = rows["mean"].shape[0]
    columns = {"mean": [rows["mean"][r].view(torch.int16).numpy().tobytes() for r in range(n)],
               "std": [rows["std"][r].view(torch.int16).numpy().tobytes() for r in range(n)]}
    for col in range(2):
        for i in range(len(WIDTHS)):
            lengths = rows[f"text/{col}/{i}/lengths"]
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            tokens = rows[f"text/{col}/{i}/tokens"].view(torch.int16).numpy()
            columns[f"text/{col}/{i}"] = [tokens[offsets[r]:offsets[r + 1]].tobytes() for r in range(n)]
        columns[f"text/{col}/pooled"] = [rows[f"text/{col}/pooled"][r].view(torch.int16).numpy().tobytes()
                                         for r in range(n)]
    table = pa.table({k: pa.array(v, type=pa.binary()) for k, v in columns.items()})
    with ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)


def read_safetensors(path: Path, samples: np.ndarray, cols: np.ndarray) -> float:
    t0 = time.perf_counter()
    with safe_open(str(path), framework="pt") as f:
        offsets = {k: f.get_tensor(k) for k in f.keys() if k.endswith("/offsets")}
        for r, c in zip(samples.tolist(), cols.tolist()):
            f.get_slice("mean")[r]
            f.get_slice("std")[r]
            for i in range(len(WIDTHS)):
                off = offsets[f"text/{c}/{i}/offsets"]
                f.get_slice(f"text/{c}/{i}/tokens")[int(off[r]):int(off[r + 1])]
            f.get_slice(f"text/{c}/pooled")[r]
    return time.perf_counter() - t0


def read_arrow(path: Path, samples: np.ndarray, cols: np.ndarray) -> float:
    t0 = time.perf_counter()
    table = ipc.open_file(pa.memory_map(str(path))).read_all()
    for r, c in zip(samples.tolist(), cols.tolist()):
        names = ["mean", "std", *[f"text/{c}/{i}" for i in range(len(WIDTHS))], f"text/{c}/pooled"]
        for name in names:
            buf = table.column(name)[r].as_buffer()
            torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--samples", type=int, default=2000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = make_rows(args.rows)
    rng = np.random.default_rng(0)
    samples, cols = rng.integers(0, args.rows, args.samples), rng.integers(0, 2, args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        st, arrow = Path(tmp) / "shard.safetensors", Path(tmp) / "shard.arrow"
        write_safetensors(rows, st)
        write_arrow(rows, arrow)
        for path in (st, arrow):  # warm the page cache
            path.read_bytes()
        t_st = min(read_safetensors(st, samples, cols) for _ in range(3))
        t_ar = min(read_arrow(arrow, samples, cols) for _ in range(3))
        size_st, size_ar = st.stat().st_size, arrow.stat().st_size
    print(f"{args.rows} rows, {args.samples} random samples (one caption column each), warm page cache, 1 thread")
    print(f"safetensors  {args.samples / t_st:10.0f} samples/s  {size_st / args.rows:10,.0f} B/row")
    print(f"arrow ipc    {args.samples / t_ar:10.0f} samples/s  {size_ar / args.rows:10,.0f} B/row")
    print(f"ratio safetensors/arrow: speed {t_ar / t_st:.2f}, size {size_st / size_ar:.3f}")


if __name__ == "__main__":
    main()
