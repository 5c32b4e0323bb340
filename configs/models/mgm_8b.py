"""Mini-Gemini 8B (MGM-8B): Llama-3-8B-Instruct + CLIP ViT-L/14-336 + ConvNeXt-L at 768 px.

The sizes of the released model (YanweiLi/MGM-8B, from meta-llama/Meta-Llama-3-8B-Instruct);
weights come from `python -m mgjax.convert`. Select with
--config=configs/stage1.py:model=mgm_8b.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg  # one preset; the argument keeps the big_vision get_config(arg) signature
  return ml_collections.ConfigDict(dict(
    # The released 128256-token vocabulary plus 128 rows for <image> (which the trainer adds to
    # the tokenizer) and other added tokens; a multiple of 128 shards evenly. The importers
    # (python -m mgjax.convert) pad the embedding to it.
    vocab_size=128384,
    image_token_id=0,  # replaced by the tokenizer's <image> id when training starts
    # optim.freeze: Mini-Gemini trains the LLM, mining and projector; both towers stay frozen.
    freeze=('vision_lowres/.*', 'vision_highres/.*'),
    seq_len=2048,  # data.seq_len: Mini-Gemini's fine-tuning model_max_length
    dtype='bfloat16',  # compute dtype; params stay float32, logits are always float32
    template='llama_3',  # the conversation template MGM-8B was trained with
    # Llama-3-8B-Instruct's config.json has rope_theta 500000 and rope_scaling null: the
    # 'llama3' rope scaling arrived with Llama-3.1. For a 3.1 base set
    # rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
    # high_freq_factor=4.0, original_max_position_embeddings=8192).
    llm=dict(family='llama', hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
             mlp=14336, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False,
             remat='full', scan_layers=True, rope_scaling=None, qkv_bias=False),
    # openai/clip-vit-large-patch14-336, penultimate layer, no class token: 576 x 1024.
    vision_lowres=dict(kind='clip', image_size=336, patch_size=14, width=1024, layers=24,
                       heads=16, mlp=4096, feature_layer=-2),
    # OpenCLIP convnext_large_d_320 (laion2B-s29B-b131K-ft-soup) trunk at 768 px.
    vision_highres=dict(kind='convnext', image_size=768, dims=(192, 384, 768, 1536),
                        depths=(3, 3, 27, 3)),
  ))
