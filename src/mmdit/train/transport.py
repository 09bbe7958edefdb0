"""Loader -> model messages over torch.distributed: a fixed-size header, then the tensors it describes.

The data path always uses a gloo group with CPU tensors (point-to-point send/recv, which gloo supports on
every platform); model ranks copy the batch to their device. This keeps one code path for CPU and GPU and
lets a model rank receive in a background thread while it computes (NCCL send/recv in a thread beside
DDP's all-reduce is a known deadlock pattern). On a machine with CUDA both ends use pinned host buffers:
the loader fills them with non-blocking device -> host copies and one synchronisation per batch, the
model rank receives into them and copies to the GPU on a side stream in its receive thread
(:class:`mmdit.train.batches.DeviceCopy`). Without CUDA there is nothing to pin and that path is
skipped: tensors are sent and received as plain CPU tensors.

Text travels without padding: per sequence encoder the token mask (one byte per slot) and only the real
token vectors, packed; the header carries how many there are, and the receiver pads them again with
zeros (the model never reads padded slots). The wire then carries the unpadded payload plus a header and
the masks (``bench/streaming.py`` prints the ratio).

With REPA (:mod:`mmdit.train.repa`) the teacher's targets travel too, [B, tokens, D] on the image-token grid in
the encoders' dtype; the header's last three slots give their tokens, width and dtype (width 0: none).

The header's ``flags`` carry the stop protocol (:mod:`mmdit.train.stopping`) inside the data stream:
``FLAG_STOP_REQUESTED`` on a batch says its loader was asked to stop (a signal reached the loader), and
an *end message* (``FLAG_END``, a header with no tensors after it) tells a model rank that its loader
sends nothing more. Model ranks answer with one control message each (the micro-step to end at, tag
``CONTROL_TAG``), so loaders never stop in the middle of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..conditioning import TextCondition

MAGIC = 0x4D4D4454  # "MMDT"
MAX_ENCODERS = 4
_FIXED = 13
_PER_ENCODER = 4  # length, width, real tokens, dtype
_REPA = _FIXED + _PER_ENCODER * MAX_ENCODERS  # REPA targets: tokens, width (0 = none), dtype
HEADER_SIZE = _REPA + 3
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLAG_STOP_REQUESTED = 1  # the loader that sent this batch was asked to stop
FLAG_END = 2  # no batch follows this header: the loader is done
CONTROL_TAG = 7  # model rank -> its loader: "end at micro-step E" (one int64)


@dataclass
class Batch:
    """One model rank's micro-batch: latents (or pixels) of one bucket, its encoded captions, sample ids."""

    step: int
    sample_ids: Tensor  # int64 [B]
    latents: Tensor  # [B, C, H, W]
    cond: TextCondition
    corrupt: int = 0  # corrupt images replaced in this batch
    stop_requested: bool = False  # its loader was asked to stop (FLAG_STOP_REQUESTED)
    ready: object = None  # a CUDA event: the side-stream copy to the device is done once it has fired
    loader_busy: float = 0.0  # its loader's recent busy fraction (from the header)
    repa: Tensor | None = None  # REPA teacher targets [B, image tokens, D] (train.repa), else None

    @property
    def size(self) -> int:
        return self.latents.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
        return Batch(self.step, self.sample_ids, self.latents.to(device, dtype or self.latents.dtype,
                                                                 non_blocking=True),
                     self.cond.to(device, dtype), self.corrupt, self.stop_requested, self.ready, self.loader_busy,
                     None if self.repa is None else self.repa.to(device, non_blocking=True))

    def device_tensors(self) -> list[Tensor]:
        """The tensors the model reads (sample ids stay on the host)."""
        cond = self.cond
        return [self.latents, *cond.tokens, *cond.masks, *([] if cond.pooled is None else [cond.pooled]),
                *([] if self.repa is None else [self.repa])]


@dataclass(frozen=True)
class Header:
    """What the tensors after it are: shapes and one dtype per tensor (encoders may differ in dtype: an fp32
    CLIP beside a bf16 Gemma), in a fixed number of int64s."""

    step: int
    batch: int
    channels: int
    height: int
    width: int
    latent_dtype: torch.dtype
    text_shapes: tuple[tuple[int, int, int], ...]  # (length, width, real tokens in the batch) per sequence encoder
    text_dtypes: tuple[torch.dtype, ...]  # per sequence encoder
    pooled_dim: int  # 0 = none
    pooled_dtype: torch.dtype
    corrupt: int
    flags: int = 0  # FLAG_* bits
    loader_busy: float = 0.0  # fraction of recent time the loader spent building batches (not waiting)
    repa_shape: tuple[int, int] = (0, 0)  # REPA targets per sample: (tokens, width); width 0 = none
    repa_dtype: torch.dtype = torch.float32

    def encode(self) -> Tensor:
        h = torch.zeros(HEADER_SIZE, dtype=torch.int64)
        h[:_FIXED] = torch.tensor([
            MAGIC, self.step, self.batch, self.channels, self.height, self.width,
            DTYPES.index(self.latent_dtype), DTYPES.index(self.pooled_dtype), len(self.text_shapes),
            self.pooled_dim, self.corrupt, self.flags, round(1000 * self.loader_busy),
        ])
        for i, (shape, dtype) in enumerate(zip(self.text_shapes, self.text_dtypes, strict=True)):
            h[_FIXED + _PER_ENCODER * i:_FIXED + _PER_ENCODER * (i + 1)] = torch.tensor([*shape, DTYPES.index(dtype)])
        h[_REPA:] = torch.tensor([*self.repa_shape, DTYPES.index(self.repa_dtype)])
        return h

    @staticmethod
    def decode(h: Tensor) -> Header:
        v = h.tolist()
        if v[0] != MAGIC:
            raise RuntimeError(f"data message header has magic {v[0]:#x}, expected {MAGIC:#x}: ranks out of step")
        slots = [v[_FIXED + _PER_ENCODER * i:_FIXED + _PER_ENCODER * (i + 1)] for i in range(v[8])]
        return Header(v[1], v[2], v[3], v[4], v[5], DTYPES[v[6]], tuple(tuple(s[:3]) for s in slots),
                      tuple(DTYPES[s[3]] for s in slots), v[9], DTYPES[v[7]], v[10], v[11], v[12] / 1000,
                      (v[_REPA], v[_REPA + 1]), DTYPES[v[_REPA + 2]])


def header_of(batch: Batch, flags: int = 0, loader_busy: float = 0.0) -> Header:
    cond = batch.cond
    if len(cond.tokens) > MAX_ENCODERS:
        raise ValueError(f"at most {MAX_ENCODERS} sequence encoders can be streamed, got {len(cond.tokens)}")
    b, c, h, w = batch.latents.shape
    pooled, repa = cond.pooled, batch.repa
    return Header(batch.step, b, c, h, w, batch.latents.dtype,
                  tuple((t.shape[1], t.shape[2], int(m.sum())) for t, m in zip(cond.tokens, cond.masks)),
                  tuple(t.dtype for t in cond.tokens), 0 if pooled is None else pooled.shape[1],
                  torch.float32 if pooled is None else pooled.dtype, batch.corrupt, flags, loader_busy,
                  (0, 0) if repa is None else (repa.shape[1], repa.shape[2]),
                  torch.float32 if repa is None else repa.dtype)


def _payload(batch: Batch) -> list[Tensor]:
    cond = batch.cond
    tensors = [batch.sample_ids, batch.latents]
    for tok, mask in zip(cond.tokens, cond.masks):
        tensors += [mask.to(torch.uint8), tok[mask]]  # only the real tokens travel: no padding on the wire
    if cond.pooled is not None:
        tensors.append(cond.pooled)
    if batch.repa is not None:
        tensors.append(batch.repa)
    return _to_host([t.detach() for t in tensors])


def _to_host(tensors: list[Tensor]) -> list[Tensor]:
    """Host copies to send: device tensors go to pinned buffers by non-blocking copies and one synchronisation
    for the whole batch; host tensors are sent as they are (see the module docstring)."""
    on_device = [t.is_cuda for t in tensors]
    if not any(on_device):
        return [t.contiguous() for t in tensors]
    out = []
    for t, cuda in zip(tensors, on_device):
        if cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            t = host
        out.append(t.contiguous())
    torch.cuda.synchronize()  # every copy of this batch has landed before the sends read the buffers
    return out


def send_batch(batch: Batch, dst: int, group: dist.ProcessGroup, stop_requested: bool = False,
               loader_busy: float = 0.0) -> list:
    """Send header then tensors without blocking; returns the work handles (wait on them before reuse)."""
    flags = FLAG_STOP_REQUESTED if stop_requested else 0
    tensors = [header_of(batch, flags, loader_busy).encode(), *_payload(batch)]
    return [dist.isend(t, dst=dst, group=group) for t in tensors]


def send_end(step: int, dst: int, group: dist.ProcessGroup) -> dist.Work:
    """The end message: a header with ``FLAG_END`` and nothing after it (returns the send's handle)."""
    end = Header(step, 0, 0, 0, 0, torch.float32, (), (), 0, torch.float32, 0, FLAG_END)
    return dist.isend(end.encode(), dst=dst, group=group)


def recv_batch(src: int, group: dist.ProcessGroup) -> Batch | None:
    """Receive one header, allocate exactly what it describes, then receive the tensors; None at the end."""
    raw = torch.empty(HEADER_SIZE, dtype=torch.int64)
    dist.recv(raw, src=src, group=group)
    h = Header.decode(raw)
    if h.flags & FLAG_END:
        return None
    pin = torch.cuda.is_available()  # pinned buffers make the model rank's copy to the GPU asynchronous
    shapes = [((h.batch,), torch.int64), ((h.batch, h.channels, h.height, h.width), h.latent_dtype)]
    for (length, width, real), dtype in zip(h.text_shapes, h.text_dtypes):
        shapes += [((h.batch, length), torch.uint8), ((real, width), dtype)]
    if h.pooled_dim:
        shapes.append(((h.batch, h.pooled_dim), h.pooled_dtype))
    if h.repa_shape[1]:
        shapes.append(((h.batch, *h.repa_shape), h.repa_dtype))
    buffers = [torch.empty(shape, dtype=dtype, pin_memory=pin) for shape, dtype in shapes]
    works = [dist.irecv(buf, src=src, group=group) for buf in buffers]
    for work in works:
        work.wait()
    n = len(h.text_shapes)
    masks = [buffers[2 + 2 * i].view(torch.bool) for i in range(n)]  # 0/1 bytes: a view, still pinned
    tokens = []
    for i, ((length, width, _), dtype) in enumerate(zip(h.text_shapes, h.text_dtypes)):  # padded again here
        padded = torch.zeros((h.batch, length, width), dtype=dtype, pin_memory=pin)  # padded slots hold zeros
        padded[masks[i]] = buffers[3 + 2 * i]
        tokens.append(padded)
    pooled = buffers[2 + 2 * n] if h.pooled_dim else None
    repa = buffers[-1] if h.repa_shape[1] else None
    return Batch(h.step, buffers[0], buffers[1], TextCondition(tokens, masks, pooled), h.corrupt,
                 bool(h.flags & FLAG_STOP_REQUESTED), loader_busy=h.loader_busy, repa=repa)
