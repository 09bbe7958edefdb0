"""Typed configuration: dataclasses for every component, loaded from YAML presets with CLI overrides.

OmegaConf merges a preset file (``configs/<name>.yaml``) and ``key.sub=value`` overrides onto the
dataclass schema, so a wrong key or type fails at load time; ``__post_init__`` checks choices and
cross-field rules and names the offending key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config_checks import ConfigError, _choice, _positive, _probability
from .config_eval import EvalConfig  # the eval section; ConfigError is re-exported for every caller
from .config_train_methods import MuonConfig, PhemaConfig, RepaConfig, check_methods_parallel, check_repa

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"

POS_ENCODINGS = ("RoPE2d", "RoPE", "absolute", "NoPE")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "naive", "flash_attn", "xformers", "cosine")
CHECKPOINT_POLICIES = ("none", "attention", "mlp", "attention+mlp", "full", "every_k:<k>")
MLP_TYPES = ("swiglu", "gelu")


@dataclass
class ModelConfig:
    """MMDiT architecture. ``hidden_size``/``num_heads`` of 0 mean the SD3 rule: 64 x depth, depth heads."""

    depth: int = 2
    hidden_size: int = 0
    num_heads: int = 0
    mlp_ratio: float = 4.0
    mlp_type: str = "swiglu"
    patch_size: int = 2
    in_channels: int = 16
    # auto: SDPA without a mask when no text is padded, FlexAttention when padded on CUDA, masked SDPA on CPU
    attention: str = "auto"
    pos_encoding: str = "RoPE2d"
    qk_norm: bool = True
    # widths of the token-sequence text encoders (e.g. Gemma-2-2B 2304, ModernBERT-large 1024)
    text_dims: list[int] = field(default_factory=lambda: [2304, 1024])
    # width of the pooled text vector (CLIP-L projection 768); 0 = no pooled input
    pooled_dim: int = 768
    # pixels per latent pixel (8 for the SD3 VAE, 1 in pixel space)
    latent_factor: int = 8
    # largest image side in pixels now, and the one the run started at (RoPE interpolation)
    max_res: int = 256
    max_res_orig: int = 256
    time_scale_init: float = 1000.0
    # activation checkpointing: none | attention | mlp | attention+mlp | full | every_k:<k> (every k-th block
    # full, from the first); checkpoint_attn / checkpoint_mlp are the older per-block aliases
    checkpoint: str = "none"
    checkpoint_attn: bool = False
    checkpoint_mlp: bool = False
    # token routing in training (TREAD, mmdit.model.routing): this share of the image tokens skips the blocks
    # [route_start, route_end) (slice bounds, negative from the end); 0 = off. Off at inference always
    route: float = 0.0
    route_start: int = 2
    route_end: int = -2

    def __post_init__(self) -> None:
        _positive("model.depth", self.depth)
        if not 0.0 <= self.route < 1.0:
            raise ConfigError(f"model.route={self.route} must be in [0, 1): the share of image tokens that skip")
        if self.route and not range(self.depth)[self.route_start:self.route_end]:
            raise ConfigError(f"model.route_start={self.route_start}, model.route_end={self.route_end} select no "
                              f"block of depth {self.depth}; e.g. model.route_start=1 model.route_end=-1")
        policy = self.checkpoint
        if policy.startswith("every_k:"):
            k = policy.partition(":")[2]
            if not k.isdigit() or int(k) < 1:
                raise ConfigError(f"model.checkpoint={policy!r}: every_k needs a whole number k >= 1, e.g. every_k:2")
        else:
            _choice("model.checkpoint", policy, CHECKPOINT_POLICIES)
        if (self.checkpoint_attn or self.checkpoint_mlp) and policy != "none":
            raise ConfigError(f"model.checkpoint={policy!r} and model.checkpoint_attn/checkpoint_mlp are both set; "
                              "keep model.checkpoint only (the booleans are its older aliases)")
        _choice("model.mlp_type", self.mlp_type, MLP_TYPES)
        _choice("model.attention", self.attention, ATTENTION_BACKENDS)
        _choice("model.pos_encoding", self.pos_encoding, POS_ENCODINGS)
        if self.dim % self.heads:
            raise ConfigError(f"model.hidden_size={self.dim} must be divisible by model.num_heads={self.heads}")
        head_dim = self.head_dim
        if self.pos_encoding == "RoPE2d" and head_dim % 4:
            raise ConfigError(f"RoPE2d needs head_dim % 4 == 0, got head_dim={head_dim}; change model.num_heads")
        if self.pos_encoding == "RoPE" and head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {head_dim}; change model.num_heads")
        if not self.text_dims:
            raise ConfigError("model.text_dims is empty; the model needs at least one sequence text encoder")
        if self.max_res < self.max_res_orig:
            raise ConfigError(f"model.max_res={self.max_res} must be >= model.max_res_orig={self.max_res_orig}")
        if self.max_res % (self.latent_factor * self.patch_size):
            raise ConfigError(
                f"model.max_res={self.max_res} must be a multiple of latent_factor*patch_size="
                f"{self.latent_factor * self.patch_size}"
            )

    @property
    def dim(self) -> int:
        """Transformer width: ``hidden_size``, or 64 x depth when it is 0."""
        return self.hidden_size or 64 * self.depth

    @property
    def heads(self) -> int:
        """Attention heads: ``num_heads``, or depth when it is 0."""
        return self.num_heads or self.depth

    @property
    def checkpoint_policy(self) -> str:
        """``checkpoint`` with the boolean aliases resolved (attn -> attention, mlp -> mlp, both -> attention+mlp)."""
        if self.checkpoint_attn or self.checkpoint_mlp:
            return {(True, False): "attention", (False, True): "mlp"}.get(
                (self.checkpoint_attn, self.checkpoint_mlp), "attention+mlp")
        return self.checkpoint

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def pixel_step(self) -> int:
        """Image sides must be multiples of this many pixels (VAE factor x patch)."""
        return self.latent_factor * self.patch_size


@dataclass
class TextEncoderConfig:
    """One text encoder: a Hugging Face name or local folder. ``kind`` sequence -> tokens, pooled -> vector."""

    name: str = ""
    kind: str = "sequence"
    max_length: int = 128
    # probability that this encoder alone is dropped (replaced by its null embedding) in training
    drop_prob: float = 0.0

    def __post_init__(self) -> None:
        _choice("encoders.text[].kind", self.kind, ("sequence", "pooled"))
        _probability("encoders.text[].drop_prob", self.drop_prob)
        _positive("encoders.text[].max_length", self.max_length)


@dataclass
class EncodersConfig:
    """Text encoders and the VAE that turn a (caption, image) row into model inputs."""

    text: list[TextEncoderConfig] = field(default_factory=list)
    # Hugging Face name or folder of an AutoencoderKL; "" = pixel space (no VAE)
    vae: str = ""
    vae_subfolder: str = ""
    # a cheap decoder of the same latent space (a TAESD-family folder, e.g. TAEF2 beside the FLUX.2 VAE) for the
    # intermediate denoising frames (gifs, step callbacks); "" = the frames use encoders.vae. Final images
    # always go through encoders.vae
    preview_vae: str = ""
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    # captions kept encoded on each loader (an LRU; misses are encoded one by one); 0 = off, for unique captions
    caption_cache: int = 0
    # attention kernel asked of each text encoder (transformers' attn_implementation); a class without it
    # (Gemma 2 has no SDPA in transformers 5: logit softcapping) falls back to eager, with a log line
    attention: str = "sdpa"
    # torch.compile the text encoders' and the VAE encoder's forward (first batches of each shape compile)
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        _choice("encoders.dtype", self.dtype, ("auto", "fp32", "bf16", "fp16"))
        _choice("encoders.attention", self.attention, ("sdpa", "eager", "flex_attention", "flash_attention_2"))


@dataclass
class FlowConfig:
    """Rectified-flow objective: timestep distribution, shift, CFG dropout, loss weighting."""

    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # resolution-dependent shift sqrt(tokens / base_tokens); 0 = no shift
    shift_base_tokens: int = 0
    # probability that the whole condition is dropped
    p_uncond: float = 0.1
    loss_weighting: str = "none"

    def __post_init__(self) -> None:
        _choice("flow.timestep_sampling", self.timestep_sampling, ("logit_normal", "uniform", "mode"))
        _choice("flow.loss_weighting", self.loss_weighting, ("none", "snr_clip"))
        _probability("flow.p_uncond", self.p_uncond)
        _positive("flow.logit_std", self.logit_std)


@dataclass
class DataConfig:
    """Bucketed parquet data and batching."""

    parquet_folder: str = ""
    bucket_indices_path: str = ""
    image_column: str = "image"
    caption_columns: list[str] = field(default_factory=lambda: ["caption_long", "caption_short"])
    # probability of the first caption column (the rest share the remainder)
    first_caption_prob: float = 0.8
    random_flip: bool = False
    # per-model-rank batch size; if token_budget > 0, the batch per bucket is token_budget // tokens, with
    # tokens = image tokens + text tokens (each sequence encoder's max_length), so every step costs about the same
    batch_size: int = 8
    token_budget: int = 0
    max_batch_size: int = 0
    # cap on (image + text) tokens of one model rank's micro-batch, in either mode; 0 = none
    max_tokens: int = 0
    # buckets with fewer rows than one global batch are: "drop"ped or "merge"d (sampled with replacement)
    small_buckets: str = "drop"
    num_workers: int = 2
    # torch intra-op threads on a loader rank (0 = torch's default); 1 keeps a CPU loader off the model's cores
    loader_threads: int = 0
    seed: int = 0
    # R, G, B that transparent pixels are composited over when a row is decoded (create_phase's default)
    image_background: list[int] = field(default_factory=lambda: [255, 255, 255])
    # a row whose image header has more pixels than this is skipped as corrupt (create_phase's default)
    max_image_pixels: int = 100_000_000
    # parquet handles each loader worker keeps open (LRU; 0 opens a shard for every read)
    open_files: int = 64
    # memory for shard footers parsed once per process and shared by the workers (0 = parse on every
    # open); ~2.9 MB per 10k rows at 32 rows per group, so 4096 holds ~14M rows; beyond, LRU and a warning
    footer_cache_mb: float = 4096
    # where batches come from: "online" (read, decode and encode the shards) or "cache" (read what
    # `python -m mmdit precompute` wrote to cache_dir; no encoder runs, see mmdit.cache)
    source: str = "online"
    cache_dir: str = ""

    def __post_init__(self) -> None:
        _positive("data.batch_size", self.batch_size)
        _positive("data.open_files", self.open_files, allow_zero=True)
        _positive("data.footer_cache_mb", self.footer_cache_mb, allow_zero=True)
        _choice("data.source", self.source, ("online", "cache"))
        if self.source == "cache" and not self.cache_dir:
            raise ConfigError("data.source=cache needs data.cache_dir (the --output_dir of python -m mmdit precompute)")
        _probability("data.first_caption_prob", self.first_caption_prob)
        _choice("data.small_buckets", self.small_buckets, ("drop", "merge"))


@dataclass
class TopologyConfig:
    """Which global ranks load data for which model ranks.

    ``loader_to_model`` maps a loader rank to its model ranks (the seed's ``loader_to_model_gpu``);
    or ``loaders_per_node`` > 0 makes the first k local ranks of each node load for the rest.
    Both empty: every rank trains and loads its own data in background workers.
    """

    loader_to_model: dict[int, list[int]] = field(default_factory=dict)
    loaders_per_node: int = 0
    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    # seconds the ranks may take to join at start (process-group set-up); after that no wait for a live peer
    # has a limit (a save, a compile, an eval may take hours): dead peers are found by the heartbeat instead
    timeout_s: float = 1800.0
    heartbeat_s: float = 5.0  # every rank beats a counter in torchrun's store this often (mmdit.train.liveness)
    dead_peer_s: float = 60.0  # a rank whose heartbeat stops this long is dead: the job ends, naming it

    def __post_init__(self) -> None:
        _choice("topology.backend", self.backend, ("auto", "nccl", "gloo"))
        if not 0 < 3 * self.heartbeat_s <= self.dead_peer_s:
            raise ConfigError(f"topology.dead_peer_s={self.dead_peer_s} must be at least 3 x topology.heartbeat_s="
                              f"{self.heartbeat_s} (> 0), or a slow beat reads as a dead peer")
        if self.loader_to_model and self.loaders_per_node:
            raise ConfigError("set either topology.loader_to_model or topology.loaders_per_node, not both")


@dataclass
class TrainConfig:
    """Optimisation, precision, EMA, checkpoints and logging."""

    run_name: str = "run"
    save_dir: str = "models"
    total_steps: int = 1000
    accumulation_steps: int = 1
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    precision: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    ema_decay: float = 0.999
    ema_update_every: int = 1
    save_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto | none | path to a step_<N> folder
    # resume although the data layout (model ranks, batch, token budget, accumulation, data seed) changed:
    # continue from the recorded sample cursor with the new layout (mmdit.train.resume)
    allow_layout_change: bool = False
    init_from: str = ""  # weights only (next resolution stage)
    reset_optimizer: bool = True
    reset_wandb: bool = True
    log_every: int = 10
    wandb_mode: str = "disabled"
    wandb_project: str = "mmdit"
    max_nonfinite_in_row: int = 10
    validate_every: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    validation_size: list[int] = field(default_factory=lambda: [256, 256])
    seed: int = 0
    # write every micro-batch's bucket and sample ids to <run>/samples_rank<r>.jsonl (a data audit trail)
    log_samples: bool = False
    # dense bf16 peak FLOP/s of one device for MFU; 0 = look the GPU up by name
    peak_flops: float = 0.0
    # optimizer steps per window in which model ranks waiting > 5 % for data gives one warning (mmdit.train.balance)
    balance_window: int = 100
    # compile each JointBlock (regional, fullgraph); null = on for CUDA, off on the CPU (a cold compile there
    # costs minutes and gains little)
    compile: Optional[bool] = None
    # how model ranks share the model: ddp (a full copy per rank; the default up to ~1.2B) or fsdp (FSDP2:
    # weights, gradients, optimizer state and EMA sharded over the model ranks; mmdit.train.parallel)
    parallel: str = "ddp"
    # SHA-256 of the final weights in summary_rank<r>.json (a gather of every weight under FSDP: tests only,
    # never on by default, because it would run in the window between a stop's checkpoint and the exit)
    weights_digest: bool = False
    # adamw, or muon: torch.optim.Muon for the blocks' 2-D matrices, AdamW for the rest (train.muon.*)
    optimizer: str = "adamw"
    muon: MuonConfig = field(default_factory=MuonConfig)
    phema: PhemaConfig = field(default_factory=PhemaConfig)  # post-hoc EMA (EDM2), off by default
    repa: RepaConfig = field(default_factory=RepaConfig)  # representation alignment (REPA), off by default

    def __post_init__(self) -> None:
        _positive("train.total_steps", self.total_steps)
        _choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        _choice("train.optimizer", self.optimizer, ("adamw", "muon"))
        check_methods_parallel(self.optimizer, self.parallel)
        _positive("train.accumulation_steps", self.accumulation_steps)
        _positive("train.lr", self.lr)
        _choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _choice("train.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        _choice("train.wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))
        _probability("train.ema_decay", self.ema_decay)
        _positive("train.ema_update_every", self.ema_update_every)
        _positive("train.save_every", self.save_every)
        _positive("train.keep_last", self.keep_last)


@dataclass
class SampleConfig:
    """Sampling defaults for validation and inference."""

    sampler: str = "euler"
    num_steps: int = 28
    cfg_scale: float = 5.0
    # timestep shift for sampling; null = the training rule at the size sampled (mmdit.flow.timestep_shift:
    # sqrt(tokens / flow.shift_base_tokens), 1 without flow.shift_base_tokens); a number = that shift at any size
    shift: Optional[float] = None
    noise_scale: float = 1.0  # euler_stochastic only
    # compile each JointBlock for validation and inference; null = on for CUDA, off on the CPU
    compile: Optional[bool] = None

    def __post_init__(self) -> None:
        _choice("sample.sampler", self.sampler, ("euler", "heun", "euler_stochastic"))
        _positive("sample.num_steps", self.num_steps)
        if self.shift is not None:
            _positive("sample.shift", self.shift)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        sequence = [e for e in self.encoders.text if e.kind == "sequence"]
        pooled = [e for e in self.encoders.text if e.kind == "pooled"]
        if self.encoders.text and len(sequence) != len(self.model.text_dims):
            raise ConfigError(
                f"encoders.text has {len(sequence)} sequence encoders but model.text_dims has "
                f"{len(self.model.text_dims)} entries; give one width per sequence encoder"
            )
        if len(pooled) > 1:
            raise ConfigError("at most one encoders.text entry may have kind=pooled")
        check_repa(self.train.repa, self.model.depth)
        if self.encoders.text and bool(pooled) != bool(self.model.pooled_dim):
            raise ConfigError(
                f"model.pooled_dim={self.model.pooled_dim} but {len(pooled)} pooled encoder(s) configured; "
                "set model.pooled_dim=0 without a pooled encoder, or its width with one"
            )
        if self.train.parallel == "fsdp" and ((self.train.validate_every and self.train.validation_prompts) or (
                self.eval.parquet_folder and (self.eval.loss_every or self.eval.images_every))):
            raise ConfigError("validation images (train.validate_every) and held-out metrics (eval.*) during "
                              "training are not available with train.parallel=fsdp yet (the EMA is sharded); set "
                              "train.validate_every=0 and eval.parquet_folder='', and evaluate exported or "
                              "consolidated checkpoints with python -m mmdit evaluate")
        if not self.encoders.vae and self.encoders.text and self.model.latent_factor != 1:
            raise ConfigError(
                "pixel space (encoders.vae empty) needs model.latent_factor=1 and model.in_channels=3"
            )


def _preset_layers(preset: str | Path, seen: tuple = ()) -> list:
    """A preset file and the presets it extends (``defaults_from: <name>``), parents first."""
    path = Path(preset)
    if not path.suffix:
        path = CONFIG_DIR / f"{preset}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config preset {str(preset)!r} not found; available presets: {names}")
    if path in seen:
        raise ConfigError(f"presets extend each other in a cycle: {[str(p) for p in seen]}")
    layer = OmegaConf.load(path)
    parent = layer.pop("defaults_from", None)
    return (_preset_layers(parent, seen + (path,)) if parent else []) + [layer]


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a Config from defaults, a preset (name in ``configs/`` or a YAML path) and ``a.b=v`` overrides."""
    schema = OmegaConf.structured(Config)
    layers = _preset_layers(preset) if preset else []
    try:
        merged = OmegaConf.merge(schema, *layers)
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} must look like key.sub=value (list items: key.0.sub=value)")
            OmegaConf.update(merged, key.strip(), yaml.safe_load(value) if value else "", merge=True)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config key '{err.full_key}': {err.msg.splitlines()[0]}") from None


def config_to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (stored next to every checkpoint)."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def read_config(path: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """Read a config written by :func:`save_config`."""
    return load_config(Path(path), overrides)
