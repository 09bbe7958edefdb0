"""The MMDiT denoiser and its building blocks."""

from .mmdit import MMDiT, count_parameters

__all__ = ["MMDiT", "count_parameters"]
