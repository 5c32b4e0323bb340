"""Mini-Gemini 2B (MGM-2B): Gemma-2B + CLIP ViT-L/14-336 + ConvNeXt-L at 768 px.

YanweiLi/MGM-2B, from google/gemma-2b-it. Its pretraining ran in the gemma template too.
Weights come from `python -m mgjax.convert import-mgm`. Select with
--config=configs/stage1.py:model=mgm_2b; its HD variant is mgm_2b_hd.
"""

from mgjax import presets


def get_config(arg: str | None = None):
  del arg  # one preset; the argument keeps the big_vision get_config(arg) signature
  return presets.mini_gemini(
      # --learning_rate 2e-5 in its fine-tuning, scripts/gemma/train/stage_1_2_full_gemma_v2b_336_hr_768.sh.
      lr=2e-5,
      # The released 256000-token vocabulary plus 128 rows.
      vocab_size=256128,
      template="gemma",
      pretrain_template="gemma",
      llm=dict(family="gemma", hidden=2048, layers=18, heads=8, kv_heads=1, head_dim=256, mlp=16384, rope_theta=10000.0,
               rope_scaling=None, norm_eps=1e-6, tie_embeddings=True, qkv_bias=False))
