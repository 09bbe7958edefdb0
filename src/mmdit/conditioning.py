"""The text condition handed from the encoders to the model, and what "dropped" means for CFG."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class TextCondition:
    """Encoded captions for a batch.

    tokens[i]: [B, L_i, D_i] hidden states of sequence encoder i; masks[i]: [B, L_i] bool, True = real token;
    pooled: [B, P] pooled vector (CLIP) or None.
    A dropped encoder (CFG dropout, and the sampler's unconditional branch) has zero tokens, an all-False
    mask (nothing to attend to) and a zero pooled vector: the model then sees no text at all.
    """

    tokens: list[Tensor]
    masks: list[Tensor]
    pooled: Optional[Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.tokens[0].shape[0]

    @property
    def num_encoders(self) -> int:
        """Sequence encoders plus the pooled one, the units that CFG dropout acts on."""
        return len(self.tokens) + (self.pooled is not None)

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> TextCondition:
        return TextCondition(
            tokens=[t.to(device=device, dtype=dtype or t.dtype) for t in self.tokens],
            masks=[m.to(device) for m in self.masks],
            pooled=None if self.pooled is None else self.pooled.to(device=device, dtype=dtype or self.pooled.dtype),
        )

    def keep(self, keep: Tensor) -> TextCondition:
        """Drop encoders per sample: ``keep`` is [B, num_encoders] bool (last column = pooled, if any).

        Dropped tokens are zeroed with ``torch.where``, not multiplied by 0: an fp16 encoder can leave a NaN
        there, and NaN x 0 is NaN, which attention's P.V would spread to every output. Kept rows are returned
        as they are (padded slots are zeroed where the model reads them, in the ConditionEmbedder).
        """
        tokens, masks = [], []
        for i, (tok, mask) in enumerate(zip(self.tokens, self.masks)):
            k = keep[:, i].to(tok.device)
            tokens.append(torch.where(k[:, None, None], tok, torch.zeros((), dtype=tok.dtype, device=tok.device)))
            masks.append(mask & k[:, None])
        pooled = None
        if self.pooled is not None:
            k = keep[:, -1].to(self.pooled.device)[:, None]
            pooled = torch.where(k, self.pooled, torch.zeros((), dtype=self.pooled.dtype, device=self.pooled.device))
        return TextCondition(tokens, masks, pooled)

    def trimmed(self, multiple: int = 16) -> TextCondition:
        """Each encoder's tokens cut to the batch's longest caption, rounded up to ``multiple`` (at most the
        padded length): the model then computes (and the loader sends) no all-padding columns.

        Call it where the masks live on the CPU (the loader): finding the longest caption reads them.
        """
        lengths = [trimmed_length(mask, multiple) for mask in self.masks]
        return TextCondition([tok[:, :n] for tok, n in zip(self.tokens, lengths)],
                             [mask[:, :n] for mask, n in zip(self.masks, lengths)], self.pooled)

    def dropped(self) -> TextCondition:
        """The unconditional condition: every encoder dropped for every sample."""
        return self.keep(torch.zeros(self.batch_size, self.num_encoders, dtype=torch.bool))

    @staticmethod
    def cat(parts: list[TextCondition]) -> TextCondition:
        """Concatenate along the batch (e.g. cond and uncond halves for CFG in one pass)."""
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextCondition(
            tokens=[torch.cat([p.tokens[i] for p in parts]) for i in range(len(parts[0].tokens))],
            masks=[torch.cat([p.masks[i] for p in parts]) for i in range(len(parts[0].masks))],
            pooled=pooled,
        )


def trimmed_length(mask: Tensor, multiple: int = 16) -> int:
    """Columns to keep of a [B, L] token mask: one past its last real token in any row, rounded up to
    ``multiple`` and capped at L. Masks need not be prefixes; a batch with no real token keeps ``multiple``."""
    if multiple <= 0:
        raise ValueError(f"multiple={multiple} must be > 0 (16 keeps tensor-core shapes)")
    columns = mask.any(dim=0).nonzero()
    last = int(columns[-1]) + 1 if len(columns) else 0
    return min(mask.shape[1], max(multiple, -(-last // multiple) * multiple))
