"""Mini-Gemini 8x7B (MGM-8x7B): Mixtral-8x7B-Instruct + CLIP ViT-L/14-336 + ConvNeXt-L at 768 px.

YanweiLi/MGM-8x7B, from mistralai/Mixtral-8x7B-Instruct-v0.1: 8 experts per layer, 2 per token.
Weights come from `python -m mgjax.convert import-mgm`. Select with
--config=configs/stage1.py:model=mgm_8x7b; its HD variant is mgm_8x7b_hd.
"""

from mgjax import presets


def get_config(arg: str | None = None):
  del arg  # one preset; the argument keeps the big_vision get_config(arg) signature
  return presets.mini_gemini(
      # Fine-tuning as scripts/mixtral/train/stage_1_2_full_mixtral_8x7b_336_hr_768.sh:
      # --learning_rate 1e-5, --lr_multi "model.mm_projector:2,model.vlm_uni:2".
      lr=1e-5,
      lr_multipliers=(("(mining|projector)/.*", 2.0),),
      vocab_size=32128,
      template="mistral_instruct",
      llm=dict(
          family="mixtral",
          hidden=4096,
          layers=32,
          heads=32,
          kv_heads=8,
          head_dim=128,
          mlp=14336,
          rope_theta=1000000.0,
          rope_scaling=None,
          norm_eps=1e-5,
          tie_embeddings=False,
          qkv_bias=False,
          # Mini-Gemini never added the router's load-balancing loss: its forward does not ask
          # for router logits and Mixtral-8x7B-Instruct's config has output_router_logits
          # false, so the 0.02 coefficient there never applied. Set it to train the balance.
          num_experts=8,
          experts_per_token=2,
          router_aux_loss_coef=0.0))
