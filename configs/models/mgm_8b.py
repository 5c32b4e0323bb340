"""Mini-Gemini 8B (MGM-8B): Llama-3-8B-Instruct + CLIP ViT-L/14-336 + ConvNeXt-L at 768 px.

YanweiLi/MGM-8B, from meta-llama/Meta-Llama-3-8B-Instruct. Its pretraining ran in the
llama_3 template too. Llama-3-8B-Instruct's config.json has rope_theta 500000 and rope_scaling
null (the 'llama3' rope scaling arrived with Llama-3.1).
Weights come from `python -m mgjax.convert import-mgm`. Select with
--config=configs/stage1.py:model=mgm_8b; its HD variant is mgm_8b_hd.
"""

from mgjax import presets


def get_config(arg: str | None = None):
  del arg  # one preset; the argument keeps the big_vision get_config(arg) signature
  return presets.mini_gemini(
      # --learning_rate 2e-5 in its fine-tuning, scripts/llama3/train/stage_1_2_full_v8b_336_hr_768.sh.
      lr=2e-5,
      vocab_size=128384,
      template="llama_3",
      pretrain_template="llama_3",
      llm=dict(family="llama", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, mlp=14336,
               rope_theta=500000.0, rope_scaling=None, norm_eps=1e-5, tie_embeddings=False, qkv_bias=False))
