"""Recaptioning with a vision-language model: a long and a short caption per image, as new parquet columns.

The VLM is any Hugging Face image-text-to-text model that ``AutoProcessor`` / ``AutoModelForImageTextToText``
load and whose processor has a chat template (LLaVA, Qwen2-VL, ...). Generation is batched and greedy, in
bf16 on CUDA. The short caption comes from the same VLM with a second prompt, or, with ``short_model``, from
a causal text model that shortens the long caption. A caption that comes back empty or cut off (no end token
within ``max_new_tokens``) is generated once more with twice the token budget; if it is still bad, the
row's ``recaption_flag`` names it (``long:empty``, ``short:cut_off``, ...; ``unreadable`` for an image
that does not decode).

Input shards are never written: each output shard is a copy with the new columns, written to a temporary
name and renamed when complete, so a rerun skips finished shards (resumable per shard). Several workers
split the shard list by ``RANK``/``WORLD_SIZE`` (torchrun), ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``
(a SLURM array) or ``SLURM_PROCID``/``SLURM_NTASKS`` (srun).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmdit.data.images import ImagePolicy, SkipImage, decode
from mmdit.data.phase import list_shards

log = logging.getLogger(__name__)


@dataclass
class RecaptionConfig:
    """What to generate and how (the CLI flags of ``data/recaption.py``)."""

    model: str
    prompt_long: str = "Describe this image in detail."
    prompt_short: str = "Describe this image in one short sentence."
    short_model: str = ""  # a causal text LM that shortens the long caption; "" = the VLM with prompt_short
    short_template: str = "Shorten this image description to one sentence: {caption}\nShort description:"
    max_new_tokens: int = 256
    max_new_tokens_short: int = 48
    batch_size: int = 16
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on the CPU
    image_column: str = "image"
    long_column: str = "recaption"
    short_column: str = "recaption_short"
    flag_column: str = "recaption_flag"


def worker_of() -> tuple[int, int]:
    """(this worker, workers) from torchrun, a SLURM array or srun; (0, 1) alone."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
                        ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


class Generator:
    """A loaded model (VLM, or text LM for ``short_model``) with batched greedy generation."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, vision: bool):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        self.vision, self.device = vision, device
        if vision:
            self.processor = AutoProcessor.from_pretrained(name)
            self.tokenizer = self.processor.tokenizer
            self.model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype)
        else:
            self.processor = self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        self.tokenizer.padding_side = "left"  # generation appends on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(device).eval().requires_grad_(False)
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])

    def _inputs(self, prompts: list[str], images: list | None) -> dict:
        if not self.vision:
            return self.tokenizer(prompts, return_tensors="pt", padding=True)
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True)
            for p in prompts]
        return self.processor(text=texts, images=images, return_tensors="pt", padding=True)

    @torch.inference_mode()
    def generate(self, prompts: list[str], images: list | None, max_new_tokens: int) -> list[tuple[str, str]]:
        """(text, problem) per prompt; problem is "" , "empty" or "cut_off" (no end token within the budget)."""
        inputs = {k: v.to(self.device) for k, v in self._inputs(prompts, images).items()}
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        results = []
        for ids in new:
            finished = any(t in self.eos for t in ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            results.append((text, "empty" if not text else "" if finished else "cut_off"))
        return results


def _with_retry(generate, prompts: list[str], images: list | None, max_new_tokens: int) -> list[tuple[str, str]]:
    """Generate; bad answers (empty or cut off) once more with twice the token budget, then keep the problem."""
    results = generate(prompts, images, max_new_tokens)
    bad = [i for i, (_, problem) in enumerate(results) if problem]
    if bad:
        again = generate([prompts[i] for i in bad], None if images is None else [images[i] for i in bad],
                         2 * max_new_tokens)
        for i, result in zip(bad, again):
            results[i] = result
    return results


class Recaptioner:
    """Long and short captions for batches of PIL images."""

    def __init__(self, cfg: RecaptionConfig, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                                             if torch.cuda.is_available() else "cpu")
        table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        dtype = table.get(cfg.dtype) or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.vlm = Generator(cfg.model, self.device, dtype, vision=True)
        self.shortener = Generator(cfg.short_model, self.device, dtype, vision=False) if cfg.short_model else None

    def caption(self, images: list) -> tuple[list[str], list[str], list[str]]:
        """(long captions, short captions, flags) for the images; an image of None is unreadable."""
        cfg = self.cfg
        readable = [i for i, image in enumerate(images) if image is not None]
        longs, shorts = [""] * len(images), [""] * len(images)
        flags = ["unreadable" if image is None else "" for image in images]
        if not readable:
            return longs, shorts, flags
        batch = [images[i] for i in readable]
        long = _with_retry(self.vlm.generate, [cfg.prompt_long] * len(batch), batch, cfg.max_new_tokens)
        if self.shortener is None:
            short = _with_retry(self.vlm.generate, [cfg.prompt_short] * len(batch), batch, cfg.max_new_tokens_short)
        else:
            prompts = [cfg.short_template.format(caption=text) for text, _ in long]
            short = _with_retry(self.shortener.generate, prompts, None, cfg.max_new_tokens_short)
        for i, (text_l, bad_l), (text_s, bad_s) in zip(readable, long, short):
            longs[i], shorts[i] = text_l, text_s
            flags[i] = ",".join(f"{kind}:{bad}" for kind, bad in (("long", bad_l), ("short", bad_s)) if bad)
        return longs, shorts, flags


def _image(value) -> object | None:
    try:
        return decode(value, ImagePolicy(min_side=1)).image
    except SkipImage as skip:
        log.warning("unreadable image, left uncaptioned: %s", skip)
        return None


def recaption_shard(recaptioner: Recaptioner, source: Path, target: Path) -> int:
    """Write ``target``: ``source``'s rows and row groups plus the caption columns; returns the rows captioned."""
    cfg = recaptioner.cfg
    handle = pq.ParquetFile(source)
    if cfg.image_column not in handle.schema_arrow.names:
        raise ValueError(f"{source} has no column {cfg.image_column!r} (its columns: {handle.schema_arrow.names}); "
                         "pass --image_column")
    table = handle.read()
    row_group = handle.metadata.row_group(0).num_rows if handle.num_row_groups else max(1, table.num_rows)
    values = table.column(cfg.image_column)
    longs, shorts, flags = [], [], []
    for start in range(0, table.num_rows, cfg.batch_size):
        images = [_image(v.as_py()) for v in values[start:start + cfg.batch_size]]
        a, b, c = recaptioner.caption(images)
        longs += a
        shorts += b
        flags += c
    for name, column in ((cfg.long_column, longs), (cfg.short_column, shorts), (cfg.flag_column, flags)):
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, pa.array(column, type=pa.string()))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(table, tmp, row_group_size=row_group)
    os.replace(tmp, target)
    return table.num_rows


def recaption_folder(cfg: RecaptionConfig, input_dir: str | Path, output_dir: str | Path, rank: int = 0,
                     world: int = 1, device: torch.device | None = None) -> dict:
    """Caption this worker's share of the shards (shard i belongs to worker i % world); finished ones are skipped."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if input_dir.resolve() == output_dir.resolve():
        raise ValueError(f"--output_dir {output_dir} is the input folder; recaptioning writes copies, never the input")
    shards = list_shards(input_dir)  # relative paths, sorted: every worker sees the same list
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    todo = [s for s in mine if not (output_dir / s).exists()]
    stats = {"rank": rank, "shards": len(mine), "skipped": len(mine) - len(todo), "rows": 0}
    if not todo:
        return stats
    recaptioner = Recaptioner(cfg, device)
    for shard in todo:
        stats["rows"] += recaption_shard(recaptioner, input_dir / shard, output_dir / shard)
        log.info("worker %d/%d: captioned %s", rank, world, shard)
    return stats
