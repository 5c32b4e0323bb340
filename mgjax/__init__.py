"""mgjax: the Mini-Gemini two-stage recipe in JAX/Flax NNX."""

__version__ = "0.1.0"
