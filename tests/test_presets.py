"""The real Mini-Gemini presets build abstractly (shapes only) at their published sizes."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from mgjax import config as mgjax_config
from mgjax.models import abstract_model, num_image_tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Published parameter counts, each also worked out from the released config.json:
# Gemma-2B (google/gemma-2b-it): embed 256000*2048 (tied) + 18 layers * (q,o 2*2048*2048,
#   k,v 2*2048*256, mlp 3*2048*16384, 2 norms 2*2048) + final norm 2048 = 2,506,172,416.
# Vicuna-7B v1.5 (Llama-2-7B): 2 * 32000*4096 (embed, lm_head) + 32 * (4*4096^2 +
#   3*4096*11008 + 2*4096) + 4096 = 6,738,415,616.
# Llama-3-8B-Instruct: 2 * 128256*4096 + 32 * (2*4096^2 + 2*4096*1024 + 3*4096*14336 +
#   2*4096) + 4096 = 8,030,261,248.
# Vicuna-13B v1.5 (Llama-2-13B): 2 * 32000*5120 + 40 * (4*5120^2 + 3*5120*13824 + 2*5120) + 5120
#   = 13,015,864,320.
# Mixtral-8x7B-Instruct-v0.1: 2 * 32000*4096 + 32 * (2*4096^2 + 2*4096*1024 + 8 experts *
#   3*4096*14336 + router 4096*8 + 2*4096) + 4096 = 46,702,792,704.
# Nous-Hermes-2-Yi-34B: 2 * 64000*7168 + 60 * (2*7168^2 + 2*7168*1024 + 3*7168*20480 + 2*7168)
#   + 7168 = 34,388,917,248.
LLM_PARAMS = {
    "mgm_2b": 2_506_172_416,
    "mgm_7b": 6_738_415_616,
    "mgm_8b": 8_030_261_248,
    "mgm_13b": 13_015_864_320,
    "mgm_8x7b": 46_702_792_704,
    "mgm_34b": 34_388_917_248
}
# Every released model, and its HD variant (the same weights, more visual tokens).
PRESETS = sorted([*LLM_PARAMS, *(f"{name}_hd" for name in LLM_PARAMS)])
TEMPLATES = {
    "mgm_2b": "gemma",
    "mgm_7b": "vicuna_v1",
    "mgm_13b": "vicuna_v1",
    "mgm_8b": "llama_3",
    "mgm_8x7b": "mistral_instruct",
    "mgm_34b": "chatml_direct"
}
# HF CLIPVisionModel of openai/clip-vit-large-patch14-336 has 303,507,456 parameters; mgjax
# builds no post_layernorm (2*1024), which the penultimate-layer features never read.
CLIP_L14_336_PARAMS = 303_507_456 - 2 * 1024
# timm convnext_large: 197,767,336 with its classifier head (norm 2*1536, fc 1536*1000+1000),
# which OpenCLIP/Mini-Gemini drop: 196,227,264 for stem + stages.
CONVNEXT_L_TRUNK_PARAMS = 197_767_336 - (2 * 1536 + 1536 * 1000 + 1000)
# Patch info mining: query LayerNorm+Linear(1024->1024), key and value LayerNorm+Linear(2880->1024).
MINING_PARAMS = (2 * 1024 + 1024 * 1024 + 1024) + 2 * (2 * 2880 + 2880 * 1024 + 1024)


def _count(state) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_abstractly_at_published_size(name):
  cfg = mgjax_config.load_config_file(os.path.join(REPO, "configs", "stage1.py"), f"model={name}")
  model_cfg = cfg.model
  base, hd = name.removesuffix("_hd"), name.endswith("_hd")
  # Trained as the released model: its template, padded images, model_max_length, towers.
  assert model_cfg.template == TEMPLATES[base]
  assert cfg.data.pad_to_square and cfg.data.seq_len == (4096 if hd else 2048)
  assert cfg.optim.freeze == ("vision_lowres/.*", "vision_highres/.*")
  assert model_cfg.vision_highres.image_size == (1536 if hd else 768)
  assert num_image_tokens(model_cfg) == (5 if hd else 1) * 576
  model = abstract_model(model_cfg)
  params = nnx.state(model, nnx.Param)
  # Abstract: shapes only, nothing allocated.
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))

  counts = {part: _count(params[part]) for part in params}
  hidden = model_cfg.llm.hidden
  # The presets add 128 vocabulary rows (room for <image>) to the input and output embeddings.
  added_rows = 128 * hidden * (1 if model_cfg.llm.tie_embeddings else 2)
  assert counts["llm"] == LLM_PARAMS[base] + added_rows
  assert counts["vision_lowres"] == CLIP_L14_336_PARAMS
  assert counts["vision_highres"] == CONVNEXT_L_TRUNK_PARAMS
  assert counts["mining"] == MINING_PARAMS
  assert counts["projector"] == 1024 * hidden + hidden + hidden * hidden + hidden
  assert set(counts) == {"llm", "vision_lowres", "vision_highres", "mining", "projector"}
  assert model.vision_highres.feature_channels == 2880


def test_visual_tokens_have_the_published_shapes():
  """576 CLIP tokens of width 1024 mine 8x8 windows of a 192x192x2880 map (shapes only)."""
  cfg = mgjax_config.preset("models", "mgm_2b")
  model = abstract_model(cfg)
  lo = jax.ShapeDtypeStruct((1, 336, 336, 3), np.float32)
  hi = jax.ShapeDtypeStruct((1, 768, 768, 3), np.float32)
  graphdef, state = nnx.split(model)

  def shapes(state, lo, hi):
    m = nnx.merge(graphdef, state)
    return (m.vision_lowres(lo), m.vision_highres.feature_map(hi), m.encode_images(lo, hi))

  lowres, highres, tokens = jax.eval_shape(shapes, state, lo, hi)
  assert lowres.shape == (1, 576, 1024)
  assert highres.shape == (1, 192, 192, 2880)
  assert tokens.shape == (1, 576, 2048)
