"""One decision about what a job resumes from, taken by the first model rank and sent to every rank.

The first model rank resolves ``train.resume`` (``auto``: the newest complete checkpoint), reads its
``trainer_state.json`` and compares the *data layout* recorded there (:func:`data_layout`: what the
order of samples depends on) with this job's. A different layout is refused with one message naming the
keys that differ, unless ``train.allow_layout_change=true``: then the run continues from the recorded
micro-step cursor with a new schedule segment (:mod:`mmdit.data.segments`: no sample of the current epoch
skipped or repeated) and says what it changed. The :class:`ResumePlan` goes to every rank (loaders too)
as JSON over the data group, and each model rank checks that the checkpoint it loads is that step: ranks
that see different files (a save directory that is not shared, a stale NFS cache) fail instead of
training on different states.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from ..data.segments import SCHEDULE_KEYS
from . import checkpoint as ckpt
from . import lineage

log = logging.getLogger(__name__)
SCHEDULE_VERSION = 1  # bump when the sample order of a given layout changes


class ResumeError(ConfigError):
    """The checkpoint to resume from does not fit this job; the message says what differs and the fix."""


def data_layout(cfg: Config, num_model_ranks: int) -> dict:
    """Everything the global sample order (and the micro-step -> optimizer-step mapping) depends on."""
    return {
        "schedule_version": SCHEDULE_VERSION,
        "model_ranks": num_model_ranks,
        "batch_size": cfg.data.batch_size,
        "token_budget": cfg.data.token_budget,
        "max_batch_size": cfg.data.max_batch_size,
        "small_buckets": cfg.data.small_buckets,
        "data_seed": cfg.data.seed,
        "patch_pixels": cfg.model.pixel_step,
        "text_tokens": text_tokens_per_sample(cfg) if cfg.data.token_budget or cfg.data.max_tokens else 0,
        "max_tokens": cfg.data.max_tokens,
        "accumulation_steps": cfg.train.accumulation_steps,
    }


def text_tokens_per_sample(cfg: Config) -> int:
    """Text tokens a sample can bring (each sequence encoder's max_length): what the token budget counts."""
    return sum(e.max_length for e in cfg.encoders.text if e.kind == "sequence")


@dataclass
class ResumePlan:
    """Where every rank starts: the checkpoint (None: from scratch), its step and the data cursor."""

    path: str | None
    step: int
    start_micro: int  # the next micro-step of the global schedule
    stop_micro: int  # the micro-step the run ends before (total_steps reached)
    samples_seen: int  # global samples trained on before start_micro
    segments: list[dict] = field(default_factory=list)  # the schedule segments (mmdit.data.segments)
    error: str | None = None  # set when the checkpoint does not fit: every rank raises it
    lineage: str = ""  # the lineage this job's checkpoints belong to (mmdit.train.lineage)
    parent: str | None = None  # the checkpoint that lineage branched from

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> ResumePlan:
        return ResumePlan(**json.loads(text))


def layout_differences(recorded: dict, current: dict) -> dict[str, tuple]:
    """``key -> (recorded, current)`` for every layout key that differs."""
    keys = sorted(set(recorded) | set(current))
    return {k: (recorded.get(k), current.get(k)) for k in keys if recorded.get(k) != current.get(k)}


def plan_resume(cfg: Config, run_dir: Path, num_model_ranks: int) -> ResumePlan:
    """The first model rank's decision (see the module docstring); a refusal is returned in ``error``."""
    try:
        choice = lineage.choose(run_dir, cfg.train.resume)
    except ckpt.CheckpointError as err:
        return ResumePlan(None, 0, 0, 0, 0, error=str(err))
    plan = _plan_from(cfg, choice.path, num_model_ranks)
    plan.lineage, plan.parent = choice.lineage, choice.parent
    if choice.note and not plan.error:
        log.warning("%s", choice.note)
    return plan


def _plan_from(cfg: Config, path: Path | None, num_model_ranks: int) -> ResumePlan:
    layout = data_layout(cfg, num_model_ranks)
    accum = cfg.train.accumulation_steps
    if path is None:
        return ResumePlan(None, 0, 0, cfg.train.total_steps * accum, 0, [{"start": 0, "layout": layout}])
    state = ckpt.read_trainer_state(path)
    step = int(state["step"])
    recorded = state.get("data_layout")
    segments = state.get("schedule_segments")
    if recorded is None or segments is None:
        return ResumePlan(str(path), step, 0, 0, 0, error=(
            f"checkpoint {path} records no data layout (written by an older version); the sample order "
            "cannot be continued exactly. Start a new run with train.init_from=<that step dir>"))
    cursor = int(state["data_cursor"])
    samples = int(state.get("samples_seen", 0))
    stop = cursor + max(0, cfg.train.total_steps - step) * accum
    differ = layout_differences(recorded, layout)
    if not differ:
        return ResumePlan(str(path), step, cursor, stop, samples, segments)
    listing = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in differ.items())
    if not cfg.train.allow_layout_change:
        return ResumePlan(str(path), step, cursor, stop, samples, error=(
            f"resuming {path} with a different data layout ({listing}); the order of samples depends on "
            "these, so this run would skip or repeat data. Restore the recorded values, or set "
            f"train.allow_layout_change=true to continue from the recorded cursor (micro-step {cursor}, "
            f"{samples} samples) with the new layout"))
    if "schedule_version" in differ:
        return ResumePlan(str(path), step, cursor, stop, samples, error=(
            f"checkpoint {path} was written with sample-order version {recorded.get('schedule_version')}, this "
            f"code has {SCHEDULE_VERSION}: the recorded order cannot be rebuilt"))
    if any(k in SCHEDULE_KEYS for k in differ):
        if segments[-1]["start"] == cursor:  # a second change before any step of the first: replace it
            segments = segments[:-1]
        segments = [*segments, {"start": cursor, "layout": layout}]
    else:  # accumulation only: the order of micro-steps is unchanged
        segments = [*segments[:-1], {**segments[-1], "layout": {**segments[-1]["layout"], **layout}}]
    log.warning("resuming %s with a new data layout (%s): continuing from micro-step %d (%d samples seen); "
                "the rest of this epoch is re-batched for the new layout", path, listing, cursor, samples)
    return ResumePlan(str(path), step, cursor, stop, samples, segments)


def agree_resume(cfg: Config, run_dir: Path, rt) -> ResumePlan:
    """Every rank gets the first model rank's :class:`ResumePlan` (raises its error everywhere)."""
    main = rt.topology.model_ranks[0]
    text = plan_resume(cfg, run_dir, rt.num_model_ranks).to_json() if rt.rank == main else ""
    if rt.distributed:
        text = _broadcast_text(text, main, rt.data_group)
    plan = ResumePlan.from_json(text)
    if plan.error:
        raise ResumeError(plan.error)
    if rt.rank == main:
        lineage.write_current(run_dir, plan.lineage, plan.parent)
    return plan


def _broadcast_text(text: str, src: int, group) -> str:
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=src, group=group)
    if dist.get_rank() != src:
        data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src=src, group=group)
    return bytes(data.tolist()).decode()


def check_loaded_step(plan: ResumePlan, loaded_step: int, rank: int) -> None:
    """A model rank that loaded another step than the plan's (a different file) stops the job."""
    if loaded_step != plan.step:
        raise ResumeError(
            f"rank {rank} loaded step {loaded_step} from {plan.path}, but the first model rank resumed step "
            f"{plan.step}: ranks see different checkpoints; put train.save_dir on a file system every node shares")
