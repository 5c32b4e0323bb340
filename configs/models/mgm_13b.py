"""Mini-Gemini 13B (MGM-13B): Vicuna-13B v1.5 + CLIP ViT-L/14-336 + ConvNeXt-L at 768 px.

YanweiLi/MGM-13B, from lmsys/vicuna-13b-v1.5 (a Llama-2-13B).
Weights come from `python -m mgjax.convert import-mgm`. Select with
--config=configs/stage1.py:model=mgm_13b; its HD variant is mgm_13b_hd.
"""

from mgjax import presets


def get_config(arg: str | None = None):
  del arg  # one preset; the argument keeps the big_vision get_config(arg) signature
  return presets.mini_gemini(
      # --learning_rate 2e-5 in its fine-tuning, scripts/llama/train/stage_1_2_full_v13b_336_hr_768.sh.
      lr=2e-5,
      vocab_size=32128,
      template="vicuna_v1",
      llm=dict(family="llama", hidden=5120, layers=40, heads=40, kv_heads=40, head_dim=128, mlp=13824,
               rope_theta=10000.0, rope_scaling=None, norm_eps=1e-5, tie_embeddings=False, qkv_bias=False))
