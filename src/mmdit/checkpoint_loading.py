"""Loading a trained MMDiT for sampling: find the step, read its config, load the weights strictly with one
clear error for any mismatch, and keep the time scale in fp32.

Three sources: a trainer step folder (``step_<N>/``, full or sharded) or run folder; a Hub-style folder
written by ``python -m mmdit export`` (config.json + model.safetensors + mmdit_config.yaml, the whole
config the text encoders and VAE come from); or a Hub id (``owner/name``) of such a folder, downloaded
with huggingface_hub.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from .config import Config, ConfigError, read_config

log = logging.getLogger(__name__)

WEIGHTS = ("ema", "model")
HUB_CONFIG = "config.json"  # PyTorchModelHubMixin: the ModelConfig
HUB_WEIGHTS = "model.safetensors"
FULL_CONFIG = "mmdit_config.yaml"  # next to them in an export: encoders, VAE and sampling defaults
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# prefixes that wrappers add to state-dict keys: torch.compile, DDP
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class InferenceError(ValueError):
    """A bad inference request or an unusable checkpoint; the message says what and how to fix it."""


class CheckpointNotFoundError(InferenceError, FileNotFoundError):
    """The checkpoint path, or a file it must contain, does not exist."""


class CheckpointMismatchError(InferenceError):
    """The checkpoint's config.yaml does not describe its weights."""


class ImageSizeError(InferenceError):
    """Width/height the model cannot produce; the message names the nearest valid size."""


# ----------------------------------------------------------------------------------------------------
# checkpoint files


def is_pretrained_folder(path: Union[str, Path]) -> bool:
    """A Hub-style folder (``save_pretrained`` / ``python -m mmdit export``), not a trainer step folder."""
    from .train.checkpoint import CONFIG_FILE

    p = Path(path)
    return (p / HUB_CONFIG).is_file() and (p / HUB_WEIGHTS).is_file() and not (p / CONFIG_FILE).is_file()


def download_pretrained(repo_id: str) -> Path:
    """The local snapshot of a Hub model exported by mmdit (its three files and card)."""
    from huggingface_hub import snapshot_download

    from .hub_access import explain_hub_error

    try:
        folder = snapshot_download(repo_id, allow_patterns=[HUB_CONFIG, HUB_WEIGHTS, FULL_CONFIG, "README.md"])
    except Exception as err:  # not found, gated, offline: one message naming the repo and the fix
        raise CheckpointNotFoundError(explain_hub_error(repo_id, err)) from err
    return Path(folder)


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """The folder to load: ``path`` itself (a ``step_<N>`` folder with a config.yaml, or a Hub-style folder),
    the newest complete checkpoint of a run directory, the folder of a ``.safetensors`` file, or the
    download of a Hub id ``owner/name`` that is not a local path."""
    from .train.checkpoint import CONFIG_FILE, MARKER, latest_checkpoint

    p = Path(path).expanduser()
    if not p.exists() and _HUB_ID.match(str(path)):
        p = download_pretrained(str(path))
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {p} does not exist")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointNotFoundError(f"checkpoint {p} is a file but not a .safetensors weights file")
        p = p.parent
    if is_pretrained_folder(p):
        return p
    if (p / CONFIG_FILE).is_file():
        if not (p / MARKER).is_file():
            log.warning("checkpoint %s has no %s marker (an interrupted save?); loading it anyway", p, MARKER)
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointNotFoundError(
            f"checkpoint not found: {p} has no {CONFIG_FILE} and no complete step_<N> checkpoint folder inside"
        )
    return latest


def weights_file(step_dir: Path, weights: str = "ema") -> Path:
    """``ema.safetensors`` or ``model.safetensors`` in a step directory, with a clear error if absent."""
    from .train.checkpoint import WEIGHT_FILES

    if weights not in WEIGHTS:
        raise InferenceError(f"weights={weights!r}; choose one of {list(WEIGHTS)}")
    f = Path(step_dir) / WEIGHT_FILES[weights]
    if not f.is_file():
        other = "model" if weights == "ema" else "ema"
        has_other = (f.parent / WEIGHT_FILES[other]).is_file()
        alt = f" (it has {WEIGHT_FILES[other]}: use weights={other!r})" if has_other else ""
        raise CheckpointNotFoundError(f"checkpoint file not found: {f}{alt}")
    return f


def read_checkpoint_config(step_dir: Path) -> Config:
    from .train.checkpoint import CONFIG_FILE

    f = Path(step_dir) / CONFIG_FILE
    if is_pretrained_folder(step_dir):
        f = Path(step_dir) / FULL_CONFIG
        if not f.is_file():
            raise CheckpointNotFoundError(
                f"{step_dir} is a Hub-style folder without {FULL_CONFIG} (the text encoders and VAE to sample "
                f"with): load the bare network with MMDiT.from_pretrained, or re-export it with python -m mmdit "
                "export, which writes that file")
    if not f.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {f}")
    try:
        return read_config(f)
    except ConfigError as err:
        raise InferenceError(f"checkpoint config {f} is invalid: {err}") from None


def _strip_wrapper_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _shape_hint(state: dict[str, Tensor]) -> str:
    """What architecture the weights themselves look like (depth, width, input channels)."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    parts = []
    if blocks:
        parts.append(f"depth={max(blocks) + 1}")
    w = state.get("patch_embed.weight")
    if w is not None and w.dim() == 2:
        parts.append(f"hidden_size={w.shape[0]}")
        parts.append(f"in_channels*patch_size^2={w.shape[1]}")
    return ", ".join(parts)


def _collapse(keys: list[str], universe: set[str]) -> list[str]:
    """Name whole modules: ``blocks.2.*`` when every key of ``universe`` under ``blocks.2.`` is in ``keys``."""
    keyset, out, covered = set(keys), [], set()
    for k in keys:
        if k in covered:
            continue
        parts = k.split(".")
        name = k
        for n in range(1, len(parts)):
            prefix = ".".join(parts[:n]) + "."
            under = {u for u in universe if u.startswith(prefix)}
            if under <= keyset:
                name = prefix + "*"
                covered |= under
                break
        out.append(name)
    return out


def _list(items: list[str], n: int = 4) -> str:
    head = ", ".join(items[:n])
    return f"{head}, ... ({len(items)} in all)" if len(items) > n else head


def check_state_dict(model: torch.nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise one :class:`CheckpointMismatchError` listing missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (weights {list(state[k].shape)}, config {list(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"missing {_list(_collapse(missing, set(expected)))}")
    if unexpected:
        problems.append(f"unexpected {_list(_collapse(unexpected, set(state)))}")
    if shapes:
        problems.append(f"shape mismatch for {_list(shapes, 2)}")
    cfg = getattr(model, "cfg", None)
    described = (
        f" (config: model.depth={cfg.depth}, hidden_size={cfg.dim}, num_heads={cfg.heads}, "
        f"in_channels={cfg.in_channels}, patch_size={cfg.patch_size}, mlp_type={cfg.mlp_type})"
        if cfg is not None
        else ""
    )
    hint = _shape_hint(state)
    raise CheckpointMismatchError(
        f"{source} weights do not match its config{described}: {'; '.join(problems)}"
        + (f". The weights look like {hint}" if hint else "")
    )


def load_model(
    path: Union[str, Path],
    weights: str = "ema",
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
):
    """(MMDiT in eval mode on ``device``/``dtype``, its Config, the folder) from a checkpoint, a Hub-style
    folder or a Hub id."""
    from .model import MMDiT

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    step_dir = resolve_checkpoint(path)
    cfg = read_checkpoint_config(step_dir)
    with torch.device("meta"):
        model = MMDiT(cfg.model)
    state = _strip_wrapper_prefixes(read_weights(step_dir, weights, cfg))
    check_state_dict(model, state, f"checkpoint {step_dir}")
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # non-persistent buffers
        model = MMDiT(cfg.model)
        model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    keep_time_scale_fp32(model)
    return model, cfg, step_dir


def read_weights(step_dir: Path, weights: str, cfg: Config) -> dict[str, Tensor]:
    """The state dict to sample with: a Hub-style folder's one model.safetensors (the export chose model or
    EMA weights: its card says which), a full step folder's file, or a sharded one's consolidated here."""
    from safetensors.torch import load_file

    from .train.checkpoint import WEIGHT_FILES
    from .train.sharded_checkpoint import consolidated_weights, is_sharded

    if is_pretrained_folder(step_dir):
        return load_file(str(Path(step_dir) / HUB_WEIGHTS), device="cpu")
    if weights in WEIGHTS and is_sharded(step_dir) and not (Path(step_dir) / WEIGHT_FILES[weights]).is_file():
        from .model import MMDiT

        return consolidated_weights(step_dir, weights, MMDiT(cfg.model))
    return load_file(str(weights_file(step_dir, weights)), device="cpu")


def keep_time_scale_fp32(model: torch.nn.Module) -> None:
    """The learnable time scale (~1000) multiplies t before the sinusoids; in bf16 t x 1000 has a step of
    4 near 1000, so this one scalar stays fp32 (t arrives in fp32 from the sampler)."""
    ts = getattr(getattr(getattr(model, "condition", None), "time", None), "time_scale", None)
    if isinstance(ts, torch.nn.Parameter) and ts.dtype != torch.float32:
        ts.data = ts.data.float()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
