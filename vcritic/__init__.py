"""vcritic: train generative critics for singing voice synthesis."""

__version__ = "0.1.0"
