"""Power-function EMA profiles tracked during training, and their snapshots on disk (post-hoc EMA, EDM2).

Time is counted in images seen (global, all model ranks): a bucket's batch size may vary from step to step,
and the profiles' telescoping identity (:mod:`.phema`) holds for any step lengths. Each optimizer step moves
every profile by ``beta = power_function_beta(std, t, t - t_prev)``; every ``train.phema.snapshot_every``
steps (and at ``train.total_steps``) each profile is written to
``<run_dir>/phema/std<std>-img<images:012d>.safetensors`` (dtype ``train.phema.snapshot_dtype``; the file's
metadata holds std, images and step), atomically (temporary name, then rename). ``python -m mmdit ema``
reconstructs any EMA length from these files. The profiles themselves (fp32) are part of every checkpoint
(``phema.safetensors`` + ``trainer_state["phema"]``, or the sharded checkpoint's ``phema`` entry), so a resume
continues them exactly. Under FSDP each profile is sharded like the weights (one DTensor per parameter, as
:class:`~.parallel.ShardedEMA`): every model rank updates its shard, and a snapshot gathers the full tensors
(a collective) for the first model rank to write.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .phema import power_function_beta

SNAPSHOT_DIR = "phema"
SNAPSHOT_RE = re.compile(r"^std(\d+\.\d+)-img(\d+)\.safetensors$")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def profile_key(std: float) -> str:
    return f"std{std:.3f}"


def snapshot_name(std: float, images: int) -> str:
    return f"{profile_key(std)}-img{int(images):012d}.safetensors"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class PowerFunctionEMA:
    """One fp32 copy of the parameters per profile std (sharded like them under FSDP), on the model's device;
    ``update`` after each optimizer step."""

    def __init__(self, model: nn.Module, stds: list[float]):
        self.stds = [float(s) for s in stds]
        self.profiles = {profile_key(s): {n: p.detach().float().clone() for n, p in model.named_parameters()}
                         for s in self.stds}
        self.images = 0  # the time of the last update (global images seen)
        self.step = 0

    @torch.no_grad()
    def update(self, model: nn.Module, images: int, step: int) -> None:
        """Move every profile to time ``images`` (> the last update's): the weights trained in between count
        for ``images - self.images`` images."""
        if images <= self.images:
            raise ValueError(f"post-hoc EMA update at {images} images, not after the last one ({self.images})")
        live = {n: _local(p.detach()).float() for n, p in model.named_parameters()}
        for std, profile in zip(self.stds, self.profiles.values()):
            beta = float(power_function_beta(std, images, images - self.images))
            torch._foreach_lerp_([_local(t) for t in profile.values()], [live[n] for n in profile], 1.0 - beta)
        self.images, self.step = int(images), int(step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``std<std>/<param>`` tensors, the live ones (DTensors under FSDP: what DCP saves and loads in
        place; plain: one safetensors file in a checkpoint)."""
        return {f"{key}/{name}": t for key, profile in self.profiles.items() for name, t in profile.items()}

    def meta(self) -> dict:
        """The JSON part of the state (trainer_state["phema"])."""
        return {"stds": self.stds, "images": self.images, "step": self.step}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Tensors as :meth:`state_dict` names them (full or sharded) and the :meth:`meta` dict."""
        self.load_meta(meta)
        missing = sorted(set(self.state_dict()) - set(tensors))
        if missing:
            raise KeyError(f"post-hoc EMA state lacks {missing[:4]} ({len(missing)} in all)")
        for name, t in self.state_dict().items():
            full = tensors[name].to(device=t.device, dtype=t.dtype)
            if isinstance(t, DTensor) and not isinstance(full, DTensor):  # a full (DDP) state into shards
                full = distribute_tensor(full, t.device_mesh, t.placements)
            t.copy_(full)

    def load_meta(self, meta: dict) -> None:
        """The JSON part alone (the tensors were loaded in place, e.g. by DCP)."""
        if [float(s) for s in meta["stds"]] != self.stds:
            raise ValueError(f"the checkpoint tracks post-hoc EMA stds {meta['stds']}, this run "
                             f"train.phema.stds={self.stds}: restore the recorded list to resume")
        self.images, self.step = int(meta["images"]), int(meta["step"])

    @torch.no_grad()
    def start_from(self, model: nn.Module, images: int, step: int) -> None:
        """Begin mid-run (a checkpoint without post-hoc EMA state): every profile holds today's weights, as if
        they had been the weights since time 0 (the reconstruction is then exact only from here on)."""
        live = {n: _local(p.detach()).float() for n, p in model.named_parameters()}
        for profile in self.profiles.values():
            torch._foreach_copy_([_local(t) for t in profile.values()], [live[n] for n in profile])
        self.images, self.step = int(images), int(step)

    def write_snapshots(self, run_dir: Path, dtype: str, write: bool = True) -> list[Path]:
        """Every profile at the current time into ``<run_dir>/phema/`` (temporary name, fsync, rename).
        Under FSDP every model rank calls this (the gather is a collective); only ``write`` ranks write."""
        out_dir = Path(run_dir) / SNAPSHOT_DIR
        written = []
        for std, profile in zip(self.stds, self.profiles.values()):
            tensors = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().to("cpu", DTYPES[dtype])
                       .contiguous() for k, v in profile.items()}
            if not write:
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            final = out_dir / snapshot_name(std, self.images)
            tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
            save_file(tensors, str(tmp), metadata={"std": repr(std), "images": str(self.images),
                                                   "step": str(self.step)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            written.append(final)
        return written


def list_snapshots(run_dir: Path) -> list[dict]:
    """The snapshots of a run folder (or of its ``phema/`` folder itself): dicts of path, std, images, step,
    sorted by (images, std)."""
    folder = Path(run_dir)
    if (folder / SNAPSHOT_DIR).is_dir():
        folder = folder / SNAPSHOT_DIR
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        if not SNAPSHOT_RE.match(path.name):
            continue
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        found.append({"path": path, "std": float(meta["std"]), "images": int(meta["images"]),
                      "step": int(meta["step"])})
    return sorted(found, key=lambda s: (s["images"], s["std"]))
