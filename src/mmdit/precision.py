"""Mixed precision, decided in one place: the dtypes of parameters, compute, gradient reduction and inputs
for DDP and FSDP, from ``train.precision`` (the trainer, the FSDP policy, validation and evaluation all ask
:func:`precision_of`).

Per mode (README, "Numerics", says which test checks each):

* fp32: everything fp32, no autocast.
* bf16 (or fp16) with DDP: fp32 weights, optimizer state, EMA and gradients; the forward runs under autocast
  (matmuls and attention in bf16, norms and softmax in fp32); gradients are all-reduced in fp32.
* bf16 (or fp16) with FSDP: fp32 sharded master weights, optimizer state and EMA; each unit is all-gathered
  in bf16 (``MixedPrecisionPolicy.param_dtype``), the forward also runs under autocast, and gradients are
  reduce-scattered in fp32 (``reduce_dtype``).

In every mode, coordinates stay fp32: the timestep, ``t * time_scale`` (the learnable scale is a 0-d
parameter that FSDP leaves unsharded, in fp32), RoPE angles and positions. FSDP2 would cast every floating
forward input of every wrapped module to ``param_dtype`` (t = 0.7183 -> 0.71875, angle 4000.7 -> 4000), so
the policy sets ``cast_forward_inputs=False`` and the model casts what must match its weights where it
enters: the latent patches and each encoder's tokens to their projection's dtype, the pooled vector to the
conditioning vector's. Inputs may then come in any dtype (bf16 encoders beside fp32 weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """The dtypes of one training run (see the module docstring)."""

    compute: torch.dtype  # autocast dtype of the forward; fp32 = no autocast
    params: torch.dtype  # what the forward reads weights in (FSDP all-gathers in it; DDP keeps fp32)
    reduce: torch.dtype  # gradient all-reduce (DDP) / reduce-scatter (FSDP)
    master: torch.dtype = torch.float32  # the weights the optimizer updates, its state, the EMA
    coordinates: torch.dtype = torch.float32  # t, t * time_scale, RoPE angles, positions: never cast

    @property
    def autocast(self) -> bool:
        return self.compute != torch.float32

    def autocast_context(self, device: torch.device | str):
        """``torch.autocast`` to :attr:`compute` (disabled for fp32)."""
        return torch.autocast(torch.device(device).type, dtype=self.compute, enabled=self.autocast)


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """``train.precision`` as a dtype: auto = bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}; choose one of {list(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return _DTYPES[precision]


def precision_of(precision: str, device: torch.device | str, parallel: str = "ddp") -> Precision:
    """The dtypes for ``train.precision`` on ``device`` under ``train.parallel`` (ddp or fsdp)."""
    compute = compute_dtype(precision, device)
    params = compute if parallel == "fsdp" else torch.float32
    return Precision(compute=compute, params=params, reduce=torch.float32)
