"""The loader -> model wire format between two real gloo ranks: every text length, dtype and flag round-trips,
and only the real text tokens travel.

On a machine without CUDA the pinned-buffer / side-stream path of the transport is skipped (there is no
pinned memory without CUDA; transport.py says so); the CUDA test below runs it where a GPU exists.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmdit.conditioning import TextCondition
from mmdit.train.transport import Batch, recv_batch, send_batch, send_end

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (text lengths per sequence encoder, their dtypes, pooled width, pooled dtype, latent dtype): trimmed lengths
# of every size; encoders of different dtypes in one batch (a bf16 Gemma beside an fp32 ModernBERT, an fp16
# CLIP, bf16 latents)
CASES = [((16, 48), (F32, F32), 24, F32, F32), ((1, 128), (BF16, BF16), 0, F32, F32), ((80,), (F16,), 768, F16, F32),
         ((128, 128, 7), (F32,) * 3, 8, F32, F32), ((16, 9, 33), (BF16, F32, F16), 24, F16, BF16),
         ((5,), (F32,), 12, BF16, F16)]


def make_batch(step: int, lengths, dtypes, pooled: int, pooled_dtype, latent_dtype) -> Batch:
    g = torch.Generator().manual_seed(step)
    b = 3
    tokens = [torch.randn(b, n, 8 + i, generator=g).to(dtype) for i, (n, dtype) in enumerate(zip(lengths, dtypes))]
    masks = [torch.rand(b, n, generator=g) > 0.3 for n in lengths]
    pooled_t = torch.randn(b, pooled, generator=g).to(pooled_dtype) if pooled else None
    latents = torch.randn(b, 4, 2 + step, 5, generator=g).to(latent_dtype)
    # REPA targets on every other batch, in the first encoder's dtype: one per latent pixel, 6 wide
    repa = torch.randn(b, (2 + step) * 5, 6, generator=g).to(dtypes[0]) if step % 2 else None
    return Batch(step, torch.arange(b) + 100 * step, latents, TextCondition(tokens, masks, pooled_t), corrupt=step,
                 repa=repa)


def _peer(rank: int, store_path: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        if rank == 0:
            for step, case in enumerate(CASES):
                for work in send_batch(make_batch(step, *case), 1, None, stop_requested=step == 2):
                    work.wait()
            send_end(len(CASES), 1, None).wait()
        else:
            for step, case in enumerate(CASES):
                got, want = recv_batch(0, None), make_batch(step, *case)
                assert got.step == step and got.corrupt == step and got.stop_requested == (step == 2)
                assert torch.equal(got.sample_ids, want.sample_ids) and torch.equal(got.latents, want.latents)
                assert got.latents.dtype == want.latents.dtype
                for a, b in zip(got.cond.masks, want.cond.masks, strict=True):
                    assert a.dtype == b.dtype and torch.equal(a, b)
                for a, b, mask in zip(got.cond.tokens, want.cond.tokens, want.cond.masks, strict=True):
                    # only real tokens travel; padded slots arrive as zeros (the model never reads them)
                    assert a.dtype == b.dtype and torch.equal(a, torch.where(mask[..., None], b, 0))
                assert (got.cond.pooled is None) == (want.cond.pooled is None)
                if want.cond.pooled is not None:
                    assert got.cond.pooled.dtype == want.cond.pooled.dtype
                    assert torch.equal(got.cond.pooled, want.cond.pooled)
                assert (got.repa is None) == (want.repa is None)
                if want.repa is not None:
                    assert got.repa.dtype == want.repa.dtype and torch.equal(got.repa, want.repa)
            assert recv_batch(0, None) is None  # the end message
    finally:
        dist.destroy_process_group()


def test_the_wire_carries_the_unpadded_payload():
    from mmdit.train.transport import HEADER_SIZE, _payload

    batch = make_batch(0, *CASES[0])
    wire = 8 * HEADER_SIZE + sum(t.numel() * t.element_size() for t in _payload(batch))
    real = sum(int(m.sum()) * t.shape[2] * 4 for t, m in zip(batch.cond.tokens, batch.cond.masks))
    floor = batch.latents.numel() * 4 + real + batch.cond.pooled.numel() * 4 + batch.sample_ids.numel() * 8
    overhead = 8 * HEADER_SIZE + sum(m.numel() for m in batch.cond.masks)  # the header and a byte per mask slot
    assert wire == floor + overhead
    with_repa = make_batch(1, *CASES[1])  # REPA targets travel unpadded: exactly their bytes more (bf16 here)
    repa_wire = sum(t.numel() * t.element_size() for t in _payload(with_repa))
    with_repa.repa = None
    assert repa_wire - sum(t.numel() * t.element_size() for t in _payload(with_repa)) == 3 * 15 * 6 * 2


def test_every_length_dtype_and_flag_round_trips(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_peer, args=(str(tmp_path / "store"),), nprocs=2, join=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned-buffer / side-stream path needs CUDA")
def test_side_stream_copy_delivers_identical_tensors_on_the_device():
    from mmdit.train.batches import DeviceCopy

    device = torch.device("cuda")
    host = make_batch(1, (16, 48), (BF16, F32), 24, BF16, F32)
    copied = DeviceCopy(device)(host)
    torch.cuda.current_stream().wait_event(copied.ready)
    assert copied.latents.is_cuda and torch.equal(copied.latents.cpu(), host.latents)
    for a, b in zip(copied.device_tensors(), host.device_tensors()):
        assert torch.equal(a.cpu(), b)
