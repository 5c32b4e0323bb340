"""Mini-Gemini 2B (MGM-2B): Gemma-2B + CLIP ViT-L/14-336 + ConvNeXt-L at 768 px.

The sizes of the released model (YanweiLi/MGM-2B, from google/gemma-2b-it); weights come
from `python -m mgjax.convert`. Select with --config=configs/stage1.py:model=mgm_2b.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg  # one preset; the argument keeps the big_vision get_config(arg) signature
  return ml_collections.ConfigDict(dict(
    # The released 256000-token vocabulary plus 128 rows for <image> (which the trainer adds to
    # the tokenizer) and other added tokens; a multiple of 128 shards evenly. The importers
    # (python -m mgjax.convert) pad the embedding to it.
    vocab_size=256128,
    image_token_id=0,  # replaced by the tokenizer's <image> id when training starts
    # optim.freeze: Mini-Gemini trains the LLM, mining and projector; both towers stay frozen.
    freeze=('vision_lowres/.*', 'vision_highres/.*'),
    seq_len=2048,  # data.seq_len: Mini-Gemini's fine-tuning model_max_length
    dtype='bfloat16',  # compute dtype; params stay float32, logits are always float32
    template='gemma',  # the conversation template MGM-2B was trained with
    llm=dict(family='gemma', hidden=2048, layers=18, heads=8, kv_heads=1, head_dim=256,
             mlp=16384, rope_theta=10000.0, norm_eps=1e-6, tie_embeddings=True,
             remat='full', scan_layers=True, rope_scaling=None, qkv_bias=False),
    # openai/clip-vit-large-patch14-336, penultimate layer, no class token: 576 x 1024.
    vision_lowres=dict(kind='clip', image_size=336, patch_size=14, width=1024, layers=24,
                       heads=16, mlp=4096, feature_layer=-2),
    # OpenCLIP convnext_large_d_320 (laion2B-s29B-b131K-ft-soup) trunk at 768 px.
    vision_highres=dict(kind='convnext', image_size=768, dims=(192, 384, 768, 1536),
                        depths=(3, 3, 27, 3)),
  ))
