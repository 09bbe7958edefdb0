"""RNG state of a rank as JSON: Python, NumPy, torch CPU/CUDA and named generators, captured and restored exactly.

Checkpoints keep one such record per rank in ``trainer_state.json`` so a resumed run draws the same random
numbers (timesteps, noise, CFG dropout, data order) as the uninterrupted one. :func:`to_jsonable` also makes
the rest of the trainer state JSON-safe (tensors and arrays are tagged and base64-encoded, bit for bit).
"""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def to_jsonable(obj: Any) -> Any:
    """Turn tensors, numpy arrays/scalars, tuples and Paths into JSON-safe values (tagged for tensors/arrays)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.view(torch.uint8) if t.dtype != torch.uint8 and t.numel() else t
        return {
            "__tensor__": base64.b64encode(raw.numpy().tobytes()).decode("ascii"),
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
        }
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        encoded = base64.b64encode(a.tobytes()).decode("ascii")
        return {"__ndarray__": encoded, "dtype": a.dtype.str, "shape": list(a.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"trainer_state key {k!r} of type {type(k).__name__} is not JSON-safe")
            out[k] = to_jsonable(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"trainer_state value of type {type(obj).__name__} is not JSON-safe: {obj!r:.80}")


def from_jsonable(obj: Any) -> Any:
    """Inverse of :func:`to_jsonable` (tuples come back as lists)."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            dtype = getattr(torch, obj["dtype"])
            buf = bytearray(base64.b64decode(obj["__tensor__"]))
            raw = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
            return raw.view(dtype).reshape(obj["shape"]).clone()
        if "__ndarray__" in obj:
            buf = base64.b64decode(obj["__ndarray__"])
            return np.frombuffer(buf, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------
# RNG state


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def numpy_generator_state(gen: np.random.Generator) -> dict:
    """JSON-safe state of a numpy ``Generator`` (its bit generator's state dict)."""
    return to_jsonable(gen.bit_generator.state)


def set_numpy_generator_state(gen: np.random.Generator, state: dict) -> None:
    gen.bit_generator.state = from_jsonable(state)


def capture_rng_state(generators: dict[str, torch.Generator | np.random.Generator] | None = None) -> dict:
    """JSON-safe RNG state of this process: python ``random``, numpy global, torch CPU, and CUDA (the current
    device, when CUDA is initialised). Gather one per rank and restore each rank's own.

    ``generators`` optionally adds named torch/numpy generators (e.g. a data sampler's).
    """
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "name": np_name,
            "keys": [int(k) for k in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": _b64(torch.get_rng_state()),
        "cuda": None,
    }
    # only the current device (one GPU per rank under torchrun), and only if CUDA is already in use:
    # capturing must not create CUDA contexts on other GPUs or in CPU-only processes
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        state["cuda"] = {"device": device, "state": _b64(torch.cuda.get_rng_state(device))}
    if generators:
        named = {}
        for name, gen in generators.items():
            if isinstance(gen, torch.Generator):
                named[name] = {"kind": "torch", "state": _b64(gen.get_state())}
            elif isinstance(gen, np.random.Generator):
                named[name] = {"kind": "numpy", "state": numpy_generator_state(gen)}
            else:
                raise TypeError(f"generator {name!r} has unsupported type {type(gen).__name__}")
        state["generators"] = named
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator | np.random.Generator] | None = None) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA into the current device, if captured and available;
    call after ``torch.cuda.set_device``)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():  # restored into the current device (the saving rank's own)
        torch.cuda.set_rng_state(_unb64(cuda["state"]), device=torch.cuda.current_device())
    for name, gen in (generators or {}).items():
        saved = state.get("generators", {}).get(name)
        if saved is None:
            raise KeyError(f"the saved RNG state has no generator named {name!r}")
        if isinstance(gen, torch.Generator):
            gen.set_state(_unb64(saved["state"]))
        else:
            set_numpy_generator_state(gen, saved["state"])
