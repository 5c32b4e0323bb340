"""The tiny Mini-Gemini used on the bundled sample data: every piece real, CPU-fast.

Every sharded dimension is even so the (data=2, fsdp=2, tensor=2) test mesh divides it.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg  # one preset; the argument keeps the big_vision get_config(arg) signature
  return ml_collections.ConfigDict(
      dict(
          vocab_size=1024,
          image_token_id=5,
          dtype="float32",  # compute dtype; params stay float32, logits are always float32
          # The conversation template (mgjax.data.templates.TEMPLATES: vicuna_v1, gemma, llama_3,
          # chatml, ...); '' keeps the tokenizer's own (the sample tokenizer carries the sample one).
          template="",
          # The decoder; mgjax/models/llm.py's docstring describes every key.
          llm=dict(
              family="llama",  # llama | gemma | qwen2
              hidden=128,
              layers=4,
              heads=4,
              kv_heads=2,
              head_dim=32,
              mlp=384,
              rope_theta=10000.0,
              rope_scaling=None,
              norm_eps=1e-5,
              tie_embeddings=False,
              qkv_bias=False,
              # What a layer keeps for the backward pass (llm.REMAT_POLICIES): none | full |
              # dots | qkv | qkv_out | qkv_offloaded | dots_offloaded.
              remat="none",
              # One stacked layer run by jax.lax.scan: compiles once, not per layer (the
              # mgm presets scan; this 4-layer model compiles fast either way).
              scan_layers=False),
          vision_lowres=dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp=256, feature_layer=-2),
          vision_highres=dict(image_size=64, dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
          # Per phase (mgjax.presets.apply_training), what the sample runs were tuned with: a tiny
          # model trained from scratch on a few thousand conversations takes a high rate, warmed
          # up over fixed steps, with weight decay and clipping; stage 2 starts at stage 1's final
          # 1e-4 (1e-3 x 0.1). Batches and lengths stay the stage files' (16 rows, train.steps).
          training=dict(
              pretrain=dict(optim=dict(lr=1e-3, end_lr_factor=0.0, weight_decay=0.0, warmup_ratio=0.03)),
              stage1=dict(
                  optim=dict(lr=1e-3, warmup_steps=50, end_lr_factor=0.1, weight_decay=0.01, b2=0.95, grad_clip=1.0)),
              stage2=dict(optim=dict(lr=1e-4, warmup_steps=10)),
          ),
      ))
