"""Mini-Gemini in Flax NNX: vision towers, patch info mining, projector, decoder LM."""

from mgjax.models.axes import DEFAULT_LOGICAL_AXIS_RULES, logical_shardings
from mgjax.models.vlm import MiniGemini, abstract_model, num_image_tokens

__all__ = ["DEFAULT_LOGICAL_AXIS_RULES", "MiniGemini", "abstract_model", "logical_shardings", "num_image_tokens"]
