"""Precomputed latents and text embeddings: the cache format (:mod:`.format`), ``python -m mmdit precompute``
(:mod:`.writer`, :mod:`.cli`) and training from a cache (:mod:`.reader`, :mod:`.producer`, ``data.source=cache``).

Heavy modules (the encoders, diffusers) are imported by the submodules that need them, not here.
"""

from .format import FORMAT, VERSION, check_matches, content_of, index_identity, read_manifest

__all__ = ["FORMAT", "VERSION", "check_matches", "content_of", "index_identity", "read_manifest"]
