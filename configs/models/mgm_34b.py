"""Mini-Gemini 34B (MGM-34B): Nous-Hermes-2-Yi-34B + CLIP ViT-L/14-336 + ConvNeXt-L at 768 px.

YanweiLi/MGM-34B, from NousResearch/Nous-Hermes-2-Yi-34B (Yi is a Llama architecture).
Weights come from `python -m mgjax.convert import-mgm`. Select with
--config=configs/stage1.py:model=mgm_34b; its HD variant is mgm_34b_hd.
"""

from mgjax import presets


def get_config(arg: str | None = None):
  del arg  # one preset; the argument keeps the big_vision get_config(arg) signature
  return presets.mini_gemini(
      # Fine-tuning as scripts/yi/train/stage_1_2_full_yi34b_336_hr_768.sh:
      # --learning_rate 1e-5, --lr_multi "model.mm_projector:2,model.vlm_uni:2".
      lr=1e-5,
      lr_multipliers=(("(mining|projector)/.*", 2.0),),
      vocab_size=64128,
      template="chatml_direct",
      llm=dict(family="llama", hidden=7168, layers=60, heads=56, kv_heads=8, head_dim=128, mlp=20480,
               rope_theta=5000000.0, rope_scaling=None, norm_eps=1e-5, tie_embeddings=False, qkv_bias=False))
