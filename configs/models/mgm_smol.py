"""A Mini-Gemini on a real instruct LLM that trains on a CPU: SmolLM2-135M-Instruct + the sample's towers.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): a Llama of 30 layers, hidden 576, 9 heads
with 3 KV heads, vocabulary 49152 (tied embeddings), spoken to in its own ChatML (the `smollm2`
template). The vision towers, mining and projector are the sample preset's, small enough for a
laptop. Unlike a released Mini-Gemini's CLIP and ConvNeXt they start from random weights, so
they are not frozen: pretraining aligns mining and the projector to the LLM (towers and LLM
fixed, as Mini-Gemini's first phase), and stages 1 and 2 train the towers with the rest, as the
sample preset does. The LLM comes from import-llm, its tokenizer from the folder below:

  python -m mgjax.convert fetch-smollm2                     # -> models/SmolLM2-135M-Instruct
  python -m mgjax.convert import-llm --hf_dir=models/SmolLM2-135M-Instruct --out=runs/smol \\
      --config=configs/stage1.py:model=mgm_smol
  python -m mgjax.main --config=configs/pretrain.py:model=mgm_smol --config.init_from=runs/smol ...

Its training values are Mini-Gemini's (mgjax.presets.mgm_training: pretraining at 1e-3,
fine-tuning at MGM-2B/7B/8B's 2e-5, no weight decay, 3% warmup, cosine to 0, AdamW 0.9/0.999,
no clipping), with batches and steps sized for the bundled sample on a CPU instead of 1 epoch
of the real mix at batch 128.
"""

import ml_collections

from mgjax import config_files, presets


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg  # one preset; the argument keeps the big_vision get_config(arg) signature
  sample = config_files.preset("models", "sample")
  # Mini-Gemini's fine-tuning values (lr 2e-5, no weight decay, 3% warmup, cosine to 0, AdamW
  # 0.9/0.999, no clipping; stage 2 at half the rate), with the sample's batches and lengths
  # instead of a cluster's: 8 rows a step, a few hundred steps, not 1 epoch of the mix at 128.
  training = presets.mgm_training(2e-5)
  for phase, steps in (("pretrain", 100), ("stage1", 150), ("stage2", 50)):
    training[phase]["data"]["batch_size"] = 8
    training[phase]["train"] = dict(epochs=0.0, steps=steps)
  return ml_collections.ConfigDict(
      dict(
          # 49152 tokens + <image>, rounded up to a multiple of 128 (what import-llm pads to).
          vocab_size=49280,
          image_token_id=0,  # replaced by the tokenizer's <image> id when training starts
          dtype="float32",  # XLA's bf16 matmuls are no faster than float32 on a CPU
          template="smollm2",
          pretrain_template="smollm2",
          tokenizer="models/SmolLM2-135M-Instruct",
          # A SmolLM2 conversation of the sample is its system prompt (~20 tokens), the turns and
          # 16 visual tokens an image: at most ~120 tokens.
          seq_len=160,
          llm=dict(
              family="llama",
              hidden=576,
              layers=30,
              heads=9,
              kv_heads=3,
              head_dim=64,
              mlp=1536,
              rope_theta=100000.0,
              rope_scaling=None,
              norm_eps=1e-5,
              tie_embeddings=True,
              qkv_bias=False,
              remat="none",
              # 30 layers: one scanned layer compiles in a fraction of the time.
              scan_layers=True),
          vision_lowres=sample.vision_lowres.to_dict(),
          vision_highres=sample.vision_highres.to_dict(),
          training=training,
      ))
