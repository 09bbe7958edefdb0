"""Frozen text encoders and image codecs (VAE or pixel space), plus tiny random-weight stand-ins for tests.

Heavy libraries (transformers, diffusers) are imported only when a model is loaded or built.
"""

from .text import (
    MINILM_NAMES,
    EncoderNotFoundError,
    LoadedTextEncoder,
    TextEncoders,
    load_text_encoder,
    package_model_dir,
    resolve_dtype,
    resolve_name,
)
from .tiny import build_tiny_models, ensure_tiny_models, tiny_encoders_config, tiny_model_dims
from .vae import ImageCodec, PixelCodec, VAECodec, images_to_float, make_codec, to_pil, to_uint8

__all__ = [
    "MINILM_NAMES",
    "EncoderNotFoundError",
    "ImageCodec",
    "LoadedTextEncoder",
    "PixelCodec",
    "TextEncoders",
    "VAECodec",
    "build_tiny_models",
    "ensure_tiny_models",
    "images_to_float",
    "load_text_encoder",
    "make_codec",
    "package_model_dir",
    "resolve_dtype",
    "resolve_name",
    "tiny_encoders_config",
    "tiny_model_dims",
    "to_pil",
    "to_uint8",
]
