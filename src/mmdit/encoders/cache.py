"""An LRU cache of encoded captions: a repeated caption is text-encoded once.

Real datasets rarely repeat captions, but synthetic and templated ones do; the cache then removes most
of the loader's text-encoder work. A missing caption is encoded on its own (batch of one), so its
encoding never depends on its batch-mates or on what the cache held before: runs with and without
loader ranks, and resumed runs, stay bit-identical.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..conditioning import TextCondition


class CaptionCache:
    """Wraps ``encode(captions) -> TextCondition`` with a per-caption LRU of at most ``size`` entries."""

    def __init__(self, encode, size: int):
        self.encode_fn, self.size = encode, size
        self.entries: OrderedDict[str, tuple] = OrderedDict()
        self.hits = self.misses = 0

    def encode(self, captions: list[str]) -> TextCondition:
        if self.size <= 0:
            return self.encode_fn(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self.entries))
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        for caption in missing:
            fresh = self.encode_fn([caption])
            self.entries[caption] = ([t[0] for t in fresh.tokens], [m[0] for m in fresh.masks],
                                     None if fresh.pooled is None else fresh.pooled[0])
        rows = []
        for caption in captions:
            self.entries.move_to_end(caption)
            rows.append(self.entries[caption])
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        n = len(rows[0][0])
        pooled = None if rows[0][2] is None else torch.stack([r[2] for r in rows])
        return TextCondition(
            tokens=[torch.stack([r[0][i] for r in rows]) for i in range(n)],
            masks=[torch.stack([r[1][i] for r in rows]) for i in range(n)],
            pooled=pooled,
        )
