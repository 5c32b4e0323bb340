"""Mini-Gemini 7B (MGM-7B): Vicuna-7B v1.5 + CLIP ViT-L/14-336 + ConvNeXt-L at 768 px.

YanweiLi/MGM-7B, from lmsys/vicuna-7b-v1.5 (a Llama-2-7B).
Weights come from `python -m mgjax.convert import-mgm`. Select with
--config=configs/stage1.py:model=mgm_7b; its HD variant is mgm_7b_hd.
"""

from mgjax import presets


def get_config(arg: str | None = None):
  del arg  # one preset; the argument keeps the big_vision get_config(arg) signature
  return presets.mini_gemini(
      # --learning_rate 2e-5 in its fine-tuning, scripts/llama/train/stage_1_2_full_v7b_336_hr_768.sh.
      lr=2e-5,
      vocab_size=32128,
      template="vicuna_v1",
      llm=dict(family="llama", hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, mlp=11008,
               rope_theta=10000.0, rope_scaling=None, norm_eps=1e-5, tie_embeddings=False, qkv_bias=False))
