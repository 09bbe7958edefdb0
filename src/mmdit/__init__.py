"""mmdit: train an SD3-style MMDiT text-to-image model from scratch."""

__version__ = "0.1.0"
